"""Training progress: a rich live bar on a terminal, plain periodic lines otherwise (CI, logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """`update()` is called at the logging interval only (the loss is read from the device then)."""

    def __init__(self, total: int, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(stderr=False)
        self.total = total
        self.live = self.console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()
        self._last_step = 0

    def __enter__(self) -> Reporter:
        self._t0 = time.perf_counter()
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.total, loss="-", lr="-", speed=""
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=step,
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                speed=f"{rate:.2f} it/s",
            )
        else:
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} it/s  "
                f"eta {_fmt_eta(eta)}",
                flush=True,
            )
        self._last_step = step

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            self.console.print(text, highlight=False)
            sys.stdout.flush()
