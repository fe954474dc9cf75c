"""`train.block_swap`: s/it and peak device memory of training steps with and without streamed
blocks, side by side in one process (alternating, so clocks and allocator state are shared).

The family's REAL-width denoiser (`FAMILIES[name].build_real_denoiser()`: FLUX.1-dev, SD3.5
large, Qwen-Image, ...) with random bf16 weights built directly on the device, LoRA r16 on the
family's default targets, torch AdamW, bf16 autocast, gradient checkpointing (as `lorakit train`
runs it), batch 1 at `--resolution` with the family's text length. Each round times `--steps`
steps after one warm-up step, first without swap, then with `--blocks N` streamed
(`lorakit.blockswap.enable_block_swap`), which `BlockSwap.remove` undoes for the next round.

    python benchmarks/block_swap.py --family qwen-image --blocks 45 --resolution 1024
    python benchmarks/block_swap.py --family flux --blocks 3 --tiny     # CPU dry run
    python benchmarks/block_swap.py --family qwen-image --blocks 45 --quantize fp8   # fp8 base

`--quantize fp8` stores the frozen Linear/Conv weights as float8 e4m3 (`model.quantize = 'fp8'`,
`lorakit.models.quantize.enable_fp8_storage`) before the LoRA is injected, as `lorakit train`
does: both rounds then run on the fp8 base, and the streamed blocks move fp8 bytes.

Prints one table and the ratios; `--json PATH` writes the rows. musubi-tuner's published
reference for Qwen-Image (`docs/qwen_image.md`, 1024², batch 1, bf16 mixed precision, gradient
checkpointing): 42 GB without options, 30 GB with an fp8 base, 24 GB + 16 swapped blocks, 12 GB
+ 45 swapped blocks; printed beside the measurement (the base stays bf16 unless
`--quantize fp8`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lorakit.blockswap import enable_block_swap
from lorakit.config import LoraConfigSection
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES

GIB = 2**30
MUSUBI = {
    "qwen-image": "musubi-tuner docs/qwen_image.md (1024², batch 1): 42 GB plain; fp8 base 30 GB, "
    "+16 swapped 24 GB, +45 swapped 12 GB"
}


def real_denoiser(family: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The real architecture with random weights, allocated on `device` only (never in fp32 on
    the host: Qwen-Image would need 80 GB there)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers (rope tables) computed for real
        den = FAMILIES[family].build_real_denoiser()
    buffers = {n: b.clone() for n, b in den.named_buffers()}
    for p in den.parameters():
        p.data = p.data.to(dtype)
    den.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0, 0.02, generator=gen)
        for n, b in den.named_buffers():
            b.copy_(buffers[n])
    return den.requires_grad_(False)


def model_for(a):
    """(family, denoiser, tiny components or None, device, dtype, resolution) for the parsed
    `--family`, `--tiny` and `--resolution`: the tiny model on the CPU in fp32, else the real
    denoiser on CUDA in bf16 (`real_denoiser`). Shared with benchmarks/fp8_matmul.py."""
    if a.family not in FAMILIES:
        sys.exit(f"family '{a.family}' is not registered here ({', '.join(FAMILIES)})")
    fam = FAMILIES[a.family]
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.tiny:
        comps = fam.build_tiny(0)
        return fam, getattr(comps, fam.denoiser_name), comps, device, dtype, fam.tiny_resolution
    return fam, real_denoiser(a.family, device, dtype), None, device, dtype, a.resolution


def for_training(a, fam, den, comps, device, dtype, resolution):
    """(LoRA parameters, one batch): LoRA r16 on the family's default targets in fp32, the
    denoiser on `device` with gradient checkpointing, as `lorakit train` runs it."""
    lora = LoraConfigSection(rank=16, alpha=16.0, target_modules=list(fam.default_targets))
    params = inject_lora(den, lora, 0)
    for p in params:
        p.data = p.data.float()
    den.to(device)
    den.enable_gradient_checkpointing()
    den.train()
    return params, inputs(a.family, den, comps, resolution, device, dtype)


def inputs(family: str, den, comps, resolution: int, device, dtype):
    fam = FAMILIES[family]
    side = resolution // 8
    if comps is not None:  # tiny: the tiny model's own encoders
        cond = fam.encode_prompts(comps, ["tdwl coffee cup"])
        lat = torch.randn(1, fam.plan_arch.latent_channels, side, side)
        return lat.to(device, dtype), torch.full((1,), 0.5, device=device), cond
    lat, t, cond = fam.planner_inputs(1, side, side, dtype, fam.text_length)

    def real(x):
        if x.is_floating_point():
            return torch.randn(x.shape, dtype=x.dtype, device=device)
        return torch.ones(x.shape, dtype=x.dtype, device=device)

    tt = torch.full(t.shape, 0.5 if t.is_floating_point() else 500, dtype=t.dtype, device=device)
    return real(lat), tt, {k: real(v) for k, v in cond.items()}


def timed(fam, den, params, batch, device, steps: int, dtype) -> dict:
    lat, t, cond = batch
    opt = torch.optim.AdamW(params, lr=1e-5)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            pred = fam.predict(den, lat, t, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), lat.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator, optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "s_per_it": statistics.mean(times),
        "seconds": time.perf_counter() - start,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux")
    ap.add_argument("--blocks", type=int, default=20, help="train.block_swap N")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (dry run)")
    ap.add_argument("--quantize", choices=("none", "fp8"), default="none",
                    help="fp8: the frozen base stored as float8 e4m3 (model.quantize)")  # fmt: skip
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    fam, den, comps, device, dtype, resolution = model_for(a)
    if a.quantize == "fp8":  # as `train._load_model`: before the LoRA, in the compute dtype
        from lorakit.models.quantize import enable_fp8_storage

        enable_fp8_storage(den.to(dtype=dtype), dtype)
    params, batch = for_training(a, fam, den, comps, device, dtype, resolution)
    rows = []
    for r in range(a.rounds):
        rows.append(dict(timed(fam, den, params, batch, device, a.steps, dtype), swap=0, round=r))
        swap = enable_block_swap(den, fam, a.blocks, device)
        row = timed(fam, den, params, batch, device, a.steps, dtype)
        per_step = swap.h2d_bytes / (a.steps + 1) / GIB  # warm-up included
        rows.append(dict(row, swap=a.blocks, round=r, pinned=swap.pinned,
                         host_gib=swap.host_bytes / GIB, ring_gib=swap.device_bytes / GIB,
                         h2d_gib_per_step=per_step))  # fmt: skip
        swap.remove()
    print(f"{a.family}, {resolution} px, base {a.quantize}, {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}), "  # noqa: E501
          f"torch {torch.__version__}")  # fmt: skip
    print("| round | block_swap | s/it | peak allocated GiB | host GiB | ring GiB | H2D GiB/step |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for row in rows:
        print(f"| {row['round']} | {row['swap']} | {row['s_per_it']:.3f} | "
              f"{fmt(row['peak_gib'])} | {fmt(row.get('host_gib'))} | {fmt(row.get('ring_gib'))} | "
              f"{fmt(row.get('h2d_gib_per_step'))} |")  # fmt: skip
    plain = [r for r in rows if not r["swap"]]
    swapped = [r for r in rows if r["swap"]]
    speed = statistics.mean(r["s_per_it"] for r in swapped) / statistics.mean(
        r["s_per_it"] for r in plain
    )
    line = f"swap/plain: s/it ×{speed:.2f}"
    if device.type == "cuda":
        mem = statistics.mean(r["peak_gib"] for r in swapped) / statistics.mean(
            r["peak_gib"] for r in plain
        )
        line += f", peak ×{mem:.2f}"
    print(line)
    if a.family in MUSUBI:
        print(MUSUBI[a.family])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"family": a.family, "resolution": resolution, "quantize": a.quantize,
                       "rows": rows}, f, indent=2)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
