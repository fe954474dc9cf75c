"""Loading data for `lorakit train`: merging small buckets of a prepared set, the step/epoch
banner arithmetic of the real CLI, and re-runs with `data.cache_dir` that decode nothing."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
from conftest import FAST, SAMPLES, cli
from PIL import Image

from lorakit.config import DataConfig
from lorakit.data import doctor
from lorakit.data import prepare as prep
from lorakit.data.training import TrainingSet, load_training_set

SQUARE = sorted(p for p in SAMPLES.glob("*.png") if Image.open(p).size == (192, 192))


def _copy(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for p in files:
        shutil.copy(p, folder / p.name)
        txt = p.with_suffix(".txt")
        if txt.exists():
            shutil.copy(txt, folder / txt.name)
    return folder


def test_merge_small_buckets_of_a_prepared_set(tmp_path):
    # samples/brand at 64 px: 14 square images, 3 portrait, 3 landscape -> with batch 4 the two
    # non-square buckets (3 samples each) cannot fill a batch.
    out = tmp_path / "prepared"
    p = prep.prepare(SAMPLES, out, DataConfig(resolution=64, workers=1), batch_size=1)
    assert not p.fatal
    assert len({tuple(r["bucket"]) for r in p.rows}) == 3

    d = DataConfig(resolution=64, workers=1, small_buckets="merge")
    ts = load_training_set(out, d, batch_size=4)
    assert len(ts) == 20  # nothing lost
    assert {r.bucket for r in ts.records} == {(64, 64)}
    merged = {pr.file for pr in ts.problems if pr.kind == "bucket_merged"}
    assert len(merged) == 6
    # the same plan as `lorakit prepare --batch-size 4` applies to the source images
    direct = prep.build(SAMPLES, d, batch_size=4)
    assert {pr.file for pr in direct.problems if pr.kind == "bucket_merged"} == merged
    assert ts.steps_per_epoch(4) == 5
    # records keep the prepared set's order; moved images are re-cropped from their prepared
    # pixels and must look like the same merge done from the source images
    stored = prep.load_prepared(out)
    direct_px = {r["source"]: _decode(r["png"]) for r in direct.rows}
    for i, (r, row) in enumerate(zip(ts.records, stored, strict=True)):
        px = ts.pixels(i).numpy()
        assert px.shape == (3, 64, 64)
        if row["source"] in merged:
            assert r.key != row["key"] and r.bucket != tuple(row["bucket"])
            diff = np.abs(px - direct_px[row["source"]]).mean()
            assert diff < 0.1, (row["source"], diff)
        else:
            assert r.key == row["key"]
    # drop still works
    dropped = load_training_set(out, DataConfig(resolution=64, small_buckets="drop"), 4)
    assert len(dropped) == 14


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)


def _banner_numbers(output: str) -> tuple:
    flat = " ".join(output.split())
    m = re.search(
        r"(\d+) images × ([\d–]+) repeats? = (\d+) samples per epoch \(\+ (\d+) class images × "
        r"(\d+) for prior preservation\) → (\d+) steps per epoch",
        flat,
    )
    assert m, flat[:2000]
    return m.groups()


def test_train_banner_counts_repeats_and_reg_images(tmp_path):
    root = tmp_path / "data"
    _copy(SQUARE[:4], root / "3_brand")
    _copy(SQUARE[4:6], root / "1_extra")
    reg = _copy(SQUARE[6:8], tmp_path / "reg")
    res = cli(
        "train", root, *FAST, "--out", tmp_path / "run", "--steps", 1,
        "--set", f"data.reg_folder='{reg}'", "--set", "data.reg_repeats=2",
        "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
    )  # fmt: skip
    # 4×3 + 2×1 = 14 training samples, one 64×64 bucket, batch 2: 7 steps; the 2 class images
    # (× 2) are drawn beside them, as many per step (prior preservation), not as samples
    assert _banner_numbers(res.output) == ("6", "1–3", "14", "2", "2", "7")


def test_train_rerun_with_cache_dir_decodes_no_image(tmp_path, monkeypatch):
    decodes = []
    real = doctor._process
    monkeypatch.setattr(doctor, "_process", lambda job: decodes.append(job[0]) or real(job))
    pixels = []
    real_pixels = TrainingSet.pixels
    monkeypatch.setattr(
        TrainingSet, "pixels", lambda self, i: pixels.append(i) or real_pixels(self, i)
    )
    src = _copy(SQUARE[:6], tmp_path / "src")
    args = [
        "train", src, *FAST, "--steps", 1, "--set", f"data.cache_dir='{tmp_path / 'cache'}'",
        "--set", "data.workers=1",
    ]  # fmt: skip
    # pixels(i) is read by the VAE encode (cache misses only) and by the brand palette (every
    # run, 6 images: prepared uncompressed pixels, not a source decode).
    cli(*args, "--out", tmp_path / "run1")
    assert len(decodes) == 6 and len(pixels) == 6 + 6
    decodes.clear()
    pixels.clear()
    cli(*args, "--out", tmp_path / "run2")
    assert decodes == [] and len(pixels) == 6  # prepared set and latents both reused
    # a changed image is decoded (and VAE-encoded) again, alone
    decodes.clear()
    pixels.clear()
    Image.open(SQUARE[8]).save(src / SQUARE[0].name)
    cli(*args, "--out", tmp_path / "run3")
    assert decodes == [SQUARE[0].name] and len(pixels) == 1 + 6
