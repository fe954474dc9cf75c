"""Atomic writes give files the mode the umask gives, as `open()` would (mkstemp alone makes
every output 0600, and rewriting a 0644 file turned it into 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from lorakit.fileio import atomic_write_bytes, save_safetensors


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_take_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        new = atomic_write_bytes(tmp_path / "a.txt", b"x")
        with open(tmp_path / "b.txt", "wb") as f:  # what the user's other tools produce
            f.write(b"x")
        assert _mode(new) == _mode(tmp_path / "b.txt") == 0o666 & ~umask
    finally:
        os.umask(old)


def test_rewriting_a_file_keeps_the_umask_mode(tmp_path):
    import torch

    old = os.umask(0o022)
    try:
        path = tmp_path / "adapter.safetensors"
        save_safetensors(path, {"w": torch.zeros(2)})
        save_safetensors(path, {"w": torch.ones(2)})  # export over an existing file
        assert _mode(path) == 0o644
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        os.umask(old)
