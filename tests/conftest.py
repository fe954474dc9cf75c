"""Shared fixtures: tiny offline models, the real CLI driven in-process, one shared training run."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP busy-waiting makes 2-core CPU runs erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
]  # fmt: skip


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
