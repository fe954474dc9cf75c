"""The run folder (issue #16): one run at a time (a lock naming the holder's PID), never inside
the data, writability checked before anything loads, a dead run's `.partial` never blocks a
new run, and a full disk named with the path and the free space."""

from __future__ import annotations

import errno
import os
import shutil

from conftest import FAST, SAMPLES, cli

from lorakit import checkpoint as ckpt


def test_a_second_run_into_a_held_folder_stops_naming_the_pid(tmp_path):
    """Item 2: two runs into one --out both exited 0, the folder held only the second's files."""
    from lorakit.resume import LOCK, mark_holder, run_lock

    out = tmp_path / "run"
    with run_lock(out, SAMPLES):  # a live run holds the folder (another open file: flock)
        mark_holder(out)
        r = cli("train", SAMPLES, *FAST, "--out", out, "--steps", 1, expect=2)
        text = " ".join(r.output.split())
        assert f"in use by another lorakit run (PID {os.getpid()})" in text, text
        assert not (out / "config.toml").exists()  # nothing of the second run was written
    # released (as on any exit of the holder, SIGKILL included: the kernel drops flocks)
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 1)
    assert (out / LOCK).read_text().strip() == str(os.getpid())  # the last holder, now gone


def test_out_inside_the_data_folder_is_refused(tmp_path):
    """Item 6: the next run would have trained on this run's preview grids."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    r = cli("train", data, *FAST, "--out", data / "run", "--steps", 1, expect=2)
    assert "overlap" in r.output and not (data / "run").exists()
    r = cli("train", data / "..", *FAST, "--out", tmp_path, "--steps", 1, expect=2)
    assert "overlap" in r.output


def test_an_unwritable_out_fails_first_in_one_paragraph(tmp_path):
    """Item 10: it failed late (after loading data and model) with "internal error"."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = cli("train", SAMPLES, *FAST, "--out", blocker / "run", "--steps", 1, expect=2)
    text = " ".join(r.output.split())
    assert "cannot be written" in text and "--out" in text, text
    assert "internal error" not in text and "images" not in text  # before the data was read


def test_a_dead_runs_partial_checkpoint_never_blocks_a_new_run(tmp_path):
    """Item 8: after an abort during the first checkpoint, `--resume latest` said "start a new
    run", and the new run was refused because of the leftover `.partial`."""
    out = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 1)
    for p in [*out.glob("*.safetensors"), out / "diffusers"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    torn = ckpt.partial_dir(out, 2)
    torn.mkdir(parents=True)
    (torn / "state.json").write_text("{")  # killed mid-write
    r = cli("train", SAMPLES, *FAST, "--out", out, "--steps", 2, "--resume", "latest", expect=1)
    assert "no complete checkpoint" in r.output and "Start a new run" in r.output
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 2)  # the new run: no --overwrite
    assert not torn.exists() and (out / "lorakit.safetensors").is_file()


def test_a_full_disk_anywhere_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    """Item 10: a full disk outside the checkpoint save gave "internal error: OSError Errno 28"
    with no path."""
    import lorakit.fileio as fileio

    run = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--out", run, "--steps", 1)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    target = tmp_path / "exported"
    r = cli("export", run, "--format", "diffusers", "--out", target, expect=1)
    text = " ".join(r.output.split())
    assert "The disk is full" in text and "GiB free there now" in text, text
    assert "exported" in text and "internal error" not in text, text
    assert not [p for p in target.rglob("*") if p.is_file()], "nothing half-written is kept"
