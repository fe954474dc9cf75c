"""Caching: wall time and peak memory of a short run with and without latent/text caching.

- cached: `lorakit.train.train()` as users run it — every image through the VAE and every
  caption through the text encoder once (on-disk cache under OUT/cache), then the loop.
- uncached: the same model, data, batch and step count, but each step encodes its batch's
  images with the VAE and its captions with the text encoder again (what trainers without
  caching do); implemented here, not in the product.

Each side runs in its own subprocess so peak RSS (ru_maxrss) is its own. Run:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/caching.py [--steps 30] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config(steps: int, resolution: int, out: Path):
    from lorakit import config as cfg

    return cfg.resolve(
        preset="tiny-cpu",
        sets=[
            f"train.out='{out}'", f"train.steps={steps}", f"data.resolution={resolution}",
            "train.optimizer='adamw'", "train.save_every=0", "sample.every=0",
            "eval.images=0", "eval.palette_colors=0", "log.tensorboard=false",
            "data.bucketing=false", "train.log_every=1000",
        ],
    )  # fmt: skip


def cached(steps: int, resolution: int) -> None:
    from lorakit.progress import Reporter
    from lorakit.train import train

    out = Path(tempfile.mkdtemp()) / "run"
    train(_config(steps, resolution, out), ROOT / "samples" / "brand", Reporter(steps, live=False))


def uncached(steps: int, resolution: int) -> None:
    import torch

    from lorakit.data.training import epoch_batches, load_training_set
    from lorakit.lora import inject_lora
    from lorakit.models import load_model
    from lorakit.train import build_optimizer

    out = Path(tempfile.mkdtemp()) / "run"
    c = _config(steps, resolution, out)
    data = load_training_set(ROOT / "samples" / "brand", c.data, c.train.batch_size)
    family, comps = load_model(c.model)
    params = inject_lora(comps.unet, c.lora, c.train.seed)
    comps.unet.enable_gradient_checkpointing()
    comps.unet.train()
    opt = build_optimizer(params, c.train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batches = [b for e in range(100) for b in epoch_batches(data.records, 2, 0, e)][:steps]
    for idx in batches:
        pixels = torch.stack([data.pixels(i) for i in idx])  # decoded and encoded every step
        latents = family.encode_images(comps, pixels)
        cond = family.encode_prompts(comps, [data.records[i].caption for i in idx])
        noise, t = family.noise_and_timesteps(comps, latents, gen, c.train)
        loss = family.loss(comps, comps.unet, latents, cond, noise, t, c.train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def child(side: str, steps: int, resolution: int) -> None:
    from lorakit.quiet import quiet

    quiet()
    t0 = time.perf_counter()
    {"cached": cached, "uncached": uncached}[side](steps, resolution)
    print(json.dumps({
        "side": side,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--child", choices=["cached", "uncached"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.resolution)
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    results = {}
    for side in ("uncached", "cached", "uncached", "cached"):  # alternate against drift
        cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps),
               "--resolution", str(args.resolution)]  # fmt: skip
        line = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(line.strip().splitlines()[-1])
        results.setdefault(side, []).append(r)
    for side, runs in results.items():
        secs = min(r["seconds"] for r in runs)
        rss = max(r["peak_rss_gib"] for r in runs)
        print(f"{side:>9}: best of 2 {secs:7.2f} s, peak RSS {rss:.3f} GiB")
    ratio = min(r["seconds"] for r in results["uncached"]) / min(
        r["seconds"] for r in results["cached"]
    )
    print(f"uncached / cached wall time: {ratio:.2f}x ({args.steps} steps, {args.resolution} px)")


if __name__ == "__main__":
    main()
