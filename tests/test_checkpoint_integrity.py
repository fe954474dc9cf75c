"""A damaged checkpoint is named and the last good one found (issue #16, item 7): a truncated
`state.safetensors` or a `state.json` missing keys gave "internalerror", and a bit-flipped
state resumed silently. Every checkpoint's COMPLETE marker now records a sha256 per file."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FAST, SAMPLES, cli
from safetensors import safe_open

from lorakit import checkpoint as ckpt


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "run"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 4, "--set", "train.save_every=2")
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4]
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the tensor data
    path.write_bytes(bytes(data))


def test_markers_record_a_checksum_of_every_file(two_checkpoints):
    for _, folder in ckpt.complete_checkpoints(two_checkpoints):
        marker = json.loads((folder / "COMPLETE").read_text())
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(marker["files"]) == on_disk - {"COMPLETE"}
        assert ckpt.damage(folder) == ""


def test_resume_latest_passes_over_a_bit_flip_and_says_so(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    _flip_byte(run / "checkpoints/step-000004/state.safetensors")
    r = cli("train", SAMPLES, *FAST, "--out", run, "--steps", 6, "--resume", "latest")
    text = "".join(r.output.split())  # paths wrap at the console width
    assert "step-000004'isdamaged" in text and "state.safetensors" in text, text
    assert "Resumingfrom" in text and "step-000002" in text, text
    with safe_open(str(run / "lorakit.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"


def test_an_explicitly_named_damaged_checkpoint_is_refused_naming_a_good_one(
    two_checkpoints, tmp_path
):
    run = _copy(two_checkpoints, tmp_path)
    bad = run / "checkpoints/step-000004"
    _flip_byte(bad / "state.safetensors")
    r = cli("train", SAMPLES, *FAST, "--out", run, "--steps", 6, "--resume", bad, expect=None)
    text = "".join(r.output.split())  # paths wrap at the console width
    assert r.exit_code != 0 and "internalerror" not in text, text
    assert "state.safetensors" in text and "step-000002" in text, text


@pytest.mark.parametrize("damage", ["truncated", "missing_key"])
def test_unverifiable_damage_is_one_paragraph_not_an_internal_error(
    two_checkpoints, tmp_path, damage
):
    """Checkpoints written before checksums existed have none to check: reading them must
    still fail in one paragraph that names the folder and the good checkpoint."""
    run = _copy(two_checkpoints, tmp_path)
    bad = run / "checkpoints/step-000004"
    marker = json.loads((bad / "COMPLETE").read_text())
    marker.pop("files", None)
    (bad / "COMPLETE").write_text(json.dumps(marker))
    if damage == "truncated":
        state = bad / "state.safetensors"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        doc = json.loads((bad / "state.json").read_text())
        del doc["position"]
        (bad / "state.json").write_text(json.dumps(doc))
    r = cli("train", SAMPLES, *FAST, "--out", run, "--steps", 6, "--resume", "latest",
            expect=None)  # fmt: skip
    text = "".join(r.output.split())  # paths wrap at the console width
    assert r.exit_code != 0 and "internalerror" not in text, text
    assert "step-000004'cannotberead" in text and "step-000002" in text, text


def test_the_run_folder_resumes_however_it_is_spelled_or_moved(two_checkpoints, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """Issue #16 item 3: `--out runs/x/`, `./runs/x`, an absolute path or a moved run folder
    were refused ("the config differs in train.out")."""
    moved = _copy(two_checkpoints, tmp_path)  # a moved run folder
    monkeypatch.chdir(tmp_path)
    for spelling, steps in (("run/", 5), ("./run", 6), (str(moved.resolve()), 7)):
        r = cli("train", SAMPLES, *FAST, "--out", spelling, "--steps", steps, "--resume",
                "latest", "--set", "train.save_every=1", "--set", "train.keep_last=0")  # fmt: skip
        assert f"step {steps}/{steps}" in r.output, r.output


def test_resume_past_train_steps_is_refused(two_checkpoints, tmp_path):
    """Issue #16 item 4: `--resume latest --steps 3` on a step-4 checkpoint exited 0 and wrote
    the step-4 weights labelled ss_steps=3."""
    run = _copy(two_checkpoints, tmp_path)
    before = (run / "lorakit.safetensors").read_bytes()
    r = cli("train", SAMPLES, *FAST, "--out", run, "--steps", 3, "--resume", "latest",
            expect=2)  # fmt: skip
    text = "".join(r.output.split())
    assert "itisatstep4,pasttrain.steps=3" in text and "--steps" in text, text
    assert (run / "lorakit.safetensors").read_bytes() == before  # nothing rewritten


def test_resume_stops_when_the_data_set_changed(tmp_path):
    """Item 5: an image added after the checkpoint was accepted without a word."""
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    out = tmp_path / "run"
    cli("train", data, *FAST, "--out", out, "--steps", 2, "--set", "train.save_every=2")
    Image.new("RGB", (96, 80), (200, 30, 90)).save(data / "new_one.png")
    (data / "new_one.txt").write_text("a new picture")
    r = cli("train", data, *FAST, "--out", out, "--steps", 3, "--resume", "latest", expect=2)
    text = " ".join(r.output.split())
    assert "data set differs" in text and "1 image(s) new or changed" in text, text
    assert "--set train.resume_changed_data=true" in text
    r = cli("train", data, *FAST, "--out", out, "--steps", 3, "--resume", "latest",
            "--set", "train.resume_changed_data=true")  # fmt: skip
    text = " ".join(r.output.split())
    assert "no longer bit-identical" in text and "step 3/3" in text, text
