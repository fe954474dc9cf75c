"""Training progress: a rich live bar on a terminal, plain periodic lines otherwise (CI, logs)."""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class Phases:
    """Wall time of a run's phases, in seconds: what a run spends before its first step (data,
    model, cache) and around its steps (scoring, previews, checkpoints, export).

        phases = Phases()
        with phases("cache"):
            ...
    Time is added per name (a phase may run many times). A phase inside another (a held-out
    score inside a checkpoint) counts for itself only: the outer one is charged the rest, so the
    phases never add up to more than the run's wall time."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.first_step = 0.0
        """Seconds from the start of `train()` to the end of its first step (0 = not yet)."""
        self._inner: list[float] = []  # per open phase: time spent in phases inside it

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.monotonic()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.monotonic() - t
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def mark_first_step(self) -> float:
        if not self.first_step:
            self.first_step = time.monotonic() - self.started
        return self.first_step

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}

    def line(self) -> str:
        """`data 0.4 s · model 2.1 s · …` in the order the phases first ran."""
        return " · ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())


def peak_memory_gib(device: torch.device | None = None) -> float:
    """CUDA max allocated on a GPU, peak resident set size of this process on the CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """`update()` is called at the logging interval only (the loss is read from the device then)."""

    def __init__(
        self,
        total: int,
        console: Console | None = None,
        live: bool | None = None,
        device: torch.device | None = None,
        enabled: bool = True,
    ):
        self.console = console or Console(stderr=False)
        self.total = total
        self.device = device
        self.enabled = enabled  # off on non-main processes of a multi-process run
        self.last_checkpoint = "-"
        self.last_grid = "-"
        self.live = enabled and (self.console.is_terminal if live is None else live)
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
                BarColumn(bar_width=24),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=self.total, speed="")
            self._status = Text("")
            self._live = Live(
                Group(self._progress, self._status), console=self.console, refresh_per_second=4
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._live.__exit__(*exc)

    def start_at(self, step: int) -> None:
        """A resumed run: rates and ETA count from here."""
        self._first_step = step
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def update(self, step: int, loss: float, lr: float, epoch: int = 0) -> None:
        elapsed = time.perf_counter() - self._t0
        done = step - getattr(self, "_first_step", 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        if not self.enabled:
            return
        mem = f"{peak_memory_gib(self.device):.2f} GiB"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, speed=f"{rate:.2f} it/s")
            self._status.plain = (
                f"  epoch {epoch}  loss {loss:.4f}  lr {lr:.2e}  peak mem {mem}\n"
                f"  last checkpoint {self.last_checkpoint}\n  last grid {self.last_grid}"
            )
        else:
            print(
                f"step {step}/{self.total}  epoch {epoch}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{rate:.2f} it/s  eta {_fmt_eta(eta)}  peak mem {mem}",
                flush=True,
            )
        self._last_step = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._live.console.print(text)
        else:
            self.console.print(text, highlight=False)
            sys.stdout.flush()
