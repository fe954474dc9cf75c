"""`kill -9` of `prepare` left its decode workers running (hung, ~300 MB each) and a
`lorakit-prepare-*` folder in the temp directory; workers now die with their parent and the
next run removes folders of dead processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow  # kill-based, ~20 s
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_of_prepare_leaves_no_workers_and_no_temp_folder(tmp_path):
    src, tmp = tmp_path / "src", tmp_path / "tmp"
    src.mkdir()
    tmp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):  # noise PNGs: slow enough to decode that workers are busy when killed
        Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(src / f"{i}.png")
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorakit", "prepare", str(src), str(tmp_path / "set")]
    proc = subprocess.Popen(
        [*cmd, "--set", "data.workers=2"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 2 and list(tmp.glob("lorakit-prepare-*")) == []:
        assert proc.poll() is None and time.monotonic() < deadline, "workers never started"
        time.sleep(0.05)
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "workers never started"
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and _state(w) != "Z"]
    assert not alive, f"workers {alive} outlived their killed parent"
    assert list(tmp.glob("lorakit-prepare-*")), "the killed run's spool folder (precondition)"
    # the next run cleans up after the dead one
    small = tmp_path / "small"
    small.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (9 * i, 0, 0)).save(small / f"{i}.png")
    cmd = [sys.executable, "-m", "lorakit", "prepare", str(small), str(tmp_path / "set2")]
    subprocess.run([*cmd, "--set", "data.resolution=64"], env=env, check=True, capture_output=True)
    assert list(tmp.glob("lorakit-prepare-*")) == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_tiny_tokenizers_leave_no_temp_folders(tmp_path, monkeypatch):
    """Each `tiny-model` process left a `lorakit-tiny-tok-*` folder (92 had built up)."""
    import tempfile

    from lorakit.models.text_encoders import tiny_clip_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = 2**22 + 1  # above the default pid_max (2**22): no process has it
    stale = tmp_path / f"lorakit-tiny-tok-{dead}-abc"  # left by a process killed with SIGKILL
    stale.mkdir()
    (stale / "vocab.json").write_text("{}")
    mine = tmp_path / f"lorakit-tiny-tok-{os.getpid()}-live"  # a live process's: kept
    mine.mkdir()
    tok = tiny_clip_tokenizer()
    assert tok("a red cup").input_ids[0] == tok.bos_token_id
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
