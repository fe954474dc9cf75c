"""A run's folder over time: claiming it, the training state a checkpoint holds (`capture`)
and puts back (`restore`), whether a config may resume another's checkpoint, and the one
paragraph when a checkpoint cannot be written. The file format is lorakit/checkpoint.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from lorakit import checkpoint as ckpt
from lorakit.config import Config
from lorakit.distributed import full_tensor, shard_like
from lorakit.errors import ConfigError, LorakitError


def _opt_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def capture(step, order, params, optimizer, lr_schedule, accelerator, history, ema=None):
    """Under FSDP and DeepSpeed ZeRO a collective (every rank gathers the LoRA and its optimizer
    state, and its EMA: `ema`, an `AdapterEMA` or None); the optimizer state always has the
    layout of a plain torch `state_dict()`."""
    from lorakit.zero import gather_state, zero_optimizer

    opt = gather_state(optimizer) if zero_optimizer(optimizer) else optimizer.state_dict()
    opt = {
        **opt,
        "state": {
            i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for i, st in sorted(opt["state"].items())
        },
    }
    return ckpt.TrainState(
        step=step,
        epoch=order.epoch,
        position=order.position,
        params=[full_tensor(p.detach()) for p in params],
        optimizer=opt,
        scheduler=lr_schedule.state_dict(),
        scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        rng=ckpt.rng_state(),
        history=history,
        ema=ema.state_dict() if ema is not None else None,
    )


def restore(state, params, optimizer, lr_schedule, accelerator, order, ema=None, where="") -> int:
    """Put a checkpoint's state back (`ema`: the run's `AdapterEMA` or None; `where`: the
    checkpoint folder, for messages). Returns its step."""
    if len(state.params) != len(params) or any(
        a.shape != b.shape for a, b in zip(state.params, params, strict=True)
    ):
        raise LorakitError(
            "The checkpoint's LoRA does not match this config's LoRA (rank or target modules "
            "differ). Resume with the run's own config.toml."
        )
    with torch.no_grad():
        for p, saved in zip(params, state.params, strict=True):
            p.copy_(
                shard_like(saved, p) if hasattr(p, "device_mesh") else saved.to(p.device, p.dtype)
            )
    opt_state = state.optimizer
    if any(hasattr(p, "device_mesh") for p in params):  # FSDP2: re-shard the whole state
        owners = _opt_params(optimizer)
        opt_state = {
            **opt_state,
            "state": {
                i: {
                    k: shard_like(v, owners[i])
                    if k != "step" and isinstance(v, torch.Tensor)
                    else v
                    for k, v in st.items()
                }
                for i, st in sorted(opt_state["state"].items())
            },
        }
    from lorakit.zero import scatter_state, zero_optimizer

    if zero_optimizer(optimizer):  # DeepSpeed ZeRO-1/2: this rank's slice, after the params
        scatter_state(optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    lr_schedule.load_state_dict(state.scheduler)
    if state.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    if ema is not None:
        ema.load_state_dict(state.ema, where)
    order.seek(state.epoch, state.position)
    ckpt.set_rng_state(state.rng)
    return state.step


# Keys that may change between a run and its resumption; everything else must match.
_RESUMABLE_CHANGES = {
    "train.steps", "train.save_every", "train.save_every_epochs", "train.keep_last",
    "train.log_every", "train.resume", "train.overwrite", "train.device", "export.title",
    "train.resume_changed_data",
    "export.description",
    "train.block_swap",  # bitwise the same steps: a resumed run may stream blocks, or stop
    "train.ema_device",  # where the EMA copy lives: the same numbers on the same device type
}  # fmt: skip


def check_resume_config(folder: Path, c: Config) -> None:
    from lorakit import config as cfg

    saved = cfg.build(
        cfg.check_layer(cfg.read_toml(folder / "config.toml", "Checkpoint config"), str(folder))
    )
    now, then = c.to_dict(), saved.to_dict()
    if _inside(folder, Path(c.train.out)):
        # the run folder itself, however it is spelled now (`runs/x/`, `./runs/x`, absolute)
        # or wherever it was moved: its checkpoints are its own
        then["train"]["out"] = now["train"]["out"]
    diff = [
        f"{s}.{k} ({then[s][k]!r} → {now[s][k]!r})"
        for s in now
        for k in now[s]
        if now[s][k] != then[s][k] and f"{s}.{k}" not in _RESUMABLE_CHANGES and s != "sample"
    ]
    if diff:
        raise ConfigError(
            f"Cannot resume from {folder}: the config differs in {', '.join(diff)}. Resume with "
            "the same settings (only steps, save/log intervals, samples and device may change)."
        )


def _inside(folder: Path, out: Path) -> bool:
    try:
        folder.resolve().relative_to(out.resolve())
    except ValueError:
        return False
    return True


def data_fingerprint(records) -> list[list]:
    """The data set as a checkpoint records it: per sample (in order) its content key (image,
    bucket, crop), a hash of its caption, repeats and whether it is a regularization image."""
    import hashlib

    return [
        [r.key, hashlib.sha256(r.caption.encode()).hexdigest()[:16], r.repeats, r.is_reg]
        for r in records
    ]


def check_resume_data(folder: Path, records, c: Config, warn) -> None:
    """Stop when the data set is not the one the checkpoint was trained on, saying what changed
    (`train.resume_changed_data` = true continues anyway, through `warn`)."""
    try:
        marker = json.loads((folder / ckpt.MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # unreadable markers are refused by resolve_resume already
    then = marker.get("data") if isinstance(marker, dict) else None
    if then is None:
        return  # written before data fingerprints were recorded
    now = data_fingerprint(records)
    if now == then:
        return
    old_keys, new_keys = {r[0] for r in then}, {r[0] for r in now}
    captions_then = {r[0]: r[1] for r in then}
    edited = sum(1 for r in now if r[0] in captions_then and captions_then[r[0]] != r[1])
    changes = [
        f"{n} {label}"
        for n, label in (
            (len(new_keys - old_keys), "image(s) new or changed"),
            (len(old_keys - new_keys), "image(s) no longer there"),
            (edited, "caption(s) edited"),
        )
        if n
    ] or ["repeats or the order of the samples changed"]
    what = ", ".join(changes)
    if c.train.resume_changed_data:
        warn(
            f"the data set differs from checkpoint '{folder.name}' ({what}); resuming anyway "
            "(train.resume_changed_data): the result is no longer bit-identical to an "
            "uninterrupted run."
        )
        return
    raise ConfigError(
        f"Cannot resume from {folder}: the data set differs from the one it was trained on "
        f"({what}). Restore the data set as it was, start a new "
        "run (--overwrite), or resume anyway with --set train.resume_changed_data=true (the "
        "result is then no longer what an uninterrupted run gives)."
    )


def check_resume_step(folder: Path, step: int, c: Config) -> None:
    """A checkpoint past `train.steps` cannot be resumed to it: the adapter written would hold
    the later step's weights under the smaller step count."""
    if step > c.train.steps:
        raise ConfigError(
            f"Cannot resume from {folder}: it is at step {step}, past train.steps = "
            f"{c.train.steps}. To train further pass --steps with more than {step}; to get the "
            f"adapter of an earlier step, resume from a checkpoint at or before step "
            f"{c.train.steps} (--resume {folder.parent}/step-NNNNNN), or export the one saved "
            f"in it: lorakit export {folder}/lorakit.safetensors."
        )


def save_failed(
    out: Path, step: int, e: Exception, adapters: dict[str, Path] | None = None
) -> LorakitError:
    found = [p for s, p in ckpt.complete_checkpoints(out) if s != step]
    if adapters:  # the final step: the adapter files were written before the checkpoint
        written = ", ".join(str(p) for p in adapters.values())
        last = f"Training finished and the adapter is written ({written}); only this resumable "
        last += (
            f"checkpoint is missing (the last one is {found[-1]})."
            if found
            else "checkpoint is missing."
        )
    elif found:
        last = f"The previous checkpoint {found[-1]} is intact; continue with --resume latest."
    else:
        last = "No earlier checkpoint exists; the run has to start again."
    if isinstance(e, OSError):
        why = f"{e.strerror or e}. Free disk space or fix the folder's permissions."
    elif isinstance(e, LorakitError):  # already one paragraph (a full disk, named by fileio)
        why = str(e)
    else:
        cause = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
        why = (
            f"{type(e).__name__}: {cause[:300]}. This is a lorakit bug or an unexpected library "
            "version; please report it with this message."
        )
    return LorakitError(
        f"Could not write the checkpoint for step {step} ({ckpt.step_dir(out, step)}): {why} "
        f"Its unfinished folder was removed. {last}"
    )


RUN_OUTPUTS = (
    "checkpoints", "samples", "diffusers", "run.json", "config.toml",
    "raw", "ema", "report.json",  # train.ema's raw adapter, `lorakit ema` results, report data
)  # fmt: skip


LOCK = ".lorakit.lock"
"""Hidden file in a run folder naming the PID of the run that holds it (written once the folder
is claimed: nothing is written into a folder that turns out not to be a lorakit run's)."""


@contextlib.contextmanager
def run_lock(out: Path, data_dir: str | Path | None, enabled: bool = True):
    """Hold the run folder `out` for the life of a run: an exclusive `flock` on the folder itself
    (the kernel releases it on any exit, SIGKILL included, so a crashed run never leaves a stale
    lock). A second run into the same folder stops with one paragraph naming the PID that holds
    it (`mark_holder` writes it once the run has claimed the folder). Opening the folder is also
    the early check that `out` can be written, and `out` may not overlap the data folder (the
    next run would train on this one's outputs). `enabled` = False on the ranks other than the
    main process: one lock per run. `data_dir` None: a command that reads no training data
    (`lorakit ema`) holds the folder against a run writing it meanwhile."""
    if data_dir is not None:
        _check_overlap(out, data_dir)
    if not enabled:
        yield
        return
    import fcntl

    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out '{out}' is a file; choose a folder for the run's outputs.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(
            f"train.out '{out}' cannot be written ({e.strerror or e}). Choose a folder you can "
            "write to with --out."
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = (out / LOCK).read_text(encoding="ascii").strip() or "unknown"
            except (OSError, ValueError):
                holder = "unknown"
            raise ConfigError(
                f"'{out}' is in use by another lorakit run (PID {holder}): two runs writing one "
                "folder would mix their adapters and checkpoints. Wait for that run to finish "
                "(or stop it), or choose another --out."
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def mark_holder(out: Path) -> None:
    """Record this process as the run holding `out` (after `claim_output` or a resume check)."""
    from lorakit.fileio import atomic_write_text

    atomic_write_text(out / LOCK, f"{os.getpid()}\n")


def _check_overlap(out: Path, data_dir: str | Path) -> None:
    if str(data_dir).startswith("hf:"):
        return
    data = Path(data_dir)
    for a, b in ((out, data), (data, out)):
        try:
            a.resolve().relative_to(b.resolve())
        except ValueError:
            continue
        raise ConfigError(
            f"train.out '{out}' and the data folder '{data}' overlap: the run would write its "
            "previews, checkpoints and adapters among the training data, and the next run "
            "would train on them. Choose an --out outside the data folder."
        )


def claim_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run or other files, unless allowed.
    Leftover `.partial` checkpoint folders (a run killed while saving) are not work: they never
    block a new run, and are removed."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"train.out '{out}' is a file; choose a folder for the run's outputs.")
    if (out / "config.toml").is_file():
        has_work = (
            any(out.glob("*.safetensors"))
            or bool(ckpt.complete_checkpoints(out))
            or ((out / "samples").is_dir() and any((out / "samples").iterdir()))
        )
        if has_work and not overwrite:
            raise ConfigError(
                f"'{out}' already holds a lorakit run. Choose another --out, or pass --overwrite "
                "to replace that run's outputs (its adapters, checkpoints and sample grids)."
            )
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for adapter in out.glob("*.safetensors"):
            adapter.unlink()
    elif any(p.name != LOCK for p in out.iterdir()) and not overwrite:
        raise ConfigError(
            f"train.out '{out}' is a non-empty folder that is not a lorakit run. Choose an empty "
            "or new folder (lorakit does not write among other files unless you pass --overwrite)."
        )
