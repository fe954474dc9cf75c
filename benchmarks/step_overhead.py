"""Loop overhead: lorakit's real training loop versus a bare forward/backward/step loop.

Both sides train the same LoRA-injected tiny SD1.5 UNet (same rank, targets, optimizer, batch
shape, gradient checkpointing) in ONE process, alternating blocks so machine noise hits both:

- lorakit: `lorakit.train.train()` with previews, held-out scoring, trackers and checkpoints off;
  per-step times come from the reporter's update calls (log_every = 1), after warm-up.
- bare: the same model, one cached batch, `loss = F.mse_loss(unet(x, t, h), noise)`, backward,
  AdamW step, zero_grad — nothing else.

Prints the median step time of each and the ratio (target ≤ 1.05). Run:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_overhead.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from lorakit import config as cfg
from lorakit.config import LoraConfigSection
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES
from lorakit.progress import Reporter
from lorakit.quiet import quiet
from lorakit.train import train

ROOT = Path(__file__).resolve().parent.parent


class TimingReporter(Reporter):
    def __init__(self, total: int):
        super().__init__(total, live=False, enabled=True)
        self.times: list[float] = []

    def update(self, step, loss, lr, epoch=0):
        self.times.append(time.perf_counter())

    def message(self, text):
        pass


def lorakit_steps(steps: int, warmup: int) -> list[float]:
    out = Path(tempfile.mkdtemp()) / "run"
    c = cfg.resolve(
        preset="tiny-cpu",
        sets=[
            f"train.out='{out}'", f"train.steps={steps}", "train.log_every=1",
            "train.optimizer='adamw'", "train.save_every=0", "sample.every=0",
            "eval.images=0", "eval.palette_colors=0", "log.tensorboard=false",
            "train.batch_size=2", "data.bucketing=false", "train.warmup_steps=0",
        ],
    )  # fmt: skip
    rep = TimingReporter(steps)
    train(c, ROOT / "samples" / "brand", reporter=rep)
    t = rep.times
    return [b - a for a, b in zip(t[warmup:-1], t[warmup + 1 :], strict=True)]


def bare_steps(steps: int, warmup: int) -> list[float]:
    fam = FAMILIES["sd15"]
    comps = fam.build_tiny(seed=0)
    unet = comps.unet
    c = cfg.resolve(preset="tiny-cpu")
    params = inject_lora(unet, LoraConfigSection(rank=c.lora.rank, alpha=c.lora.alpha), seed=0)
    unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 77, 32, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = F.mse_loss(unet(x, t, h).sample.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warmup = 5
    ours, bare = [], []
    for _ in range(args.rounds):
        ours += lorakit_steps(args.steps, warmup)
        bare += bare_steps(args.steps, warmup)
    mo, mb = statistics.median(ours), statistics.median(bare)
    print(f"torch threads: {torch.get_num_threads()}, steps per side: {len(ours)} / {len(bare)}")
    print(f"lorakit loop median step: {mo * 1000:.1f} ms")
    print(f"bare loop median step:    {mb * 1000:.1f} ms")
    print(f"ratio lorakit / bare:     {mo / mb:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
