"""Why a run stops early: a stop signal (SIGINT/SIGTERM, acted on after a checkpoint), a
non-finite loss, an fp16 grad scaler that keeps skipping steps; and the fault injection the
crash-safety tests use (`LORAKIT_FAULT`)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from lorakit import checkpoint as ckpt
from lorakit.config import TrainConfig
from lorakit.errors import LorakitError


class Interrupted(LorakitError):
    """SIGINT/SIGTERM: the run stopped cleanly after a checkpoint."""

    def __init__(self, signum: int, step: int, out: Path):
        name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")
        super().__init__(
            f"Stopped by {name} at step {step}; checkpoint saved in "
            f"{ckpt.step_dir(out, step)}. Continue with the same command plus --resume latest."
        )
        self.exit_code = 128 + int(signum)


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, stop. Second: abort now
    (still no torn files: every write is atomic)."""

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = signum
        print("\nStopping after this step and saving a checkpoint (press Ctrl-C again to abort).")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def fault(point: str, step: int) -> None:
    """Fault injection for crash-safety tests: LORAKIT_FAULT=kill-during-save@N kills the process
    in the middle of writing the checkpoint of step N; LORAKIT_FAULT=signal-rank1@N sends rank 1
    a SIGTERM during step N (only that rank: the ranks must agree to stop)."""
    fault = os.environ.get("LORAKIT_FAULT")
    if fault == f"kill-during-{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{point}@{step}" and point.startswith("signal-"):
        os.kill(os.getpid(), signal.SIGTERM)


def check_scaler(accelerator, step: int, t: TrainConfig, out: Path) -> None:
    """fp16: the grad scaler skips steps whose gradients overflow and halves its scale each time.
    A scale that fell below 1 (from 65536) means many recent skips: training is not progressing."""
    scaler = accelerator.scaler
    if scaler is not None and scaler.is_enabled() and scaler.get_scale() < 1.0:
        found = ckpt.complete_checkpoints(out)
        last = f"The last good checkpoint is {found[-1][1]}." if found else ""
        raise LorakitError(
            f"fp16 gradients kept overflowing up to step {step} (the grad scaler skipped most "
            f"recent steps). Use train.mixed_precision = 'bf16' if the GPU supports it, or lower "
            f"train.lr (now {t.lr}). {last}"
        )


def diverged(step: int, t: TrainConfig, out: Path) -> LorakitError:
    found = ckpt.complete_checkpoints(out)
    last = (
        f"The last good checkpoint is {found[-1][1]}." if found else "No checkpoint was saved yet."
    )
    return LorakitError(
        f"The training loss became NaN/inf at step {step}: training diverged and was stopped. "
        f"Lower train.lr (now {t.lr}), keep train.max_grad_norm > 0, or use "
        f"train.mixed_precision = 'bf16' instead of 'fp16'. {last}"
    )
