"""Experiment trackers through accelerate: TensorBoard by default when installed, wandb on request.

    init_trackers(accelerator, config, out_dir)    once, before the loop (main process logs)
    log_scalars(accelerator, step, loss=…, lr=…, grad_norm=…)
    log_grid(accelerator, step, path)               a sample grid PNG as an image
    accelerator.end_training()                      closes the writers (train.py already calls it)

TensorBoard event files go to `OUT/logs/lorakit/` (`tensorboard --logdir OUT/logs`).
Tracker instances are created here and added to `accelerator.trackers`, so the Accelerator does
not need `log_with` at construction.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

PROJECT = "lorakit"


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def flat_config(config: Any) -> dict[str, bool | int | float | str]:
    """`section.key` → value, lists joined as text (trackers take scalars only)."""
    out: dict[str, bool | int | float | str] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                out[f"{section}.{key}"] = value
            else:
                out[f"{section}.{key}"] = ", ".join(map(str, value)) if value else ""
    return out


def init_trackers(accelerator, config: Any, out_dir: str | Path) -> list[str]:
    """Start the trackers `config.log` asks for; returns their names (possibly empty).

    TensorBoard is on by default and silently skipped when not installed; wandb asked for but
    not installed is a ConfigError (raised before training starts)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    log = config.log
    trackers = []
    if log.wandb and not wandb_available():
        raise ConfigError(
            "log.wandb = true but the wandb package is not installed. Install it with "
            "`pip install wandb` (and run `wandb login`), or set log.wandb = false."
        )
    if not accelerator.is_main_process:
        return []
    if log.tensorboard and tensorboard_available():
        trackers.append(TensorBoardTracker(PROJECT, str(Path(out_dir) / "logs"), flush_secs=30))
    if log.wandb:
        trackers.append(WandBTracker(log.wandb_project, dir=str(out_dir)))
    values = flat_config(config)
    for tracker in trackers:
        tracker.start()
        tracker.store_init_configuration(values)
        accelerator.trackers.append(tracker)
    return [t.name for t in trackers]


def log_scalars(accelerator, step: int, **values: float | None) -> None:
    """Log numbers (None values are skipped) at `step` to every started tracker."""
    clean = {k: float(v) for k, v in values.items() if v is not None}
    if clean and accelerator.trackers:
        accelerator.log(clean, step=step)


def log_grid(accelerator, step: int, path: str | Path, tag: str = "samples") -> None:
    """Log a sample-grid PNG as an image at `step`."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        image = im.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None)
        if writer is not None:
            writer.flush()
