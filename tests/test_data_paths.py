"""A metadata file may only list images inside the data folder: an absolute `file_name` gave
"internal error" (ValueError), and `../` names were silently read from outside SRC."""

from __future__ import annotations

import json

from PIL import Image

from lorakit import config as cfg
from lorakit.data.layouts import list_source


def test_metadata_rows_pointing_outside_the_folder_are_refused_naming_the_line(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "elsewhere.png"
    src.mkdir()
    Image.new("RGB", (64, 64), "red").save(src / "in.png")
    Image.new("RGB", (64, 64), "blue").save(outside)
    rows = [
        {"file_name": "in.png", "text": "inside"},
        {"file_name": str(outside), "text": "absolute"},
        {"file_name": "../elsewhere.png", "text": "dot-dot"},
    ]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    listing = list_source(src, cfg.resolve(preset="tiny-cpu").data)
    assert [i.name for i in listing.items] == ["in.png"]
    bad = {p.file: p for p in listing.problems if p.kind == "bad_metadata"}
    assert set(bad) == {"metadata.jsonl:2", "metadata.jsonl:3"}
    assert all(
        p.severity == "error" and "outside the data folder" in p.message for p in bad.values()
    )


def test_a_gif_is_prepared_from_its_first_frame(tmp_path):
    from conftest import cli

    from lorakit.data import prepare as prep

    src = tmp_path / "src"
    src.mkdir()
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (64, 64), colour).save(src / f"still_{i}.png")
        (src / f"still_{i}.txt").write_text("a still")
    frames = [Image.new("RGB", (64, 64), c) for c in ("blue", "yellow", "white")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    (src / "anim.txt").write_text("an animation")
    out = tmp_path / "set"
    cli("prepare", src, out, "--set", "data.resolution=64")
    rows = {r["source"]: r for r in prep.load_prepared(out)}
    assert "anim.gif" in rows, sorted(rows)
    report = json.loads((out / "report.json").read_text())
    assert report["normalised"].get("animated: first frame used") == 1
    import io

    with Image.open(io.BytesIO(rows["anim.gif"]["png"])) as im:
        r, g, b = im.convert("RGB").getpixel((32, 32))
        assert b > 150 and r < 100 and g < 100  # the blue first frame, not yellow or white


def _small_set(tmp_path, sizes):
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 90, 200)).save(src / f"img_{i}.png")
        (src / f"img_{i}.txt").write_text(f"picture {i}")
    return src


def test_a_batch_larger_than_the_whole_set_gets_one_straight_answer(tmp_path):
    """The advice went in circles: it offered `small_buckets=merge` (already set), then `drop`,
    which answered "see the problems listed above" with nothing listed."""
    from conftest import cli

    src = _small_set(tmp_path, [(64, 64), (64, 96), (96, 64)])
    for mode in ("merge", "drop"):
        r = cli(
            "prepare", src, tmp_path / f"set-{mode}", "--batch-size", 4,
            "--set", "data.resolution=64", "--set", f"data.small_buckets={mode}", expect=None,
        )  # fmt: skip
        assert r.exit_code != 0, r.output
        text = " ".join(r.output.split())
        assert "only 3 samples" in text and "--set train.batch_size=3" in text, text
        assert "small_buckets=" not in text and "listed above" not in text, text
        assert "Traceback" not in r.output


def test_bucket_advice_does_not_offer_the_choice_already_made(tmp_path):
    from conftest import cli

    # 2 + 1 + 1 samples, batch 2: enough in all, but two buckets cannot fill a batch alone
    src = _small_set(tmp_path, [(64, 64), (64, 64), (64, 128), (128, 64)])
    r = cli(
        "prepare", src, tmp_path / "set", "--batch-size", 2, "--set", "data.resolution=64",
        "--set", "data.small_buckets=error", expect=None,
    )  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "cannot fill one batch" in text, text
    assert "small_buckets=merge" in text and "small_buckets=drop" in text
    # three shapes, one image each: every bucket is dropped
    src3 = _small_set(tmp_path / "three", [(64, 64), (64, 128), (128, 64)])
    r = cli(
        "prepare", src3, tmp_path / "set2", "--batch-size", 2, "--set", "data.resolution=64",
        "--set", "data.small_buckets=drop", expect=None,
    )  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "Every aspect-ratio bucket" in text, text
    assert "small_buckets=merge" in text and "listed above" not in text, text
