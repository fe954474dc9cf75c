"""The planner against the recorded H100 measurements (no GPU needed: the planner runs on meta).

Rebuilds, through `lorakit.config.resolve` + `lorakit.planner.plan`, the exact configs that
`benchmarks/gpu_check.py` measured on an NVIDIA H100 80GB (torch 2.11 + cu130) and prints the
planner's training-phase prediction next to the recorded `torch.cuda.max_memory_allocated`:

- `benchmarks/gpu_check-h100-families-2026-11-26.json`: the real SD1.5 (512 px), SDXL
  (1024 px) and FLUX.1-dev (1024 px, NF4 base, T5 length 256) architectures with random bf16
  weights, LoRA r16 on the family's default targets, 8-bit AdamW, batch 1, gradient
  checkpointing, cached latents/text (denoiser only on the GPU);
- `benchmarks/gpu_check-h100-2026-11-26.json`: the real SD1.5 UNet at 512 px with fp16 frozen
  weights, LoRA r16 on attention, 8-bit AdamW, with and without gradient checkpointing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/planner_gpu_rows.py [--json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES_JSON = HERE / "gpu_check-h100-families-2026-11-26.json"
SD15_JSON = HERE / "gpu_check-h100-2026-11-26.json"
PRESETS = {"sd15": "sd15-8gb", "sdxl": "sdxl-12gb", "flux": "flux-16gb"}


def rows() -> list[dict]:
    """(name, config --set lines, measured GiB) for the five recorded H100 runs."""
    out = []
    for r in json.loads(FAMILIES_JSON.read_text())["families"]:
        sets = ["sample.every=0", "lora.rank=16", "lora.alpha=16.0", "train.batch_size=1",
                "train.gradient_checkpointing=true", f"data.resolution={r['resolution']}",
                "train.mixed_precision='bf16'", f"model.quantize='{r['quantize']}'",
                "train.optimizer='adamw8bit'", "lora.target_modules=[]",
                "train.offload_activations=false"]  # fmt: skip
        name = f"{r['family']} {r['resolution']}px bf16{' NF4' if r['quantize'] != 'none' else ''}"
        out.append(dict(name=name + ", ckpt", preset=PRESETS[r["family"]], sets=sets,
                        measured=r["peak_allocated_gib"],
                        recorded_planner=r["planner_train_gib"]))  # fmt: skip
    for r in json.loads(SD15_JSON.read_text())["sd15_unet_512px_batch1"]:
        ckpt = r["checkpointing"]
        sets = ["sample.every=0", "lora.rank=16", "lora.alpha=16.0", "train.batch_size=1",
                f"train.gradient_checkpointing={str(ckpt).lower()}", "data.resolution=512",
                "train.mixed_precision='fp16'", "train.optimizer='adamw8bit'",
                "lora.target_modules=[]"]  # fmt: skip
        out.append(dict(name=f"sd15 512px fp16, ckpt {'on' if ckpt else 'off'}",
                        preset="sd15-8gb", sets=sets, measured=r["peak_gib"]))  # fmt: skip
    return out


def compare() -> list[dict]:
    from lorakit import config as cfg
    from lorakit import planner

    result = []
    for r in rows():
        t0 = time.perf_counter()
        p = planner.plan(cfg.resolve(preset=r["preset"], sets=r["sets"]))
        seconds = time.perf_counter() - t0
        predicted = p.phases["train"] / planner.GIB
        act = next(v for k, v in p.rows.items() if k.startswith("activations")) / planner.GIB
        result.append(dict(r, predicted=round(predicted, 3), activations=round(act, 3),
                           error=(predicted - r["measured"]) / r["measured"],
                           seconds=round(seconds, 1)))  # fmt: skip
    return result


def main() -> None:
    import torch

    torch.set_num_threads(2)
    out = compare()
    print("| run (H100, max_memory_allocated) | measured GiB | planner GiB | error | "
          "of which activations GiB | planner s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['name']} | {r['measured']:.3f} | {r['predicted']:.3f} | {r['error']:+.1%} | "
              f"{r['activations']:.3f} | {r['seconds']} |")  # fmt: skip
    if "--json" in sys.argv:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
