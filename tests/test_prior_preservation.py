"""DreamBooth prior preservation (lorakit/data/reg.py): class images of `data.reg_folder` beside
the instance images, loss = instance loss + train.prior_weight × class loss; the class order;
`lorakit class-images`; the planner's count; the refusals."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from PIL import Image

from lorakit import config as cfg
from lorakit.config import DataConfig
from lorakit.data.order import draw_noise
from lorakit.data.reg import CLASS_UID, ClassOrder
from lorakit.data.training import Record, epoch_batches, load_training_set
from lorakit.models import FAMILIES, load_model
from lorakit.spec import build_spec

SQUARE = sorted(p for p in SAMPLES.glob("*.png") if Image.open(p).size == (192, 192))


def _copy(files: list[Path], folder: Path, captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy(p, folder / p.name)
        if captions and p.with_suffix(".txt").exists():
            shutil.copy(p.with_suffix(".txt"), folder / f"{p.stem}.txt")
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- the class order -----------------------------------------------------------------------------


def _records() -> list[Record]:
    def rec(i: int, bucket, is_reg: bool, repeats: int = 1) -> Record:
        return Record(f"k{i}", f"c{i}", bucket, (0, 0), (64, 64), repeats, is_reg)

    inst = [rec(i, (64, 64), False) for i in range(4)]
    cls = [rec(4 + i, (64, 64), True) for i in range(5)]
    cls += [rec(9 + i, (72, 56), True, repeats=2) for i in range(2)]
    return inst + cls


def test_class_order_is_pure_one_bucket_class_only_and_sliced_like_instance_batches():
    recs = _records()
    cls = {i for i, r in enumerate(recs) if r.is_reg}
    # instance epochs never hold a class image; class epochs only class images
    for e in range(3):
        assert all(not set(b) & cls for b in epoch_batches(recs, 2, 7, e))
        assert all(set(b) <= cls for b in epoch_batches(recs, 2, 7, e, reg=True))
    order = ClassOrder(recs, 2, seed=7)
    # 5 square + 2×2 repeats of 72×56 at batch 2: 2 + 2 class batches per class-epoch
    assert order.per_epoch() == 4
    draws = [order.batch(n) for n in range(12)]
    for n, (idx, uid0) in enumerate(draws):
        assert len(idx) == 2 and set(idx) <= cls
        assert len({recs[i].bucket for i in idx}) == 1  # one bucket per class batch
        assert uid0 == CLASS_UID + 2 * n  # class noise never collides with instance samples
    # a pure function of n: another object, asked out of order (a resumed run), agrees
    fresh = ClassOrder(recs, 2, seed=7)
    assert [fresh.batch(n) for n in reversed(range(12))] == draws[::-1]
    assert [ClassOrder(recs, 2, seed=8).batch(n)[0] for n in range(12)] != [d[0] for d in draws]
    # each class-epoch shows every sample of a full batch once (repeats expanded)
    one_epoch = sorted(i for idx, _ in draws[:4] for i in idx)
    assert one_epoch.count(9) + one_epoch.count(10) == 4 and len(one_epoch) == 8
    # two processes at batch 1 see exactly the class batches one process sees at batch 2
    ranks = [ClassOrder(recs, 1, seed=7, world=2, rank=r) for r in range(2)]
    for n, (idx, uid0) in enumerate(draws):
        got = [ranks[r].batch(n) for r in range(2)]
        assert [g[0][0] for g in got] == idx
        assert [g[1] for g in got] == [uid0, uid0 + 1]


def test_class_captions_skip_the_trigger_and_batches_fit_separately(tmp_path):
    src = _copy(SQUARE[:3], tmp_path / "data")
    reg = _copy(SQUARE[3:6], tmp_path / "reg", captions=False)
    (reg / f"{SQUARE[3].stem}.txt").write_text("[trigger] a photo of a cup")
    (reg / f"{SQUARE[4].stem}.txt").write_text("tdwl style, a mug")  # (no caption for the third)
    d = DataConfig(
        resolution=64,
        workers=1,
        trigger="tdwl",
        reg_folder=str(reg),
        reg_caption="a photo of a mug",
    )
    ts = load_training_set(src, d, batch_size=3)
    inst = [r for r in ts.records if not r.is_reg]
    cls = [r for r in ts.records if r.is_reg]
    assert len(inst) == 3 and all(r.caption.startswith("tdwl style") for r in inst)
    # placeholder removed, the trigger never added, data.reg_caption where there is no caption
    assert sorted(r.caption for r in cls) == [
        "a photo of a cup",
        "a photo of a mug",
        "tdwl style, a mug",
    ]
    leak = [p for p in ts.problems if p.kind == "class_caption_trigger"]
    assert len(leak) == 1 and "contain the trigger 'tdwl'" in leak[0].message
    # 3 instance samples per epoch, one batch of 3: the class images do not count as samples
    assert ts.samples_per_epoch() == 3 and ts.steps_per_epoch(3) == 1
    assert ts.summary() == (
        "3 images × 1 repeat = 3 samples per epoch (+ 3 class images × 1 for prior preservation)"
    )
    # 2 instance + 3 class images at batch 3: the class images may not fill the instance batch
    two = _copy(SQUARE[:2], tmp_path / "two")
    with pytest.raises(cfg.ConfigError, match="has only 2 samples per epoch"):
        load_training_set(two, d, batch_size=3)


# -- the loss, every family ----------------------------------------------------------------------


def _expected_loss(c: cfg.Config, src: Path, weight: float) -> float:
    """Instance loss + weight × class loss of step 1, computed here from the records, the base
    model (the LoRA starts at zero), and the noise of instance sample 0 and class sample 0."""
    family, comps = load_model(c.model)
    spec = build_spec(c, family)
    ts = load_training_set(src, spec.data, 1, pixel_multiple=spec.pixel_multiple)
    inst = next(i for i, r in enumerate(ts.records) if not r.is_reg)
    cls = next(i for i, r in enumerate(ts.records) if r.is_reg)
    captions = sorted({r.caption for r in ts.records})  # one text batch, as the text cache
    with torch.no_grad():
        text = family.encode_prompts(comps, captions)
        total = 0.0
        for i, uid, w in ((inst, 0, 1.0), (cls, CLASS_UID, weight)):
            r = ts.records[i]
            lat = family.encode_images(comps, ts.pixels(i)[None]).float()
            j = captions.index(r.caption)
            cond = {k: v[j : j + 1] for k, v in text.items()}
            target = (r.bucket[1], r.bucket[0])
            extra = family.image_conditioning(comps, r.original_size, r.crop_top_left, target)
            cond.update({k: v.float() for k, v in extra.items()})
            noise, t = draw_noise(family, comps, lat, c, uid)
            den = getattr(comps, family.denoiser_name)
            total += w * float(family.loss(comps, den, lat, cond, noise, t, c.train))
    return total


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prior_loss_is_instance_loss_plus_weighted_class_loss(tmp_path, family):
    """One step of `train` on one instance image and one class image of another shape: the
    logged loss is the instance loss + λ × the class loss, computed here independently on the
    same noise (λ = 0.5: a λ left out or applied twice, a class batch missing, or class noise
    drawn as instance noise each give another number)."""
    from lorakit.train import train

    src = _copy(SQUARE[:1], tmp_path / "data")
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.open(SAMPLES / "tidewell_05.png").save(reg / "mug.png")  # 256×192: its own bucket
    sets = [
        f"model.name='tiny:{family}'", "train.steps=1", "train.batch_size=1",
        "train.optimizer='adamw'", "train.save_every=0", "sample.every=0", "train.log_every=1",
        "eval.images=0", "eval.palette_colors=0", f"train.out='{tmp_path / 'run'}'",
        f"data.reg_folder='{reg}'", "data.reg_caption='a photo of a mug'",
        "train.prior_weight=0.5",
    ]  # fmt: skip
    c = cfg.resolve(preset="tiny-cpu", sets=sets, flags={})
    torch.set_num_threads(1)
    result = train(c, src)
    assert result.adapters
    expected = _expected_loss(c, src, 0.5)
    assert result.losses[1] == pytest.approx(expected, rel=1e-5), (family, expected)


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_run_with_class_images_trains_and_names_them(tmp_path):
    src = _copy(SQUARE[:2], tmp_path / "data")
    reg = _copy(SQUARE[2:5], tmp_path / "reg", captions=False)
    before = _hashes(reg)
    out = tmp_path / "run"
    res = cli(
        "train", src, *FAST, "--out", out, "--steps", 2, "--set", "eval.images=0",
        "--set", f"data.reg_folder='{reg}'", "--set", "data.reg_caption='a photo of a mug'",
    )  # fmt: skip
    flat = " ".join(res.output.split())
    assert "2 samples per epoch (+ 3 class images × 1 for prior preservation)" in flat
    assert "→ 1 steps per epoch" in flat  # class images add no instance steps
    assert (out / "lorakit.safetensors").is_file()
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert _hashes(reg) == before  # class images are read, never written


def test_class_images_command_renders_resumes_and_is_seeded(tmp_path):
    folder = tmp_path / "reg"
    args = ["class-images", folder, "--prompt", "a photo of a mug", "--count", 2,
            "--preset", "tiny-cpu", "--set", "sample.steps=2", "--seed", 5]  # fmt: skip
    assert "Example" in cli("class-images", "--help").output
    res = cli(*args)
    assert "2 rendered now, 0 already there" in " ".join(res.output.split())
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt"]
    assert (folder / "class_00001.txt").read_text() == "a photo of a mug\n"
    with Image.open(folder / "class_00000.png") as im:
        assert im.size == (64, 64)  # data.resolution of the preset: the training bucket
    first = _hashes(folder)
    assert first["class_00000.png"] != first["class_00001.png"]  # seeds 5 and 6
    # a re-run renders nothing; a lost image comes back identical (image i: seed 5 + i)
    assert "0 rendered now, 2 already there" in " ".join(cli(*args).output.split())
    (folder / "class_00001.png").unlink()
    (folder / "class_00001.txt").unlink()
    cli(*args)
    assert _hashes(folder) == first
    # another prompt into the same folder is refused, nothing changes
    res = cli(*args[:3], "a photo of a cup", *args[4:], expect=1)
    assert "already exists, rendered for the prompt 'a photo of a mug'" in res.output
    assert _hashes(folder) == first


# -- the planner ---------------------------------------------------------------------------------


def test_plan_counts_the_class_batch(tmp_path):
    base = cli("plan", "--preset", "sd15-8gb").output
    prior = cli("plan", "--preset", "sd15-8gb", "--set", f"data.reg_folder='{tmp_path}'").output
    assert "denoiser passes per micro-batch: 1 forward, 0 forward without grad, 1 backward" in base
    assert "denoiser passes per micro-batch: 2 forward, 0 forward without grad, 2 backward" in (
        prior
    )
    assert "class batch tensors (prior preservation)" in prior and "class batch" not in base
    line = lambda text, key: next(x for x in text.splitlines() if x.strip().startswith(key))  # noqa: E731
    # the class graph runs after the instance backward: the activation peak stays one batch's
    assert line(base, "activations") == line(prior, "activations")
    assert "prior preservation, train.prior_weight = 1" in " ".join(prior.split())


# -- refusals ------------------------------------------------------------------------------------


def _refused(tmp_path, reg: Path | str, *sets: str, expect: int = 1) -> str:
    src = tmp_path / "data"
    if not src.exists():
        _copy(SQUARE[:2], src)
    before = _hashes(src)
    out = tmp_path / "run"
    res = cli(
        "train", src, *FAST, "--out", out, "--steps", 1,
        "--set", f"data.reg_folder='{reg}'", *sets, expect=expect,
    )  # fmt: skip
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert not out.exists(), "nothing may be written when refusing"
    assert _hashes(src) == before
    text = " ".join(res.output.split())
    assert text.count("error:") == 1
    return text


def test_missing_or_empty_reg_folder_says_how_to_make_class_images(tmp_path):
    text = _refused(tmp_path, tmp_path / "nowhere", "--set", "data.reg_caption='a photo of a mug'")
    assert "does not exist" in text
    assert f"lorakit class-images {tmp_path / 'nowhere'} --prompt 'a photo of a mug'" in text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    text = _refused(tmp_path, tmp_path / "empty")
    assert "holds no class images" in text and "lorakit class-images" in text


def test_unreadable_class_images_are_refused_and_named(tmp_path):
    reg = _copy(SQUARE[2:4], tmp_path / "reg")
    (reg / "broken.png").write_bytes(Image.open(SQUARE[4]).tobytes()[:500])  # not an image
    (reg / "cut.png").write_bytes(SQUARE[5].read_bytes()[:300])  # a truncated PNG
    (reg / "empty.jpg").write_bytes(b"")
    before = _hashes(reg)
    text = _refused(tmp_path, reg)
    assert "3 class image file(s)" in text and "cannot be used" in text
    assert all(f"'{name}'" in text for name in ("broken.png", "cut.png", "empty.jpg"))
    # `lorakit prepare --reg` refuses them too (found while decoding), and writes no OUT
    dest = tmp_path / "prepared"
    res = cli("prepare", tmp_path / "data", dest, "--preset", "tiny-cpu", "--reg", reg, expect=1)
    flat = " ".join(res.output.split())
    assert "class image file(s) in data.reg_folder" in flat and "'cut.png'" in flat
    assert not dest.exists()
    assert _hashes(reg) == before


def test_reg_folder_overlapping_the_data_folder_is_refused(tmp_path):
    src = _copy(SQUARE[:2], tmp_path / "data")
    _copy(SQUARE[2:4], src / "class")
    for reg, how in ((src, "is the data folder"), (src / "class", "lies inside the data folder"),
                     (tmp_path, "holds the data folder")):  # fmt: skip
        text = _refused(tmp_path, reg, expect=2)
        assert f"data.reg_folder '{reg}' {how} '{src}'" in text


def test_bad_prior_keys_are_refused(tmp_path):
    reg = _copy(SQUARE[2:4], tmp_path / "reg")
    text = _refused(tmp_path, reg, "--set", "train.prior_weight=0", expect=2)
    assert "'train.prior_weight' = 0" in text and "data.reg_folder=''" in text
    text = _refused(tmp_path, reg, "--set", "train.prior_weight=-1", expect=2)
    assert "must be 0 or more" in text
    text = _refused(tmp_path, reg, "--set", "data.reg_caption='tdwl mug'", expect=2)
    assert "contains the trigger 'tdwl'" in text
    from lorakit.distributed import distributed_problem  # (two backward passes per micro-batch)

    c = cfg.resolve(sets=[f"data.reg_folder='{reg}'", "train.optimizer='adamw'"], flags={})
    for name in ("FSDP", "DeepSpeed"):
        assert "data.reg_folder (prior preservation" in distributed_problem(c, name)
    keys = cli("config", "--keys").output
    for key in ("data.reg_folder", "data.reg_caption", "data.reg_repeats", "train.prior_weight"):
        assert key in keys


@pytest.mark.slow  # ~4 s: three runs
def test_resumed_run_draws_the_same_class_batches(tmp_path):
    """A run stopped at a checkpoint and resumed gives the adapter of an uninterrupted run:
    the class order needs no checkpoint state (grad_accum 2 and 3 class images: the class order
    wraps into its second class-epoch within the run)."""
    from safetensors.torch import load_file

    src = _copy(SQUARE[:2], tmp_path / "data")
    reg = _copy(SQUARE[2:5], tmp_path / "reg", captions=False)
    args = [*FAST, "--set", "eval.images=0", "--set", "train.batch_size=1",
            "--set", "train.grad_accum=2", "--set", "train.save_every=2"]  # fmt: skip
    plain = list(args)
    args += ["--set", f"data.reg_folder='{reg}'"]
    cli("train", src, *args, "--out", tmp_path / "straight", "--steps", 4)
    cli("train", src, *args, "--out", tmp_path / "stopped", "--steps", 2)
    cli("train", src, *args, "--out", tmp_path / "stopped", "--steps", 4, "--resume", "latest")
    a = load_file(tmp_path / "straight" / "lorakit.safetensors")
    b = load_file(tmp_path / "stopped" / "lorakit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the class images matter: without them the adapter differs
    cli("train", src, *plain, "--out", tmp_path / "plain", "--steps", 4)
    c = load_file(tmp_path / "plain" / "lorakit.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
