"""Checkpoints, exact resume, crash safety, signals, divergence and disk-full handling."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, SAMPLES, cli
from safetensors.torch import load_file

from lorakit import checkpoint as ckpt

RUN = [*FAST, "--set", "train.log_every=5"]


def _same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), k


def _subprocess(args: list, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", *map(str, args)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "timed out waiting for " + str(path)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: 24 steps without interruption."""
    out = tmp_path_factory.mktemp("straight") / "run"
    cli("train", SAMPLES, *RUN, "--out", out, "--steps", 24, "--set", "train.save_every=4",
        "--set", "sample.every=8")  # fmt: skip
    return out


def test_checkpoints_are_complete_and_pruned(straight):
    found = ckpt.complete_checkpoints(straight)
    # keep_last = 3 (default): the newest three, the final step included
    assert [s for s, _ in found] == [16, 20, 24]
    for _, folder in found:
        assert {p.name for p in folder.iterdir()} >= {
            "COMPLETE", "state.json", "state.safetensors", "config.toml", "lorakit.safetensors",
        }  # fmt: skip
    assert not list((straight / "checkpoints").glob(".*partial"))


@pytest.mark.slow  # kill-based, ~15 s; test_real_size.py kills and resumes in the default
def test_sigkill_then_resume_is_bit_identical(straight, tmp_path):
    out = tmp_path / "run"
    args = [SAMPLES, *RUN, "--out", out, "--steps", 24, "--set", "train.save_every=4",
            "--set", "sample.every=8"]  # fmt: skip
    proc = _subprocess(args)
    _wait_for(ckpt.step_dir(out, 4) / ckpt.MARKER, proc)
    time.sleep(random.uniform(0.0, 0.6))  # die somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "lorakit.safetensors").exists(), "the run must not have finished"
    cli("train", *args, "--resume", "latest")
    _same_adapter(straight / "lorakit.safetensors", out / "lorakit.safetensors")
    # previews rendered after the resume are the same pictures as in the uninterrupted run
    for name in ("step-000016.png", "step-000024.png"):
        assert (out / "samples" / name).read_bytes() == (straight / "samples" / name).read_bytes()
    assert (out / "report.html").is_file()


@pytest.mark.slow  # kill-based, ~10 s
def test_kill_during_checkpoint_write_is_never_resumed_from(straight, tmp_path):
    out = tmp_path / "run"
    args = [SAMPLES, *RUN, "--out", out, "--steps", 24, "--set", "train.save_every=4"]
    proc = _subprocess(args, {"LORAKIT_FAULT": "kill-during-save@8"})
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.partial_dir(out, 8).is_dir(), "the torn checkpoint is left as .partial"
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4]
    assert ckpt.resolve_resume(out, "latest") == ckpt.step_dir(out, 4)
    cli("train", *args, "--resume", "latest")
    _same_adapter(straight / "lorakit.safetensors", out / "lorakit.safetensors")


def test_sigint_checkpoints_and_exits_130_then_resumes(straight, tmp_path):
    out = tmp_path / "run"
    args = [SAMPLES, *RUN, "--out", out, "--steps", 24, "--set", "train.save_every=4"]
    proc = _subprocess(args)
    _wait_for(ckpt.step_dir(out, 4) / ckpt.MARKER, proc)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "--resume latest" in text and "Traceback" not in text
    stopped = ckpt.complete_checkpoints(out)[-1][0]
    assert 4 <= stopped < 24
    cli("train", *args, "--resume", "latest")
    _same_adapter(straight / "lorakit.safetensors", out / "lorakit.safetensors")


@pytest.mark.parametrize(
    "optimizer",
    # paged_adamw8bit is adamw8bit on a CPU; tests/test_optimizers.py covers every state format,
    # tests/test_real_size.py resumes lion8bit at real size in the default tier
    ["adamw", "adamw8bit"]
    + [pytest.param(o, marks=pytest.mark.slow) for o in ("lion8bit", "adafactor", "prodigy")],
)
def test_resume_from_a_checkpoint_in_process(tmp_path, optimizer):
    out = tmp_path / "run"
    args = [SAMPLES, *RUN, "--out", out, "--steps", 8, "--set", "train.save_every=3",
            "--set", f"train.optimizer='{optimizer}'", "--set", "train.optimizer_fallback=false",
            "--set", "train.keep_last=0", "--set", "lora.dropout=0.1"]  # fmt: skip
    cli("train", *args)
    first = (out / "lorakit.safetensors").read_bytes()
    reference = tmp_path / "final.safetensors"
    reference.write_bytes(first)
    r = cli("train", *args, "--resume", ckpt.step_dir(out, 3))
    assert "resuming from" in r.output
    _same_adapter(reference, out / "lorakit.safetensors")


def test_resume_refuses_a_changed_config(straight, tmp_path):
    r = cli("train", SAMPLES, *RUN, "--out", straight, "--steps", 30, "--lr", 0.5,
            "--set", "train.save_every=4", "--resume", "latest", expect=2)  # fmt: skip
    assert "train.lr" in r.output and "Traceback" not in r.output
    r = cli("train", SAMPLES, *RUN, "--out", tmp_path / "none", "--resume", "latest", expect=1)
    assert "no complete checkpoint" in r.output


def test_nan_stops_within_one_step_and_names_last_checkpoint(tmp_path, monkeypatch):
    from lorakit.models import FAMILIES

    # Patched on the class: monkeypatch's undo of an instance attribute would leave the
    # registry's object with `loss` bound to itself, which `preserve.Recording`'s copy then
    # calls instead of its own (bleed scoring in a later test in this process counts 0 calls).
    cls = type(FAMILIES["sd15"])
    real_loss = cls.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return loss  # held-out scoring, not a training step
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(cls, "loss", poisoned)
    out = tmp_path / "run"
    r = cli("train", SAMPLES, *RUN, "--out", out, "--steps", 10, "--set", "train.save_every=2",
            expect=1)  # fmt: skip
    assert "step 5" in r.output and "NaN" in r.output and "Traceback" not in r.output
    assert "step-000004" in r.output.replace("\n", "")
    assert calls["n"] == 5, "training stopped at the poisoned step"
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4]
    state = ckpt.load_state(ckpt.step_dir(out, 4))
    assert all(torch.isfinite(p).all() for p in state.params)


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real = ckpt.save_state
    calls = {"n": 0}

    def failing(folder, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, state)

    monkeypatch.setattr(ckpt, "save_state", failing)
    out = tmp_path / "run"
    r = cli("train", SAMPLES, *RUN, "--out", out, "--steps", 10, "--set", "train.save_every=2",
            expect=1)  # fmt: skip
    assert "No space left on device" in r.output and "step-000002" in r.output.replace("\n", "")
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    assert not ckpt.partial_dir(out, 4).exists()


@pytest.mark.parametrize("fail_at", [4, 6], ids=["mid-run", "final"])
def test_a_checkpoint_that_cannot_be_written_is_one_paragraph_and_keeps_the_adapter(
    tmp_path, monkeypatch, fail_at
):
    """Not a disk problem (e.g. a library whose state safetensors refuses): the run stops with a
    paragraph naming the checkpoint folder, the torn folder is gone, the previous checkpoint
    stays; at the final step the adapters are written before the checkpoint, so they survive."""
    real = ckpt.save_state

    def failing(folder, state):
        if state.step == fail_at:
            raise RuntimeError("\n  Some tensors share memory: [{'optim.0.1.1.1'}].\n  more")
        return real(folder, state)

    monkeypatch.setattr(ckpt, "save_state", failing)
    out = tmp_path / "run"
    r = cli("train", SAMPLES, *RUN, "--out", out, "--steps", 6, "--set", "train.save_every=2",
            expect=1)  # fmt: skip
    text = "".join(r.output.split())  # the console wraps long paths anywhere
    assert "internalerror" not in text and "Traceback" not in text, r.output
    assert f"checkpointforstep{fail_at}({ckpt.step_dir(out, fail_at)})" in text, r.output
    assert "RuntimeError:Sometensorssharememory" in text, r.output
    assert f"{ckpt.step_dir(out, 2)}" in text, "names the last good checkpoint"
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4][: fail_at // 2 - 1]
    assert not ckpt.partial_dir(out, fail_at).exists()
    if fail_at == 6:
        for adapter in (
            out / "lorakit.safetensors",
            out / "diffusers/pytorch_lora_weights.safetensors",
        ):
            assert load_file(adapter) and str(adapter) in text, "written, complete, and named"
    else:
        assert not (out / "lorakit.safetensors").exists() and "--resumelatest" in text


def test_state_stores_a_shared_tensor_once_and_other_views_as_copies(tmp_path):
    """bitsandbytes gives every 8-bit parameter the same `qmap1`: stored once, one tensor again
    after loading. Other views of one memory (offsets, shapes, dtypes, overlapping or not) are
    stored as copies of their own with their own values."""
    base = torch.arange(24, dtype=torch.float32)
    shared = torch.linspace(-1, 1, 256)
    views = {"head": base[:8], "overlap": base[4:12].view(2, 4), "t": base.view(4, 6).t(),
             "bits": base.view(torch.int32)[20:], "empty": base[:0]}  # fmt: skip
    optimizer = {
        "state": {i: {"qmap1": shared, "step": torch.tensor(float(i))} for i in range(3)},
        "param_groups": [{"params": [0, 1, 2], "lr": 0.1}],
        "views": views,
    }
    state = ckpt.TrainState(1, 0, 0, [base.view(4, 6)], optimizer, {}, None, {}, {})
    ckpt.save_state(tmp_path, state)

    stored = load_file(tmp_path / "state.safetensors")
    assert sum(t.numel() == 256 for t in stored.values()) == 1, "the shared tensor, once"
    loaded = ckpt.load_state(tmp_path)
    maps = [loaded.optimizer["state"][i]["qmap1"] for i in range(3)]
    assert maps[0] is maps[1] is maps[2] and torch.equal(maps[0], shared)
    assert torch.equal(loaded.params[0], base.view(4, 6))
    for name, view in views.items():
        got = loaded.optimizer["views"][name]
        assert got.dtype == view.dtype and torch.equal(got, view), name
    assert [float(loaded.optimizer["state"][i]["step"]) for i in range(3)] == [0.0, 1.0, 2.0]
