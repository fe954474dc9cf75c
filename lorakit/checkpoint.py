"""Resumable checkpoints that are either complete or invisible.

A checkpoint is a folder `OUT/checkpoints/step-NNNNNN/` holding the exported adapters plus
`state.safetensors` (every tensor: LoRA parameters, optimizer state, RNG states, the EMA of the
LoRA under `train.ema`) and `state.json`
(everything else: step, epoch, position in the epoch's batch list, scheduler, grad scaler, python
and numpy RNG, loss history). It is written as `.step-NNNNNN.partial/`, each file atomically,
then a `COMPLETE` marker, then the folder is renamed into place — so `--resume latest` can never
pick a torn checkpoint: a folder without the marker, or still named `.partial`, is ignored.

No pickle anywhere: optimizer and scheduler state dicts are split into tensors (safetensors) and
JSON. A tensor that appears in several places of the state is stored once: bitsandbytes' 8-bit
optimizers hand every parameter the same quantisation maps (`qmap1`, `qmap2`), and safetensors
refuses to write two names for one memory. Every place then names the same key, so on load they
are one tensor again, as they were in the optimizer. Different views of one memory (another
offset, shape or dtype) are stored as copies of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_text, save_safetensors

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def partial_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f".step-{step:06d}.partial"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_resume(out: Path, resume: str, on_skip=None) -> Path:
    """`latest` → newest complete checkpoint of the run in `out` whose files verify against the
    checksums in its marker (a damaged newer one is named through `on_skip(message)` and
    passed over); otherwise that checkpoint folder, which must verify."""
    if resume == "latest":
        found = complete_checkpoints(out)
        if not found:
            raise LorakitError(
                f"--resume latest: '{out}' has no complete checkpoint to resume from (checkpoints "
                "are written every train.save_every steps). Start a new run instead."
            )
        damaged = []
        for _, folder in reversed(found):
            problem = damage(folder)
            if not problem:
                if damaged and on_skip is not None:
                    on_skip(
                        f"{'; '.join(damaged)}. Resuming from '{folder}', the newest checkpoint "
                        "that verifies."
                    )
                return folder
            damaged.append(f"checkpoint '{folder.name}' is damaged: {problem}")
        raise LorakitError(
            f"--resume latest: no checkpoint of '{out}' verifies ({'; '.join(damaged)}). Start a "
            "new run (--overwrite replaces this one)."
        )
    path = Path(resume)
    if not (path / MARKER).is_file() or not (path / "state.json").is_file():
        raise LorakitError(
            f"--resume '{resume}' is not a complete lorakit checkpoint folder (expected "
            f"{path}/state.json and {path}/{MARKER}). Use --resume latest or a folder under "
            "OUT/checkpoints/."
        )
    problem = damage(path)
    if problem:
        raise LorakitError(f"Checkpoint '{path}' is damaged: {problem}. {_good_one(path)}")
    return path


def _good_one(bad: Path) -> str:
    """Advice naming the newest checkpoint beside `bad` that verifies."""
    for _, folder in reversed(complete_checkpoints(bad.parent.parent)):
        if folder.resolve() != bad.resolve() and not damage(folder):
            return f"The newest checkpoint that verifies is '{folder}': pass --resume {folder}."
    return "No other checkpoint of this run verifies; start a new run."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative POSIX path → hex digest)."""
    return {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def damage(folder: Path) -> str:
    """'' when every file the checkpoint's marker lists is there with its recorded checksum;
    otherwise what is wrong, naming the file. Checkpoints written before checksums were
    recorded have nothing to verify against and pass."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"its {MARKER} marker cannot be read ({e})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return ""
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return f"'{path}' is missing"
        if _sha256(path) != digest:
            return f"'{path}' differs from what was written (checksum mismatch)"
    return ""


# ---------------------------------------------------------------------------------------------
# state (de)serialisation without pickle


class _Tensors:
    """The tensors of one `state.safetensors`, each memory stored once.

    Keyed by the SOURCE tensor's memory (device, storage address), looked up before anything is
    copied to the CPU: a CUDA tensor shared by 100 parameters is copied once, and on the CPU the
    shared tensor itself is what safetensors would see twice."""

    def __init__(self) -> None:
        self.by_key: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, dict[tuple, str]] = {}  # memory → {view: key}
        self._alive: list[torch.Tensor] = []  # sources stay alive: no address is reused meanwhile

    def add(self, key: str, t: torch.Tensor) -> str:
        """Store `t` under `key`, or return the key under which the same tensor is stored."""
        t = t.detach()
        memory = _memory(t)
        if memory is None:  # no storage of its own (empty, meta, a tensor subclass): a copy
            self.by_key[key] = t.to("cpu").contiguous()
            return key
        view = (t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        views = self._views.setdefault(memory, {})
        if view in views:
            return views[view]
        # The first view of a memory is stored as it is; any other view of it (a slice, another
        # shape or dtype) as a contiguous copy of its own, so no two stored tensors overlap.
        cpu = t.to("cpu")
        if views and _memory(cpu) == memory:  # on the CPU `.to` copied nothing
            cpu = cpu.clone(memory_format=torch.contiguous_format)
        self.by_key[key] = cpu.contiguous()
        views[view] = key
        self._alive.append(t)
        return key


def _memory(t: torch.Tensor) -> tuple | None:
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0 or storage.nbytes() == 0 or t.device.type == "meta":
        return None
    return (t.device.type, t.device.index, ptr)


def _split(obj: Any, prefix: str, tensors: _Tensors) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}; collect them in `tensors`
    (a tensor met again is named by the key it was first stored under)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": tensors.add(prefix, obj)}
    if isinstance(obj, dict):
        pairs = [
            [_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
            for i, (k, v) in enumerate(obj.items())
        ]
        return {"__dict__": pairs}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        # stored as int64/float64 (safetensors has no uint32); the dtype is restored on load
        wide = obj.astype(np.float64 if obj.dtype.kind == "f" else np.int64)
        tensors.by_key[prefix] = torch.from_numpy(wide)
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__} in checkpoint state")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    epoch: int
    position: int
    """Index into the epoch's batch list of the next batch to train on."""
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    history: dict[str, Any]
    ema: dict[str, Any] | None = None
    """`train.ema`: the EMA shadows (whole fp32 tensors) and update count (`AdapterEMA`);
    None when off or written before EMA existed."""


def save_state(folder: Path, state: TrainState) -> None:
    tensors = _Tensors()
    doc = {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "params": _split(state.params, "param", tensors),
        "optimizer": _split(state.optimizer, "optim", tensors),
        "scheduler": _split(state.scheduler, "sched", tensors),
        "scaler": _split(state.scaler, "scaler", tensors),
        "rng": _split(state.rng, "rng", tensors),
        "history": state.history,
        "ema": _split(state.ema, "ema", tensors),
    }
    save_safetensors(folder / "state.safetensors", tensors.by_key)
    atomic_write_text(folder / "state.json", json.dumps(doc))


def load_state(folder: Path) -> TrainState:
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        doc = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return TrainState(
            step=doc["step"],
            epoch=doc["epoch"],
            position=doc["position"],
            params=_join(doc["params"], tensors),
            optimizer=_join(doc["optimizer"], tensors),
            scheduler=_join(doc["scheduler"], tensors),
            scaler=_join(doc["scaler"], tensors),
            rng=_join(doc["rng"], tensors),
            history=doc["history"],
            ema=_join(doc.get("ema"), tensors),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise LorakitError(
            f"Checkpoint '{folder}' cannot be read ({what}). {_good_one(folder)}"
        ) from None


def begin(out: Path, step: int) -> Path:
    """Start writing checkpoint `step`: a fresh hidden `.partial` folder."""
    tmp = partial_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(out: Path, step: int, tmp: Path, summary: dict[str, Any]) -> Path:
    """Mark the partial folder complete and move it into place (one rename)."""
    # checksums of every file: a later bit flip or truncation is named on resume, not trained on
    atomic_write_text(tmp / MARKER, json.dumps({**summary, "files": checksums(tmp)}))
    final = step_dir(out, step)
    if final.exists():  # an older checkpoint of the same step (e.g. a replaced run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune(out: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 = keep all) and any
    leftover partial folders. Returns what was removed."""
    removed = []
    folder = out / "checkpoints"
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.endswith(".partial"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    if keep_last > 0:
        for _, path in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
