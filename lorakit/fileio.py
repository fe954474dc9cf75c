"""Atomic writes: every file lorakit produces appears complete or not at all."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from lorakit.errors import LorakitError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LorakitError(disk_full(path)) from None
        raise
    try:
        # mkstemp creates 0600 whatever the umask: give the file the mode `open()` would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _trace(path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise LorakitError(disk_full(path)) from None
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    """The process umask (read by setting it, then restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(path: str | os.PathLike) -> str:
    """One paragraph for ENOSPC: the file being written, and what is free on its disk."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.2f} GiB free there now"
    except OSError:
        free = "free space unknown"
    return (
        f"The disk is full: writing '{path}' failed with 'No space left on device' ({free}). "
        "Nothing half-written was kept. Free some space on that disk, or write elsewhere (--out; "
        "data.cache_dir for the caches), then run the same command again (add --resume latest "
        "for a training run that saved a checkpoint)."
    )


def owned_tempdir(prefix: str) -> str:
    """A temporary folder named after this process (`<prefix><pid>-XXXX`), after removing the
    folders of earlier processes with that prefix that are no longer alive: a run killed with
    SIGKILL cannot clean up after itself, so the next one does."""
    sweep_dead_tempdirs(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def sweep_dead_tempdirs(prefix: str) -> None:
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
