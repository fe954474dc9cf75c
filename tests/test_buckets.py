"""Aspect-ratio buckets, crop offsets, batch fit, epoch batches and per-step captions."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lorakit.config import DataConfig
from lorakit.data.buckets import (
    check_fit,
    closest_bucket,
    make_buckets,
    merge_plan,
    resize_and_crop_plan,
)
from lorakit.data.doctor import Params, process_image
from lorakit.data.training import Record, caption_for_step, epoch_batches, load_training_set
from lorakit.errors import ConfigError


@pytest.mark.parametrize("res,step", [(512, 64), (768, 64), (1024, 64), (64, 8), (128, 8)])
def test_bucket_sizes(res, step):
    buckets = make_buckets(res, max_ratio=2.0)
    assert (res, res) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= res * res and max(w / h, h / w) <= 2.0 + 1e-9
        assert (h, w) in buckets  # portrait and landscape both present
    assert len(buckets) >= 3
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_closest_bucket_by_aspect():
    buckets = make_buckets(512)
    assert closest_bucket((1000, 1000), buckets) == (512, 512)
    wide = closest_bucket((1600, 900), buckets)
    assert wide[0] > wide[1]
    best = min(abs(np.log(w / h) - np.log(16 / 9)) for w, h in buckets)
    assert abs(np.log(wide[0] / wide[1]) - np.log(16 / 9)) == pytest.approx(best)
    assert closest_bucket((900, 1600), buckets) == (wide[1], wide[0])


def test_resize_plan_covers_bucket_and_centres_crop():
    (rw, rh), (top, left) = resize_and_crop_plan((200, 100), (64, 64))
    assert (rw, rh) == (128, 64) and (top, left) == (0, 32)
    (rw, rh), (top, left) = resize_and_crop_plan((100, 300), (48, 80))
    assert rw >= 48 and rh >= 80 and top == (rh - 80) // 2 and left == 0
    _, (top, left) = resize_and_crop_plan((200, 100), (64, 64), center=False, jitter=0.0)
    assert (top, left) == (0, 0)


def _job(im: Image.Image, **data_kw):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data = DataConfig(**{"resolution": 64, **data_kw})
    return process_image(("x", buf.getvalue(), Params.from_data(data), None, True))


def test_crop_offsets_are_recorded_and_match_the_pixels():
    # columns coloured by x: the crop offset is visible in the output pixels
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(300)[None, :] * 255 // 299
    res = _job(Image.fromarray(arr), bucketing=False)
    assert res["bucket"] == (64, 64) and res["original_size"] == (100, 300)
    (rw, _), (top, left) = resize_and_crop_plan((300, 100), (64, 64))
    assert res["crop"] == (top, left) == (0, (rw - 64) // 2)
    out = np.asarray(Image.open(io.BytesIO(res["png"])))
    assert out.shape == (64, 64, 3)
    assert 100 < out[:, :, 0].mean() < 155  # the centre of the gradient, not its left edge
    bucketed = _job(Image.fromarray(arr))
    assert bucketed["bucket"][0] > bucketed["bucket"][1]  # landscape bucket when bucketing


def test_no_upscale_gives_small_images_their_own_bucket():
    small = Image.new("RGB", (40, 40), "red")
    assert _job(small, min_side=8)["bucket"] == (64, 64)
    kept = _job(small, min_side=8, no_upscale=True)
    assert kept["bucket"] == (40, 40)
    assert Image.open(io.BytesIO(kept["png"])).size == (40, 40)


def test_batch_fit_and_merge_plan():
    counts = Counter({(64, 64): 10, (56, 72): 1, (72, 56): 3})
    check_fit(counts, 1, "x")
    with pytest.raises(ConfigError) as e:
        check_fit(counts, 2, "'data'")
    msg = str(e.value)
    assert "56×72 (1 sample)" in msg and "72×56" not in msg
    assert "small_buckets=merge" in msg and "batch_size" in msg and "drop" in msg
    plan = merge_plan(counts, 4)
    assert plan == {(56, 72): (64, 64), (72, 56): (64, 64)}


def test_training_set_batch_fit_is_checked_up_front(tmp_path):
    from conftest import SAMPLES

    d = DataConfig(resolution=64, trigger="tdwl", workers=1)
    with pytest.raises(ConfigError, match=r"cannot fill one batch"):
        load_training_set(SAMPLES, d, batch_size=4)
    merged = load_training_set(
        SAMPLES, DataConfig(resolution=64, workers=1, small_buckets="merge"), batch_size=4
    )
    assert all(n >= 4 for n in Counter(r.bucket for r in merged.records).values())
    dropped = load_training_set(
        SAMPLES, DataConfig(resolution=64, workers=1, small_buckets="drop"), batch_size=4
    )
    assert len(dropped.records) == 14 and {r.bucket for r in dropped.records} == {(64, 64)}
    ts = load_training_set(SAMPLES, d, batch_size=2)
    x = ts.pixels(0)
    w, h = ts.records[0].bucket
    assert x.shape == (3, h, w) and x.min() >= -1.0 and x.max() <= 1.0


def _records(spec: list[tuple[tuple[int, int], int]]) -> list[Record]:
    return [
        Record(f"k{i}", f"c{i}", b, (0, 0), (b[1], b[0]), rep, False)
        for i, (b, rep) in enumerate(spec)
    ]


def test_epoch_batches_are_pure_single_bucket_and_drop_remainders():
    recs = _records([((64, 64), 1)] * 5 + [((56, 72), 2)] * 3 + [((72, 56), 1)])
    a = epoch_batches(recs, 2, seed=7, epoch=0)
    assert a == epoch_batches(recs, 2, seed=7, epoch=0)  # pure: resume relies on it
    assert a != epoch_batches(recs, 2, seed=7, epoch=1)
    assert a != epoch_batches(recs, 2, seed=8, epoch=0)
    for batch in a:
        assert len(batch) == 2 and len({recs[i].bucket for i in batch}) == 1
    # 5 → 2 batches, 3 × 2 repeats = 6 → 3 batches, 1 → 0 batches (cannot fill)
    assert len(a) == 5
    seen = Counter(i for b in a for i in b)
    assert all(seen[i] == 2 for i in range(5, 8))  # repeats expanded
    assert 8 not in seen


def test_caption_for_step_shuffle_keep_and_dropout():
    d = DataConfig(shuffle_tags=True, keep_tags=1, caption_dropout=0.0)
    cap = "tdwl, a, b, c, d, e"
    rng = random.Random(0)
    outs = {caption_for_step(cap, d, rng) for _ in range(50)}
    assert len(outs) > 5
    for o in outs:
        tags = o.split(", ")
        assert tags[0] == "tdwl" and sorted(tags[1:]) == ["a", "b", "c", "d", "e"]
    assert caption_for_step(cap, DataConfig(), random.Random(0)) == cap
    drop = DataConfig(caption_dropout=0.3)
    rng = random.Random(1)
    empty = sum(caption_for_step(cap, drop, rng) == "" for _ in range(2000))
    assert 500 < empty < 700
    r1, r2 = random.Random(5), random.Random(5)
    assert [caption_for_step(cap, d, r1) for _ in range(5)] == [
        caption_for_step(cap, d, r2) for _ in range(5)
    ]
