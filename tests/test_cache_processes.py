"""Caches are keyed on content, so a new process never redoes work (issue #16, item 1): the
VAE identity included diffusers' `_use_default_values`, a list ordered by the hash seed, so
every new process re-encoded every image and `cache/latents` grew on each run."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import FAST, SAMPLES, cli


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}


def test_a_second_process_with_another_hash_seed_encodes_nothing(tmp_path):
    cache = tmp_path / "cache"
    args = [*FAST, "--steps", 1, "--set", f"data.cache_dir='{cache}'"]
    cli("train", SAMPLES, *args, "--out", tmp_path / "run1")  # this process's hash seed
    first = _files(cache)
    assert len([p for p in first if "latents" in p.parts]) == 20  # one per sample image
    seed = "7" if os.environ.get("PYTHONHASHSEED") != "7" else "8"  # another seed, surely
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(SAMPLES), *map(str, args),
         "--out", str(tmp_path / "run2")],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    assert _files(cache) == first, "the second process wrote cache entries again"
