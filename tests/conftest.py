"""Shared fixtures: tiny offline models, the real CLI driven in-process, one shared training run."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP busy-waiting makes 2-core CPU runs erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tiny models: one intra-op thread is faster than two on a 2-core machine (thread hand-offs cost
# more than the ops), and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.quiet import quiet

quiet()

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "brand"
PROMPTS = ROOT / "samples" / "prompts.txt"

# Small and fast: 64 px, rank 4 with alpha 8 (alpha != rank catches strength bugs), torch AdamW.
FAST = [
    "--preset", "tiny-cpu",
    "--set", "train.optimizer='adamw'",
    "--set", "train.save_every=0",
    "--set", "sample.every=0",
    "--set", "train.log_every=1",
    "--set", f"sample.prompts='{PROMPTS}'",
    "--set", "sample.steps=2",
    # the bleed score doubles the held-out forwards; tests/test_preserve.py turns it on
    "--set", "eval.bleed=false",
]  # fmt: skip


DEFAULT_TIER = "not slow and not gpu"
"""pyproject's `-m`: the tier `pytest` runs with no marker expression of its own."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """Workers for `-n auto` (pyproject's addopts): one per core for the default tier, at most
    one per 4 GiB of available memory (the largest process of a default run peaked at 3.2 GiB);
    none (this process) for the slow and gpu tiers (real-size models side by side could exhaust
    memory; one GPU) and for runs of one file or of single tests (starting workers costs more
    than they save). `-n 0` runs anything in this process."""
    import psutil

    one_file = len(config.args) == 1 and Path(config.args[0]).is_file()  # loadfile: 1 worker
    if config.option.markexpr != DEFAULT_TIER or one_file or any("::" in a for a in config.args):
        return 0
    by_memory = psutil.virtual_memory().available // (4 * 2**30)
    workers = min(os.cpu_count() or 1, by_memory)
    return workers if workers > 1 else 0


def cli(*args: str, expect: int | None = 0):
    """Run the real `lorakit` CLI in-process; assert the exit code unless expect is None."""
    from lorakit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (
            f"exit {result.exit_code} != {expect}\n{result.output}\n{result.exception!r}"
        )
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One CLI training run shared by the read-only tests: 6 steps, saves and grids every 3."""
    out = tmp_path_factory.mktemp("run") / "demo"
    cli(
        "train", SAMPLES, *FAST, "--out", out, "--steps", 6, "--lr", 5e-3,
        "--set", "train.save_every=3", "--set", "sample.every=3",
    )  # fmt: skip
    return out


def launch_train(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m lorakit train *args` as a subprocess in its own session (output captured as
    text), for multi-process runs that a test waits for or kills."""
    full_env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    full_env.pop("LORAKIT_LAUNCHED", None)
    cmd = [sys.executable, "-m", "lorakit", "train", *args]
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The output of a `launch_train` process once it exits; on timeout (a hung rank) the
    launcher and its workers are killed before the test fails, so none outlive it."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a `launch_train` launcher AND its workers, and reap them: torch's elastic launcher
    starts each worker in a session of its own, so killing the launcher's process group alone
    would leave them running."""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    proc.communicate()


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, limit_s: float = 300):
    """Wait until checkpoint `step` of the run in `out` is complete, then SIGKILL the launcher
    and its workers (`kill_all`)."""
    from lorakit import checkpoint as ckpt

    t0 = time.time()
    while not (ckpt.step_dir(out, step) / ckpt.MARKER).exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < limit_s
        time.sleep(0.05)
    kill_all(proc)


def assert_resumed(text: str, out: Path, step: int, last: int) -> None:
    """The resumed run's output says it resumed from checkpoint `step` and trained to `last`."""
    from lorakit import checkpoint as ckpt

    squeezed = "".join(text.split())  # the console wraps long paths anywhere
    assert f"resumingfrom{ckpt.step_dir(out, step)}" in squeezed, text
    assert f"step{step + 1}/{last}" in squeezed and f"step{last}/{last}" in squeezed, text


def kill_and_resume(launch, out: Path, step: int, last: int) -> str:
    """Start a run with `launch(*extra_args)` (a Popen), kill it — launcher and workers — once
    checkpoint `step` is complete, resume it with `--resume latest`, and check that the resumed
    run started at `step` and trained to `last`. Returns the resumed run's output."""
    kill_after_checkpoint(launch(), out, step)
    assert not (out / "lorakit.safetensors").exists()
    resumed = launch("--resume", "latest")
    text, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, text
    assert_resumed(text, out, step, last)
    return text
