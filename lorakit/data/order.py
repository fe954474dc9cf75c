"""Which samples each step trains on, and the per-sample randomness (noise, timesteps, caption
dropout / tag shuffle): all pure functions of (seed, sample number in the run), independent of
batch layout and process count, so nothing but (epoch, position) is needed to resume."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.data.training import epoch_batches
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.config import Config
    from lorakit.models.base import Family


class BatchOrder:
    """Which records form the next batch of this process.

    Each epoch's list of GLOBAL batches (per-device batch × processes, one bucket each, repeats
    expanded, shuffled) is `epoch_batches(...)` — a pure function of (seed, epoch) — so
    (epoch, position) is all a checkpoint needs. Rank r trains on slice r of each global batch:
    ranks never share an image within a step or an epoch, and W processes at batch B see exactly
    the batches one process sees at batch W·B.
    """

    def __init__(self, records, batch_size: int, seed: int, world: int = 1, rank: int = 0):
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.world, self.rank = world, rank
        self.epoch, self.position = 0, 0
        self._batches = self._for_epoch(0)

    def _for_epoch(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.records, self.batch_size * self.world, self.seed, epoch)
        if not batches:
            raise ConfigError(
                f"No image bucket can fill a global batch of {self.batch_size * self.world} "
                f"(train.batch_size {self.batch_size} × {self.world} processes). Lower the batch "
                "size, add images, use fewer processes or turn off data.bucketing."
            )
        return batches

    def per_epoch(self) -> int:
        """Global steps (micro-batches per process) in one epoch."""
        return len(self._batches)

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._batches = self._for_epoch(epoch)

    def next(self) -> list[int]:
        bs = self.batch_size
        batch = self._batches[self.position][self.rank * bs : (self.rank + 1) * bs]
        self.position += 1
        if self.position == self.per_epoch():
            self.seek(self.epoch + 1, 0)
        return batch


def trace_batch(rank: int, step: int, idx: list[int]) -> None:
    """LORAKIT_TRACE_BATCHES=FOLDER records which images each rank trained on (for tests)."""
    folder = os.environ.get("LORAKIT_TRACE_BATCHES")
    if folder:
        with open(Path(folder) / f"rank{rank}.txt", "a", encoding="utf-8") as f:
            f.write(f"{step} {' '.join(str(int(i)) for i in idx)}\n")


def draw_noise(family: Family, comps, latents: torch.Tensor, c: Config, first_uid: int):
    """Noise and timesteps drawn per sample from a generator seeded by (seed, sample number in
    the whole run): independent of batch layout and process count, and needs no RNG state to
    resume."""
    noises, steps = [], []
    for i in range(latents.shape[0]):
        uid = first_uid + i
        gen = torch.Generator("cpu").manual_seed(
            (c.train.seed * 0x9E3779B1 + uid * 0x85EBCA77) % 2**63
        )
        noise, t = family.noise_and_timesteps(comps, latents[i : i + 1], gen, c.train)
        noises.append(noise)
        steps.append(t)
    return torch.cat(noises), torch.cat(steps)


def sample_rng(seed: int, uid: int) -> random.Random:
    """Per-sample RNG for caption dropout / tag shuffle: layout-independent and resumable."""
    return random.Random((seed * 0x9E3779B1 + uid * 0x85EBCA77 + 1) % 2**63)
