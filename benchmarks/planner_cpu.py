"""Planner accuracy on CPU: predicted vs MEASURED peak memory of one training step.

For SD1.5 UNets and FLUX transformers of two sizes (tiny = the test models; mid = wider/deeper)
and the Qwen-Image, Z-Image and FLUX.2 klein tiny transformers and wider/deeper "mid" variants
(`FAMILY_MID`; inputs from their own tiny
encoders at 64 px, every caption position a token as the planner plans), with and without
gradient checkpointing (and FLUX with `train.offload_activations`), fp32, LoRA r4 on the
family's default targets, torch AdamW, batch 2:

- measured: `lorakit.planner.measure_step` — a real CPU step (forward + MSE + backward +
  optimizer step) under `planner.StorageMeter`, which counts every live tensor storage
  (weights, batch, activations, gradients, optimizer state) and reports the peak;
- planner: `lorakit.planner.step_rows` — the same architecture built on the meta device, its
  components summed (weights, LoRA, gradients, optimizer state from exact byte counts;
  activations from the meta forward+backward simulation).

Prints one table (total peak and the activation part separately) and writes JSON with `--json`.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/planner_cpu.py
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch

from lorakit import planner
from lorakit.config import LoraConfigSection
from lorakit.lora import inject_lora
from lorakit.models import FAMILIES
from lorakit.models.flux import TINY_FLUX_TRANSFORMER
from lorakit.models.sd15 import TINY_UNET

MID_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
    block_out_channels=(64, 128), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
MID_FLUX = dict(
    TINY_FLUX_TRANSFORMER, num_layers=2, num_single_layers=4, attention_head_dim=32,
    num_attention_heads=4, axes_dims_rope=(8, 12, 12), joint_attention_dim=64,
    pooled_projection_dim=64,
)  # fmt: skip
MODELS = {  # name: (family, config, latent side)
    "sd15 tiny": ("sd15", TINY_UNET, 16),
    "sd15 mid": ("sd15", MID_UNET, 32),
    "flux tiny": ("flux", TINY_FLUX_TRANSFORMER, 32),
    "flux mid": ("flux", MID_FLUX, 32),
}


def build(family: str, config: dict, device: str) -> torch.nn.Module:
    """The denoiser of `config` on `device` (same seed on cpu and meta), LoRA r4 injected."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        m = (UNet2DConditionModel if family == "sd15" else FluxTransformer2DModel)(**config)
    m.requires_grad_(False)
    targets = list(FAMILIES[family].default_targets)
    inject_lora(m, LoraConfigSection(rank=4, alpha=4.0, target_modules=targets), 0)
    return m


def batch(family: str, config: dict, side: int, device: str, n: int = 2):
    """(latents [n, C, side, side], timesteps [n], conditioning) on `device`."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g)

    if family == "sd15":
        t = torch.full((n,), 500, dtype=torch.long, device=device)
        return r(n, 4, side, side), t, {"encoder_hidden_states": r(n, 77, 32 if side == 16 else 64)}
    cond = {
        "encoder_hidden_states": r(n, 32, config["joint_attention_dim"]),
        "pooled_projections": r(n, config["pooled_projection_dim"]),
    }
    return r(n, config["in_channels"] // 4, side, side), torch.full((n,), 0.5, device=device), cond


FAMILY_TINY = ("qwen-image", "z-image", "flux2-klein")
"""Families checked at their tiny width through the registry alone (`family_case`): the tiny
denoiser (`build_tiny`), inputs from the family's own encoders at 64 px."""


FAMILY_MID = {
    "qwen-image": dict(
        num_layers=4, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12)
    ),
    "z-image": dict(dim=128, n_heads=4, n_kv_heads=4, n_layers=4, axes_dims=[8, 12, 12]),
    "flux2-klein": dict(num_layers=2, num_single_layers=4, num_attention_heads=8),
}
"""Wider/deeper variants of those tiny transformers (`"<family> mid"`): same text width, so the
tiny encoders still feed them."""


def family_case(family: str, device: str, side_px: int = 64, n: int = 2, mid: bool = False):
    """(denoiser with LoRA r4 on the default targets, latents, timesteps, cond) of the family's
    tiny model (`mid`: its `FAMILY_MID` variant) on `device` ("cpu" real, "meta" the same shapes
    on the meta device)."""
    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    den = getattr(comps, fam.denoiser_name)
    config = {**den.config, **(FAMILY_MID[family] if mid else {})}
    if device == "meta" or mid:
        torch.manual_seed(0)
        with torch.device(device):
            den = type(den).from_config(config)
    den.requires_grad_(False)
    targets = list(fam.default_targets)
    inject_lora(den, LoraConfigSection(rank=4, alpha=4.0, target_modules=targets), 0)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(n, 3, side_px, side_px, generator=g) * 2 - 1
    lat = fam.encode_images(comps, pixels)
    cond = dict(fam.encode_prompts(comps, ["a red logo on a white wall"] * n))
    cond.update(fam.image_conditioning(comps, (side_px, side_px), (0, 0), (side_px, side_px)))
    # every caption position a token, as the planner plans (`planner_inputs`: the longest
    # caption the run allows); the real padded captions would run far fewer tokens
    cond = {k: torch.ones_like(v) if k.endswith("mask") else v for k, v in cond.items()}
    t = torch.full((n,), 0.5)
    if device == "meta":
        meta = lambda x: torch.empty_like(x, device="meta")  # noqa: E731
        lat, t, cond = meta(lat), meta(t), {k: meta(v) for k, v in cond.items()}
    return den, lat, t, cond


def compare(name: str, checkpointing: bool, offload: bool = False) -> dict:
    """One row: measured (real CPU step) vs the planner's prediction (meta)."""
    family, _, size = name.rpartition(" ")
    if family in FAMILY_TINY:
        mid = size == "mid"
        torch.manual_seed(0)
        real, *inputs = family_case(family, "cpu", mid=mid)
        t0 = time.perf_counter()
        measured, step = planner.measure_step(
            real, family, *inputs, checkpointing, "adamw", offload
        )
        seconds = time.perf_counter() - t0
        meta, *minputs = family_case(family, "meta", mid=mid)
        rows = planner.step_rows(meta, family, *minputs, checkpointing, "adamw", offload)
        return _row(name, checkpointing, offload, measured, step, rows, seconds)
    family, config, side = MODELS[name]
    torch.manual_seed(0)
    real = build(family, config, "cpu")
    t0 = time.perf_counter()
    measured, step = planner.measure_step(
        real, family, *batch(family, config, side, "cpu"), checkpointing, "adamw", offload
    )
    seconds = time.perf_counter() - t0
    rows = planner.step_rows(
        build(family, config, "meta"), family, *batch(family, config, side, "meta"),
        checkpointing, "adamw", offload,
    )  # fmt: skip
    return _row(name, checkpointing, offload, measured, step, rows, seconds)


def _row(name, checkpointing, offload, measured, step, rows, seconds) -> dict:
    predicted = sum(rows.values())
    return {
        "model": name,
        "checkpointing": checkpointing,
        "offload": offload,
        "measured_peak": measured,
        "planner_peak": predicted,
        "error": (predicted - measured) / measured,
        "measured_activations": step.activations,
        "planner_activations": rows["activations"],
        "activation_error": (rows["activations"] - step.activations) / step.activations,
        "step_seconds": round(seconds, 2),
    }


def main() -> None:
    torch.set_num_threads(2)
    out = []
    for name in [*MODELS, *(f"{f} {size}" for f in FAMILY_TINY for size in ("tiny", "mid"))]:
        for ckpt in (False, True):
            out.append(compare(name, ckpt))
        if name.startswith("flux"):
            out.append(compare(name, True, offload=True))
    mb = lambda n: f"{n / 1e6:8.3f}"  # noqa: E731
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print("| model | checkpointing | measured peak MB | planner MB | error | "
          "measured activations MB | planner activations MB | error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        ck = ("yes + offload" if r["offload"] else "yes") if r["checkpointing"] else "no"
        print(f"| {r['model']} | {ck} | {mb(r['measured_peak'])} | {mb(r['planner_peak'])} | "
              f"{r['error']:+.1%} | {mb(r['measured_activations'])} | "
              f"{mb(r['planner_activations'])} | {r['activation_error']:+.1%} |")  # fmt: skip
    if "--json" in sys.argv:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
