"""GPU smoke check + SD1.5 step measurements, as one short script for a lent GPU machine.

1. The real CLI trains the tiny model on CUDA with fp16 + 8-bit AdamW + checkpointing, renders
   grids and exports; then with bf16. Checks files exist and losses are finite.
2. The real SD1.5 UNet architecture (random weights, fp16 frozen, LoRA r16 on attention) at
   512 px / batch 1: peak CUDA memory and median step time, with and without gradient
   checkpointing, AdamW8bit — the lorakit step (family.loss + lorakit optimizer).

3. The real SD1.5 (512 px), SDXL (1024 px) and FLUX.1-dev (1024 px, NF4 base) architectures with
   random bf16 weights built on the GPU: 5 LoRA r16 steps each through lorakit's loss and
   optimizer (8-bit AdamW, checkpointing, batch 1, cached latents/embeddings: denoiser only on the
   GPU, as `lorakit train` runs with previews off), with peak allocated memory, s/it and
   `lorakit.planner`'s prediction side by side. NF4: the random transformer is saved to /tmp and
   re-loaded through `lorakit.models.quantize.quantize_loaded` (diffusers' BitsAndBytesConfig,
   the product's own path; ~24 GB of disk, ~1-2 min).
   FLUX runs twice: plain checkpointing, then `train.offload_activations` (row `flux+offload`:
   the checkpointed blocks' inputs in pinned CPU memory, `lorakit/offload.py`).

Writes a JSON report to $OUT/gpu_check.json (or ./gpu_check.json) after every part, so partial
results survive a timeout, and prints progress. `--tiny` (alias `--cpu-dry-run`) runs everything
on the CPU with tiny shapes to check the script; `--only families` skips parts 1-2.
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


FAMILY_RUNS = {  # row: (preset, resolution, quantize, train.offload_activations)
    "sd15": ("sd15-8gb", 512, "none", False),
    "sdxl": ("sdxl-12gb", 1024, "none", False),
    "flux": ("flux-16gb", 1024, "nf4", False),
    "flux+offload": ("flux-16gb", 1024, "nf4", True),  # checkpoint inputs in pinned CPU memory
}
TARGET_GIB = {"sd15": 4.0, "sdxl": 8.0, "flux": 10.0}


def _real_denoiser(family: str, dry: bool, quantize: str, device, dtype):
    """Random-weight denoiser of the real architecture (tiny config with `dry`)."""
    from lorakit import planner
    from lorakit.models import get_family

    if dry:
        return getattr(get_family(family).build_tiny(seed=0), get_family(family).denoiser_name)
    meta = planner.build_denoiser(family)
    cls, config = type(meta), dict(meta.config)
    del meta
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config).to(dtype)
    if quantize != "none":
        from lorakit.models.quantize import quantize_loaded

        t0 = time.time()
        model = quantize_loaded(model.to("cpu"), quantize)  # save to /tmp, reload NF4 on CUDA
        model = model.to(device)  # as train.py places a quantized denoiser
        print(f"  quantized {quantize} in {time.time() - t0:.0f} s", flush=True)
    return model


def family_step(row: str, dry: bool, steps: int = 5) -> dict:
    """5 LoRA r16 steps of the real architecture with lorakit's loss and optimizer."""
    from lorakit import config as cfg
    from lorakit import planner
    from lorakit.lora import inject_lora
    from lorakit.models import get_family
    from lorakit.train import build_optimizer

    preset, res, quantize, offload = FAMILY_RUNS[row]
    family = row.split("+")[0]
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    sets = ["sample.every=0", "lora.rank=16", "lora.alpha=16.0", "train.batch_size=1",
            "train.gradient_checkpointing=true", f"data.resolution={res}",
            "train.mixed_precision='bf16'", f"model.quantize='{quantize}'",
            "train.optimizer='adamw8bit'", "lora.target_modules=[]",
            f"train.offload_activations={str(offload).lower()}"]  # fmt: skip
    c = cfg.resolve(preset=preset, sets=sets)
    t0 = time.perf_counter()
    p = planner.plan(c)
    plan_s = time.perf_counter() - t0
    fam = get_family(family)
    tiny = fam.build_tiny(seed=0)  # scheduler etc. for family.loss; denoiser replaced below
    den = _real_denoiser(family, dry, quantize, device, dtype)
    setattr(tiny, fam.denoiser_name, den)
    den.requires_grad_(False)
    params = inject_lora(den, cfg.resolve(sets=["lora.rank=16"]).lora.__class__(
        rank=16, alpha=16.0, target_modules=list(fam.default_targets)), seed=0)  # fmt: skip
    for q in params:
        q.data = q.data.float()
    if offload:  # as lorakit.train does on CUDA (on the CPU dry run: copies CPU → CPU)
        from lorakit.offload import OffloadedCheckpoint

        den.enable_gradient_checkpointing(gradient_checkpointing_func=OffloadedCheckpoint())
    else:
        den.enable_gradient_checkpointing()
    den.train()
    opt = build_optimizer(params, c.train if not dry else
                          cfg.resolve(sets=["train.optimizer='adamw'"]).train, device)  # fmt: skip
    arch = planner.ARCHS[family]
    side = (res if not dry else fam.tiny_resolution) // 8
    lat_ch = arch.latent_channels if not dry else tiny.vae.config.latent_channels
    latents = torch.randn(1, lat_ch, side, side, device=device, dtype=dtype)
    if dry:
        cond = {k: v.to(device, dtype) for k, v in fam.encode_prompts(tiny, ["a logo"]).items()}
    else:
        _, _, cond = planner._inputs(family, 1, side, side, dtype, c.model.t5_max_length or 512)
        cond = {k: torch.randn(v.shape, device=device, dtype=v.dtype) for k, v in cond.items()}
    if family == "sdxl":
        cond.update({k: v.to(device) for k, v in fam.image_conditioning(
            tiny, (res, res), (0, 0), (res, res)).items()})  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    if not dry:  # the peak from here on: not the fp32 build / quantization above
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        noise, t = fam.noise_and_timesteps(tiny, latents.float().cpu(), gen, c.train)
        noise = noise.to(device, dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not dry):
            loss = fam.loss(tiny, den, latents, cond, noise, t.to(device), c.train)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not dry:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"  {family} step {i + 1}/{steps}: {times[-1]:.2f} s, loss {float(loss):.4f}",
              flush=True)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30 if not dry else None
    predicted = p.phases["train"] / 2**30
    del den, opt, params, tiny
    if not dry:
        torch.cuda.empty_cache()
    return {
        "family": family,
        "offload_activations": offload,
        "resolution": res,
        "quantize": quantize,
        "s_per_it": round(statistics.median(times[1:]), 3),
        "peak_allocated_gib": None if dry else round(peak, 3),
        "planner_train_gib": round(predicted, 3),
        "planner_error": None if dry else round((predicted - peak) / peak, 3),
        "target_gib": TARGET_GIB[family],
        "meets_target": None if dry else peak <= TARGET_GIB[family],
        "planner_seconds": round(plan_s, 2),
        "loss": float(loss),
    }


def main() -> None:
    dry = "--cpu-dry-run" in sys.argv or "--tiny" in sys.argv
    only_families = "--only" in sys.argv and "families" in sys.argv
    out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    report: dict = {"device": "cpu (tiny dry run)" if dry else torch.cuda.get_device_name(0)}
    report["torch"] = torch.__version__

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    save()
    if not only_families:
        print("== CLI runs", flush=True)
        report["cli"] = cli_runs(dry)
        save()
        print("== SD1.5 UNet step", flush=True)
        report["sd15_unet_512px_batch1"] = [sd15_step(True, dry), sd15_step(False, dry)]
        save()
    report["families"] = []
    # --rows=a,b: only these rows (a session's device time does not fit them all at once)
    rows = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--rows=")), [])
    for family in rows or FAMILY_RUNS:
        print(f"== {family}", flush=True)
        t0 = time.time()
        try:
            row = family_step(family, dry)
        except Exception as e:  # keep going: the other families' numbers still count
            row = {"family": family, "error": f"{type(e).__name__}: {e}"[:2000]}
        row["wall_s"] = round(time.time() - t0, 1)
        report["families"].append(row)
        print(json.dumps(row), flush=True)
        save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
