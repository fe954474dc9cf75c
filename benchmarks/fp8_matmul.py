"""`model.fp8_matmul`: s/it and peak device memory of training steps on an fp8 base with the
layers widened before each matmul (`model.quantize = "fp8"` alone) and multiplied in fp8
(`+ model.fp8_matmul`), side by side in one process, alternating per round.

The family's REAL-width denoiser with random bf16 weights built on the device
(`block_swap.real_denoiser`), stored fp8 (`enable_fp8_storage`), LoRA r16 on the family's
default targets, torch AdamW, bf16 autocast, gradient checkpointing, batch 1 at `--resolution`
(the same step as benchmarks/block_swap.py). The fp8 matmul is switched on and off on the same
model (the layerwise-casting hooks' functions are saved and put back), so both sides use the
same weights and allocator.

    python benchmarks/fp8_matmul.py --family flux --resolution 1024 --rounds 2   # GPU, sm_89+
    python benchmarks/fp8_matmul.py --family flux --tiny                         # CPU dry run

On the CPU the fp8 products are computed widened (`quantize.scaled_mm`): the dry run checks the
script, its times mean nothing. Prints one table and the ratio; `--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_swap import for_training, model_for, timed

from lorakit.models.quantize import enable_fp8_matmul, enable_fp8_storage

GIB = 2**30


def hook_refs(den):
    """(fn_ref, forward, pre_forward, post_forward) of every layerwise-casting hook."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    out = []
    for m in den.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            r = hook.fn_ref
            out.append((r, r.forward, r.pre_forward, r.post_forward))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (dry run)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    fam, den, comps, device, dtype, resolution = model_for(a)
    enable_fp8_storage(den.to(dtype=dtype), dtype)
    widened = hook_refs(den)
    switched = enable_fp8_matmul(den)
    fast = hook_refs(den)

    def use(refs):
        for r, fwd, pre, post in refs:
            r.forward, r.pre_forward, r.post_forward = fwd, pre, post

    params, batch = for_training(a, fam, den, comps, device, dtype, resolution)
    rows = []
    for r in range(a.rounds):
        for name, refs in (("widened", widened), ("fp8 matmul", fast)):
            use(refs)
            rows.append(dict(timed(fam, den, params, batch, device, a.steps, dtype),
                             matmul=name, round=r))  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{a.family}, {resolution} px, fp8 base, {switched} layers switched, {device} ({gpu}), "
          f"torch {torch.__version__}")  # fmt: skip
    print("| round | matmul | s/it | peak allocated GiB |")
    print("|---|---|---|---|")
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(f"| {row['round']} | {row['matmul']} | {row['s_per_it']:.3f} | {peak} |")

    def mean(name, key):
        return statistics.mean(r[key] for r in rows if r["matmul"] == name)

    line = f"fp8 matmul / widened: s/it ×{mean('fp8 matmul', 's_per_it') / mean('widened', 's_per_it'):.2f}"  # noqa: E501
    if device.type == "cuda":
        line += f", peak ×{mean('fp8 matmul', 'peak_gib') / mean('widened', 'peak_gib'):.2f}"
    print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"family": a.family, "resolution": resolution, "switched": switched,
                       "rows": rows}, f, indent=2)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
