"""`lorakit caption` and data.caption_missing = "model", with tiny random-weight captioners
(BLIP, Florence-2, Qwen2.5-VL) saved as local folders: the captions are gibberish, so these tests
check the mechanics — which file gets which caption, batching, trigger, resume, refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image

from lorakit import caption as cap_mod
from lorakit.caption import caption_folder
from lorakit.caption.captioners import load_captioner, open_image
from lorakit.caption.tiny import save_tiny
from lorakit.config import DataConfig
from lorakit.data.folder import apply_trigger

TRIGGER = "tdwl"
TOKENS = 6  # --max-new-tokens: short gibberish is enough and keeps generation fast


@pytest.fixture(scope="session")
def tiny_captioners(tmp_path_factory):
    """kind → a local folder written by `save_tiny` (built once, on first use)."""
    root = tmp_path_factory.mktemp("captioners")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = save_tiny(kind, root / kind)
        return built[kind]

    return get


@pytest.fixture
def blip(tiny_captioners) -> Path:
    return tiny_captioners("blip")


def photos(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Random-noise PNGs of different sizes (different images must get different captions)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (40 + 12 * (i % 4), 48 + 8 * (i % 3), 3)
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `folder`: bytes, mtime (ns) and inode — a rewrite changes the last two."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_by_one(model: Path, images: list[Path], prompt: str = "") -> list[str]:
    """What the captioner says about each image on its own (batch of one), trigger put in."""
    cap = load_captioner(str(model), prompt=prompt, max_new_tokens=TOKENS, device="cpu")
    return [apply_trigger(cap.caption([open_image(p, p.name)])[0], TRIGGER) for p in images]


def test_caption_writes_missing_keeps_existing_and_puts_the_trigger_first(blip, tmp_path):
    data = tmp_path / "data"
    imgs = photos(data, ["a.png", "b.png", "c.png", "d.jpg", "sub/e.png"])
    (data / "b.txt").write_text("my own caption\n", encoding="utf-8")
    (data / "c.txt").write_text("", encoding="utf-8")  # empty = no caption, as prepare reads it
    kept = snapshot(data)["b.txt"]

    r = cli("caption", data, "--model", blip, "--trigger", TRIGGER, "--batch-size", 3,
            "--max-new-tokens", TOKENS)  # fmt: skip

    assert "wrote 4 caption(s), kept 1 existing" in " ".join(r.output.split())
    assert snapshot(data)["b.txt"] == kept  # not rewritten: same bytes, mtime and inode
    want = one_by_one(blip, [p for p in imgs if p.name != "b.png"])
    got = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in imgs if p.name != "b.png"]
    assert got == [w + "\n" for w in want]  # batched as 3 + 1 = each image alone, in its file
    assert len(set(want)) == len(want), "tiny captioner gave equal captions: test is blind"
    assert all(w.startswith(f"{TRIGGER}, ") and "\n" not in w for w in want)


@pytest.mark.parametrize("kind", ["florence2", "qwen2_vl", "qwen2_5_vl"])
def test_batched_captions_equal_one_by_one(tiny_captioners, tmp_path, kind):
    """Florence-2 (encoder-decoder, task token) and Qwen2.5-VL (chat template, left padding,
    image token counts that differ per image size) batch exactly like single images."""
    model = tiny_captioners(kind)
    data = tmp_path / "data"
    imgs = photos(data, ["a.png", "b.png", "c.png"], seed=1)
    data_cfg = DataConfig(caption_model=str(model), trigger=TRIGGER)
    run = caption_folder(data, data_cfg, batch_size=3, max_new_tokens=TOKENS, device="cpu")
    got = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in imgs]
    want = one_by_one(model, imgs)
    assert got == [w + "\n" for w in want]
    assert len(set(want)) == 3
    assert [e.action for e in run.entries] == ["write"] * 3


def _stop_after(monkeypatch, n: int) -> list[str]:
    """Make the n+1-th caption write raise KeyboardInterrupt (Ctrl-C while captioning);
    returns the list of images written."""
    real = cap_mod._write_caption
    written: list[str] = []

    def write(entry, journal):
        if len(written) == n:
            raise KeyboardInterrupt
        real(entry, journal)
        written.append(entry.name)

    monkeypatch.setattr(cap_mod, "_write_caption", write)
    return written


def _record(monkeypatch) -> list[str]:
    real = cap_mod._write_caption
    written: list[str] = []

    def write(entry, journal):
        real(entry, journal)
        written.append(entry.name)

    monkeypatch.setattr(cap_mod, "_write_caption", write)
    return written


def test_a_stopped_run_resumes_where_it_stopped(blip, tmp_path, monkeypatch):
    data = tmp_path / "data"
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    photos(data, names)
    (data / "c.txt").write_text("my own caption\n", encoding="utf-8")
    args = ["caption", data, "--model", blip, "--trigger", TRIGGER, "--batch-size", 2,
            "--max-new-tokens", TOKENS]  # fmt: skip

    r = cli(*args, "--limit", 1)  # a first look at one image
    assert "4 left for the next run (--limit)" in " ".join(r.output.split())
    assert sorted(p.name for p in data.glob("*.txt")) == ["a.txt", "c.txt"]

    with monkeypatch.context() as m:
        first = _stop_after(m, 2)  # Ctrl-C in the middle of the second batch
        r = cli(*args, expect=130)
    assert "run the same command again" in r.output
    assert first == ["b.png", "d.png"]
    before = snapshot(data)
    assert sorted(p for p in before if p.endswith(".txt")) == ["a.txt", "b.txt", "c.txt", "d.txt"]

    second = _record(monkeypatch)
    r = cli(*args)
    assert second == ["e.png", "f.png"]  # only what was left; nothing captioned twice
    after = snapshot(data)
    assert all(after[k] == v for k, v in before.items())  # earlier files untouched
    assert sorted(p for p in after if p.endswith(".txt")) == [n[0] + ".txt" for n in names]
    assert after["c.txt"][0] == b"my own caption\n"
    assert "kept 4 existing" in " ".join(r.output.split())
    assert not (data / cap_mod.JOURNAL).exists()


def test_an_overwrite_run_resumes_from_its_journal(blip, tmp_path, monkeypatch):
    data = tmp_path / "data"
    names = ["a.png", "b.png", "c.png", "d.png"]
    photos(data, names)
    for n in names:
        (data / n).with_suffix(".txt").write_text("old caption\n", encoding="utf-8")
    args = ["caption", data, "--model", blip, "--trigger", TRIGGER, "--overwrite",
            "--batch-size", 2, "--max-new-tokens", TOKENS]  # fmt: skip

    with monkeypatch.context() as m:
        _stop_after(m, 3)
        cli(*args, expect=130)
    assert (data / cap_mod.JOURNAL).is_file()
    before = snapshot(data)
    assert [before[n[0] + ".txt"][0] == b"old caption\n" for n in names] == [0, 0, 0, 1]

    second = _record(monkeypatch)
    r = cli(*args)
    assert second == ["d.png"]  # the three replaced before the stop are not redone
    after = snapshot(data)
    assert all(after[n[0] + ".txt"] == before[n[0] + ".txt"] for n in names[:3])
    assert after["d.txt"][0].startswith(f"{TRIGGER}, ".encode())
    assert "3 done by the stopped run" in " ".join(r.output.split())
    assert not (data / cap_mod.JOURNAL).exists()  # finished: the journal is gone

    # a journal of other settings (another prompt) does not skip anything
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        cli(*args, expect=130)
    third = _record(monkeypatch)
    cli(*args, "--prompt", "a photo of")
    assert third == ["a.png", "b.png", "c.png", "d.png"]
    assert all(
        (data / n).with_suffix(".txt").read_text().startswith(f"{TRIGGER}, a photo of")
        for n in names
    )


def test_dry_run_prints_a_table_and_writes_nothing(blip, tmp_path):
    data = tmp_path / "data"
    photos(data, ["a.png", "b.png", "c.png"])
    (data / "b.txt").write_text("own words\n", encoding="utf-8")
    before = snapshot(data)

    r = cli("caption", data, "--model", blip, "--trigger", TRIGGER, "--dry-run",
            "--max-new-tokens", TOKENS)  # fmt: skip
    assert snapshot(data) == before
    text = r.output
    for word in ("image", "existing caption", "proposed caption", "action", "a.png", "c.png",
                 "own words", "keep", "write", "would write 2 caption(s)"):  # fmt: skip
        assert word in text, word

    # the proposals are what a real run writes
    data_cfg = DataConfig(caption_model=str(blip), trigger=TRIGGER)
    dry = caption_folder(data, data_cfg, dry_run=True, max_new_tokens=TOKENS, device="cpu")
    assert snapshot(data) == before
    cli("caption", data, "--model", blip, "--trigger", TRIGGER, "--max-new-tokens", TOKENS)
    for e in dry.entries:
        if e.action == "write":
            assert e.sidecar.read_text(encoding="utf-8") == e.proposed + "\n"


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return str(folder)


def _pickle_only(folder: Path) -> str:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return str(folder)


def _unknown_type(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return str(folder)


BAD_MODELS = {
    "no weights": (_no_weights, ["holds no weights", "model.safetensors"]),
    "pickle only": (_pickle_only, ["only pickled weights", "pytorch_model.bin", "--allow-pickle"]),
    "unknown model type": (_unknown_type, ["'gpt2' model", "blip (BLIP)", "qwen2_5_vl"]),
    "unknown tiny": (lambda f: "tiny:llava", ["tiny:blip", "tiny:qwen2_5_vl"]),
    "not a model": (lambda f: str(f.parent / "nowhere" / "x"), ["neither a folder nor a hub id"]),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_bad_captioner_is_refused_in_one_paragraph_with_nothing_written(blip, tmp_path, case):
    make, phrases = BAD_MODELS[case]
    folder = tmp_path / "model"
    shutil.copytree(blip, folder)
    model = make(folder)
    data = tmp_path / "data"
    photos(data, ["a.png", "b.png"])
    before = snapshot(data)
    r = cli("caption", data, "--model", model, expect=1)
    msg = " ".join(r.output.split())
    assert all(p in msg for p in phrases), msg
    assert "Traceback" not in r.output and r.output.strip().count("\n\n") == 0
    assert snapshot(data) == before


def test_pickled_weights_load_with_consent(blip, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(blip, folder)
    _pickle_only(folder)
    data = tmp_path / "data"
    imgs = photos(data, ["a.png", "b.png"])
    cli("caption", data, "--model", folder, "--trigger", TRIGGER, "--allow-pickle",
        "--max-new-tokens", TOKENS)  # fmt: skip
    got = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in imgs]
    assert got == [w + "\n" for w in one_by_one(blip, imgs)]  # the same weights


def test_bad_images_and_sources_are_refused_with_nothing_written(blip, tmp_path):
    data = tmp_path / "data"
    photos(data, ["a.png", "b.png", "c.png"])
    (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    before = snapshot(data)
    # one image per batch: without the check up front, a.png would be captioned before b.png
    r = cli("caption", data, "--model", blip, "--batch-size", 1, expect=1)
    msg = " ".join(r.output.split())
    assert "Image 'b.png' cannot be read" in msg and "nothing was written" in msg
    assert snapshot(data) == before  # a.png and c.png were fine, and still got nothing

    (data / "c.png").write_bytes(b"")
    msg = " ".join(cli("caption", data, "--model", blip, expect=1).output.split())
    assert "2 images cannot be read ('b.png', 'c.png'" in msg

    meta = tmp_path / "meta"
    photos(meta, ["a.png"])
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    msg = " ".join(cli("caption", meta, "--model", blip, expect=1).output.split())
    assert "imagefolder source" in msg and 'data.caption_missing = "model"' in msg
    msg = " ".join(cli("caption", data, expect=1).output.split())
    assert "No captioner named" in msg and "--model" in msg


def test_a_prompt_the_model_refuses_stops_before_any_caption_is_written(tiny_captioners, tmp_path):
    data = tmp_path / "data"
    photos(data, ["a.png", "b.png"])
    model = tiny_captioners("florence2")
    r = cli("caption", data, "-m", model, "--prompt", "<CAPTION> of a cup", expect=1)
    msg = " ".join(r.output.split())
    assert "refused the prompt '<CAPTION> of a cup'" in msg and "--prompt" in msg
    assert not list(data.glob("*.txt"))


def test_a_captioner_out_of_gpu_memory_is_one_paragraph(blip, tmp_path, monkeypatch):
    import torch

    from lorakit.caption.captioners import Captioner

    def oom(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Captioner, "_encoder_decoder", oom)
    data = tmp_path / "data"
    photos(data, ["a.png", "b.png"])
    msg = " ".join(cli("caption", data, "-m", blip, "--batch-size", 2, expect=1).output.split())
    assert "ran out of memory captioning a batch of 2 image(s)" in msg and "--batch-size 1" in msg
    assert "Traceback" not in msg and not list(data.glob("*.txt"))


def test_prepare_captions_images_without_one_and_caches_them(blip, tmp_path, monkeypatch):
    from lorakit.data import prepare as prep
    from lorakit.data.training import load_training_set

    src = tmp_path / "src"
    imgs = photos(src, ["a.png", "b.png", "c.png"])
    (src / "b.txt").write_text("own words\n", encoding="utf-8")
    before = snapshot(src)
    data = DataConfig(resolution=64, trigger=TRIGGER, workers=1, caption_missing="model",
                      caption_model=str(blip), near_duplicate_distance=-1)  # fmt: skip
    monkeypatch.setattr(cap_mod, "MAX_NEW_TOKENS", TOKENS)
    p = prep.prepare(src, tmp_path / "out", data)
    assert not p.fatal
    want = dict(zip(["a.png", "c.png"], one_by_one(blip, [imgs[0], imgs[2]]), strict=True))
    want["b.png"] = f"{TRIGGER}, own words"
    assert {r["source"]: r["caption"] for r in p.rows} == want
    assert p.notes["captioned by data.caption_model"] == 2
    assert [(x.file, x.kind) for x in p.problems] == [("b.png", "trigger_missing")]
    assert snapshot(src) == before  # nothing written next to the images
    ts = load_training_set(src, data, 1)  # train's in-memory path: the same captions
    assert sorted(r.caption for r in ts.records) == sorted(want.values())

    def no_model(*a, **k):
        raise AssertionError("captioner loaded although every caption is cached")

    monkeypatch.setattr(cap_mod, "load_captioner", no_model)
    again = prep.prepare(src, tmp_path / "out", data)  # captions come from the marker
    assert {r["source"]: r["caption"] for r in again.rows} == want
    data.caption_prompt = "a photo of"  # another prompt is another caption: not from the cache
    with pytest.raises(AssertionError, match="captioner loaded"):
        prep.prepare(src, tmp_path / "out", data)
    # a set that cannot train (3 images, batches of 8) stops before any captioner is loaded
    assert "cannot fill" in prep.build(src, data, batch_size=8).fatal


def test_caption_missing_model_needs_a_captioner():
    from lorakit import config as cfg
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.caption_model is empty"):
        cfg.resolve(preset="tiny-cpu", sets=["data.caption_missing='model'"])
    c = cfg.resolve(preset="tiny-cpu", sets=["data.caption_missing='model'",
                                             "data.caption_model='tiny:blip'"])  # fmt: skip
    assert c.data.caption_model == "tiny:blip"


def test_caption_help_has_an_example():
    out = cli("caption", "--help").output
    assert "Example" in out and "lorakit caption" in out and "--dry-run" in out


@pytest.mark.slow  # two tiny training runs: 4-10 s on 2 cores
def test_train_captions_uncaptioned_images_and_resumes_on_the_same_captions(blip, tmp_path):
    """`lorakit train` with data.caption_missing = "model" and no cache: the run trains on the
    captioner's captions (none written next to the images), and `--resume latest` captions
    again in memory and gets the same captions, so the data set matches the checkpoint's."""
    from conftest import FAST

    from lorakit import checkpoint as ckpt

    data = tmp_path / "data"
    imgs = photos(data, ["a.png", "b.png", "c.png", "d.png"])
    before = snapshot(data)
    out = tmp_path / "run"
    args = ["train", data, *FAST, "--out", out, "--trigger", TRIGGER,
            "--set", "data.caption_missing='model'", "--set", f"data.caption_model='{blip}'",
            "--set", "train.save_every=2", "--set", "data.bucketing=false",
            "--set", "eval.images=0"]  # fmt: skip
    cli(*args, "--steps", 2)
    assert snapshot(data) == before
    marker = json.loads((ckpt.step_dir(out, 2) / ckpt.MARKER).read_text(encoding="utf-8"))
    cap = load_captioner(str(blip), max_new_tokens=cap_mod.MAX_NEW_TOKENS, device="cpu")
    want = [apply_trigger(cap.caption([open_image(p, p.name)])[0], TRIGGER) for p in imgs]
    digests = {hashlib.sha256(w.encode()).hexdigest()[:16] for w in want}  # resume.py's record
    assert {row[1] for row in marker["data"]} == digests
    r = cli(*args, "--steps", 4, "--resume", "latest")
    assert "resuming from" in r.output
