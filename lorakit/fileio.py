"""Atomic writes: every file lorakit produces appears complete or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as st_save


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _trace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _trace(path: Path) -> None:
    """LORAKIT_TRACE_WRITES=FILE appends "<rank> <path>" per write: lets multi-process tests prove
    that only rank 0 writes."""
    trace = os.environ.get("LORAKIT_TRACE_WRITES")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('RANK', '0')} {path}\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise tensors (contiguous, detached, on CPU) with string metadata."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata=dict(metadata) if metadata else None)


def tensor_data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a safetensors file's tensor bytes, header excluded (kohya's `sshs_model_hash`).

    The header is skipped so the hash does not change when only metadata changes.
    """
    blob = safetensors_bytes(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def dumps_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
