"""GPU smoke check + SD1.5 step measurements, as one short script for a lent GPU machine.

1. The real CLI trains the tiny model on CUDA with fp16 + 8-bit AdamW + checkpointing, renders
   grids and exports; then with bf16. Checks files exist and losses are finite.
2. The real SD1.5 UNet architecture (random weights, fp16 frozen, LoRA r16 on attention) at
   512 px / batch 1: peak CUDA memory and median step time, with and without gradient
   checkpointing, AdamW8bit — the lorakit step (family.loss + lorakit optimizer).

Writes a JSON report to $OUT/gpu_check.json (or ./gpu_check.json) and prints it.
Run locally with `--cpu-dry-run` to check the script itself on tiny settings.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def cli_runs(dry: bool) -> list[dict]:
    results = []
    variants = [("fp16", "adamw8bit"), ("bf16", "adamw8bit")] if not dry else [("no", "adamw")]
    for precision, optimizer in variants:
        out = Path(tempfile.mkdtemp()) / "run"
        cmd = [
            sys.executable, "-m", "lorakit", "train", str(ROOT / "samples" / "brand"),
            "--preset", "tiny-cpu", "--out", str(out), "--steps", "20",
            "--set", f"train.device='{'cpu' if dry else 'cuda'}'",
            "--set", f"train.mixed_precision='{precision}'",
            "--set", f"train.optimizer='{optimizer}'", "--set", "train.optimizer_fallback=false",
            "--set", "sample.every=10",
            "--set", f"sample.prompts='{ROOT / 'samples' / 'prompts.txt'}'",
        ]  # fmt: skip
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        results.append(
            {
                "precision": precision,
                "optimizer": optimizer,
                "exit": proc.returncode,
                "seconds": round(time.time() - t0, 1),
                "losses": run.get("losses"),
                "files_ok": all(
                    (out / p).is_file()
                    for p in (
                        "lorakit.safetensors",
                        "diffusers/pytorch_lora_weights.safetensors",
                        "config.toml",
                        "samples/step-000020.png",
                    )
                ),
                "tail": (proc.stdout + proc.stderr)[-1500:],
            }
        )
    return results


def sd15_step(checkpointing: bool, dry: bool, steps: int = 12) -> dict:
    from diffusers import PNDMScheduler, UNet2DConditionModel

    from lorakit.config import LoraConfigSection, TrainConfig
    from lorakit.lora import inject_lora
    from lorakit.models.sd15 import SD15, SD15_SCHEDULER, SD15Components
    from lorakit.train import build_optimizer

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.float16
    config = dict(SD15_UNET)
    if dry:
        config.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, sample_size=8)
    unet = UNet2DConditionModel(**config).to(device, dtype)
    unet.requires_grad_(False)
    params = inject_lora(unet, LoraConfigSection(rank=16, alpha=16.0), seed=0)
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    fam = SD15()
    comps = SD15Components(unet, None, None, None, PNDMScheduler(**SD15_SCHEDULER))
    opt = build_optimizer(params, TrainConfig(optimizer="adamw" if dry else "adamw8bit"), device)
    side = config["sample_size"]
    latents = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    cond = {
        "encoder_hidden_states": torch.randn(
            1, 77, config["cross_attention_dim"], device=device, dtype=dtype
        )
    }
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler(enabled=not dry)
    if not dry:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise, t = fam.noise_and_timesteps(comps, latents, gen, TrainConfig())
        with torch.autocast(device.type, dtype=dtype, enabled=not dry):
            loss = fam.loss(comps, unet, latents, cond, noise, t, TrainConfig())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if not dry:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if not dry else float("nan")
    del unet, opt
    if not dry:
        torch.cuda.empty_cache()
    return {
        "checkpointing": checkpointing,
        "lora_params": sum(p.numel() for p in params),
        "median_step_s": round(statistics.median(times[2:]), 4),
        "peak_gib": round(peak, 3),
        "loss": float(loss),
    }


def main() -> None:
    dry = "--cpu-dry-run" in sys.argv
    report: dict = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0)}
    report["torch"] = torch.__version__
    report["cli"] = cli_runs(dry)
    report["sd15_unet_512px_batch1"] = [sd15_step(True, dry), sd15_step(False, dry)]
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    out.write_text(text)


if __name__ == "__main__":
    main()
