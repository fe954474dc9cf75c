"""`lorakit plan`: peak accelerator memory of a training config, estimated without loading weights.

The family's REAL architecture (configs from `models/*.py`; SD3.5-large and FLUX.1-dev below) is
built on the meta device, so parameter counts are exact and nothing is allocated. Then:

- weights: parameter count × bytes of the dtype the loop uses (`train._frozen_dtype` rules: VAE
  fp32, T5 bf16 under fp16), or bitsandbytes' layout for `model.quantize` (every `nn.Linear` weight
  of the transformer: NF4 0.5 B + double-quantized absmax 1/64 B + 4/16384 B per parameter; int8
  1 B + a fp32 scale per output row);
- LoRA: `r × (in + out)` per matched Linear (Conv2d: `r × (in·k·k + out)`), fp32 weights + fp32
  gradients + the autocast bf16/fp16 copy + optimizer state (`OPTIMIZER_STATE`);
- activations: the LoRA-injected denoiser runs ONE forward pass on the meta device at the config's
  resolution/batch, and every tensor autograd saves is counted (`saved_tensors_hooks`; parameters
  and duplicates excluded). With gradient checkpointing, diffusers' checkpoint function is replaced
  by a counting one that models torch's non-reentrant checkpoint: a unit keeps only its inputs,
  and the backward pass re-materialises one unit at a time (the largest is added). This is shape
  arithmetic, not a fitted formula, so it holds at any resolution; the one fitted constant is
  `BACKWARD_TRANSIENT` (gradient buffers of activations alive during backward, in units of the
  largest saved tensor) and `SAVED_OVERHEAD`, fitted to H100 measurements (see below);
- caching and sampling phases: inference passes (VAE encode of `VAE_ENCODE_CHUNK` images, the
  denoiser with CFG, VAE decode) are traced on meta with a dispatch mode that tracks live tensor
  bytes, giving their peak working set;
- `max_memory_allocated` is what the phases predict; the verdict adds the CUDA context and the
  caching allocator's slack (`CUDA_CONTEXT`, `ALLOCATOR_SLACK`), which that counter does not see.

Phases follow `lorakit/train.py`: everything is on the device while caching; afterwards the VAE
and text encoders leave it unless previews are on (`sample.every > 0`) or captions are encoded
every step (text-encoder LoRA, tag shuffling).
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorakit.config import Config

GIB = 2**30
CUDA_CONTEXT = 0.55 * GIB
"""CUDA context + cuBLAS/cuDNN workspaces: resident, invisible to `max_memory_allocated`."""
ALLOCATOR_SLACK = 0.08
"""Fraction of the allocated peak lost to the caching allocator's fragmentation."""
SAVED_OVERHEAD = 1.38
BACKWARD_TRANSIENT = 3.5
"""Activation peak = SAVED_OVERHEAD × traced saved bytes + the largest checkpointed unit +
BACKWARD_TRANSIENT × the largest saved tensor (activation gradients alive during backward).
Both fitted to the two H100 SD1.5 measurements (benchmarks/gpu_check-h100-2026-11-26.json:
512 px, fp16, r16, 1.958 GiB with checkpointing, 2.799 GiB without); SDXL/FLUX rows of
`benchmarks/gpu_check.py` validate them (BENCHMARKS.md)."""
VAE_ENCODE_CHUNK = 1
"""Images per VAE encode call while caching, as in `train._encode_images`."""

# bytes per element of an optimizer's state, for tensors of n elements (see `optimizer_bytes`)
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy")


# --- real architectures ------------------------------------------------------------------------

T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
    is_encoder_decoder=False, use_cache=False,
)  # fmt: skip
"""google/t5-v1_1-xxl encoder (SD3 `text_encoder_3`, FLUX `text_encoder_2`), 4.76 B params."""
SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
"""stabilityai/stable-diffusion-3.5-large `transformer/config.json` (8.1 B params)."""
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""black-forest-labs/FLUX.1-dev `transformer/config.json` (11.9 B params)."""


def _flow_vae() -> dict[str, Any]:
    from lorakit.models.sd15 import SD15_VAE

    return dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


@dataclass(frozen=True)
class Arch:
    """How to build a family's real model and feed its denoiser (shapes only)."""

    latent_channels: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    cfg_batch: int
    """Denoiser batch per preview image (2 with classifier-free guidance; FLUX-dev: 1)."""


ARCHS: dict[str, Arch] = {
    "sd15": Arch(4, 77, 768, 0, 2),
    "sdxl": Arch(4, 77, 2048, 1280, 2),
    "sd3": Arch(16, 77, 4096, 2048, 2),  # text tokens = 77 + T5 length
    "flux": Arch(16, 0, 4096, 768, 1),  # text tokens = T5 length
}


def build_denoiser(family: str) -> torch.nn.Module:
    """The family's real denoiser on the meta device (random-free, allocation-free)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if family in ("sd15", "sdxl"):
            from diffusers import UNet2DConditionModel

            from lorakit.models import FAMILIES

            cfg = FAMILIES[family].single_file_configs()["unet"]
            return UNet2DConditionModel.from_config(cfg)
        if family == "sd3":
            from diffusers import SD3Transformer2DModel

            return SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)


def build_frozen(family: str, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
    """VAE and text encoders of the real model on the meta device, named as `frozen_modules`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from lorakit.models.sd15 import CLIP_L_TEXT, SD15_VAE
    from lorakit.models.sdxl import OPENCLIP_BIGG_TEXT, SDXL_VAE

    def clip(cfg, proj: bool):
        conf = CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(conf)

    with init_empty_weights(include_buffers=True):
        if family == "sd15":
            return {
                "vae": AutoencoderKL.from_config(SD15_VAE),
                "text_encoder": clip(CLIP_L_TEXT, False),
            }
        if family == "sdxl":
            return {
                "vae": AutoencoderKL.from_config(SDXL_VAE),
                "text_encoder": clip(CLIP_L_TEXT, False),
                "text_encoder_2": clip(OPENCLIP_BIGG_TEXT, True),
            }
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        vae = AutoencoderKL.from_config(_flow_vae())
        if family == "sd3":
            out = {
                "vae": vae,
                "text_encoder": clip(CLIP_L_TEXT, True),
                "text_encoder_2": clip(OPENCLIP_BIGG_TEXT, True),
            }
            if not drop_t5:
                out["text_encoder_3"] = t5
            return out
        return {"vae": vae, "text_encoder": clip(CLIP_L_TEXT, False), "text_encoder_2": t5}


# --- byte counts (exact) -----------------------------------------------------------------------

DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def quantized_linear_bytes(numel: int, out_features: int, mode: str) -> int:
    """Bytes bitsandbytes stores for one Linear weight of `numel` elements."""
    if mode == "nf4":  # 4-bit codes + uint8 absmax per 64 + fp32 absmax per 256 absmax blocks
        blocks = math.ceil(numel / 64)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 64
    if mode == "int8":  # int8 codes + fp32 scale per output row
        return numel + 4 * out_features
    raise ValueError(mode)


def weight_bytes(module: torch.nn.Module, elem_bytes: int, quantize: str = "none") -> int:
    """Resident bytes of a module's parameters and buffers at `elem_bytes` per element, with
    every `nn.Linear` weight in bitsandbytes' layout when `quantize` is `nf4`/`int8`."""
    quantized: set[int] = set()
    total = 0
    if quantize != "none":
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                quantized.add(id(m.weight))
                total += quantized_linear_bytes(m.weight.numel(), m.out_features, quantize)
    for p in module.parameters():
        if id(p) not in quantized:
            total += p.numel() * elem_bytes
    for b in module.buffers():
        total += b.numel() * (elem_bytes if b.is_floating_point() else b.element_size())
    return total


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_shapes(module: torch.nn.Module, targets: list[str], rank: int) -> list[int]:
    """Element counts of every LoRA tensor peft creates (lora_A, lora_B per matched layer)."""
    out = []
    for name, m in module.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(m, torch.nn.Linear):
            out += [rank * m.in_features, m.out_features * rank]
        elif isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            out += [rank * m.in_channels // m.groups * k, m.out_channels * rank]
    return out


def optimizer_bytes(
    sizes: list[int], optimizer: str, shapes: list[tuple[int, int]] | None = None
) -> int:
    """Optimizer state bytes for trainable tensors of `sizes` elements.

    adamw: 2 fp32 moments (8 B). adamw8bit: 2 uint8 moments + a fp32 absmax per 256-element block
    each, only for tensors of ≥ 4096 elements (bitsandbytes' `min_8bit_size`; smaller ones keep
    32-bit state). lion8bit: 1 uint8 moment (+ absmax), same threshold. adafactor: factored row +
    column fp32 statistics for matrices (`shapes`), full fp32 for vectors. prodigy: 4 fp32 tensors
    (2 moments, the initial point p0 and s).
    """
    total = 0
    for i, n in enumerate(sizes):
        if optimizer == "adamw":
            total += 8 * n
        elif optimizer == "adamw8bit":
            total += (2 * n + 8 * math.ceil(n / 256)) if n >= 4096 else 8 * n
        elif optimizer == "lion8bit":
            total += (n + 4 * math.ceil(n / 256)) if n >= 4096 else 4 * n
        elif optimizer == "adafactor":
            rows, cols = shapes[i] if shapes else (n, 1)
            total += 4 * (rows + cols) if rows > 1 and cols > 1 else 4 * n
        elif optimizer == "prodigy":
            total += 16 * n
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return total


# --- activations (meta-device trace) -----------------------------------------------------------


@dataclass
class SavedCount:
    """Bytes autograd keeps for backward during one forward pass."""

    retained: int = 0
    """Saved tensors + checkpoint-unit inputs alive when backward starts."""
    largest_unit: int = 0
    """Saved bytes of the largest checkpointed unit (re-materialised during backward)."""
    largest_tensor: int = 0
    units: int = 0


class _Counter:
    def __init__(self, params: set[int]):
        self.params = params
        self.seen: dict[int, torch.Tensor] = {}  # keeps refs: ids stay unique during the pass
        self.count = SavedCount()
        self.unit_bytes: int | None = None  # inside a checkpointed unit
        self.depth = 0

    def _bytes(self, t: torch.Tensor) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        t = t._base if t._base is not None else t  # a view costs nothing beyond its base
        if id(t) in self.params or id(t) in self.seen:  # frozen weights are counted as weights
            return 0
        self.seen[id(t)] = t
        n = t.numel() * t.element_size()
        self.count.largest_tensor = max(self.count.largest_tensor, n)
        return n

    def pack(self, t):
        n = self._bytes(t)
        if self.unit_bytes is None:
            self.count.retained += n
        else:
            self.unit_bytes += n
        return t

    def checkpoint(self, fn, *args):
        """Stand-in for diffusers' `_gradient_checkpointing_func` (non-reentrant semantics)."""
        if self.depth:  # nested unit: part of the outer unit's recompute
            return fn(*args)
        self.count.units += 1
        self.count.retained += sum(self._bytes(a) for a in args if isinstance(a, torch.Tensor))
        self.depth, self.unit_bytes = 1, 0
        seen_before = dict(self.seen)
        try:
            out = fn(*args)
        finally:
            self.count.largest_unit = max(self.count.largest_unit, self.unit_bytes or 0)
            self.depth, self.unit_bytes = 0, None
            self.seen = seen_before  # unit internals are freed after the forward
        return out


def _cast(module: torch.nn.Module, dtype) -> torch.nn.Module:
    for p in module.parameters():  # not `.to(dtype)`: diffusers warns about fp32 modules
        p.data = p.data.to(dtype)
    return module


def _inputs(family: str, batch: int, h: int, w: int, dtype, t5_len: int):
    a = ARCHS[family]
    meta = dict(device="meta", dtype=dtype)
    lat = torch.empty(batch, a.latent_channels, h, w, **meta)
    tokens = {"sd3": 77 + t5_len, "flux": t5_len}.get(family, a.text_tokens)
    cond = {"encoder_hidden_states": torch.empty(batch, tokens, a.text_dim, **meta)}
    if family == "sdxl":
        cond["text_embeds"] = torch.empty(batch, a.pooled_dim, **meta)
        cond["time_ids"] = torch.empty(batch, 6, device="meta")
    elif family in ("sd3", "flux"):
        cond["pooled_projections"] = torch.empty(batch, a.pooled_dim, **meta)
    t = (
        torch.full((batch,), 500, device="meta", dtype=torch.long)
        if family in ("sd15", "sdxl")
        else torch.full((batch,), 0.5, device="meta")
    )
    return lat, t, cond


@functools.lru_cache(maxsize=64)
def saved_activations(
    family: str,
    resolution: int,
    batch: int,
    checkpointing: bool,
    precision: str,
    targets: tuple[str, ...],
    rank: int,
    t5_len: int = 0,
) -> SavedCount:
    """Trace one training forward of the real LoRA-injected denoiser on meta; see module doc."""
    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    den = _cast(build_denoiser(family), dtype)
    den.requires_grad_(False)
    inject_lora(den, LoraConfigSection(rank=rank, alpha=rank, target_modules=list(targets)), 0)
    side = resolution // 8
    return count_saved(den, family, *_inputs(family, batch, side, side, dtype, t5_len),
                       checkpointing=checkpointing)  # fmt: skip


def count_saved(den, family: str, lat, t, cond, checkpointing: bool) -> SavedCount:
    """Bytes autograd saves in one training forward of `den` (LoRA already injected) through
    `family.predict`; works on meta and on real tensors alike (SDPA counted as CUDA runs it)."""
    from lorakit.models import FAMILIES

    counter = _Counter({id(p) for p in den.parameters()})
    if checkpointing:
        den.enable_gradient_checkpointing(gradient_checkpointing_func=counter.checkpoint)
    den.train()
    dtype = lat.dtype
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x)
    with hooks, _CudaLikeAttention(), autocast:
        FAMILIES[family].predict(den, lat, t, cond)
    return counter.count


def activation_bytes(count: SavedCount) -> int:
    """Peak activation memory during forward+backward from a traced `SavedCount`."""
    return int(
        SAVED_OVERHEAD * count.retained
        + count.largest_unit
        + BACKWARD_TRANSIENT * count.largest_tensor
    )


class _FlashAttention(torch.autograd.Function):
    """Shape-only stand-in for SDPA as it runs on CUDA (flash / memory-efficient kernels): saves
    q, k, v, the output and a fp32 log-sum-exp `[B, H, L]`, never the `L × L` weights that the
    math fallback on the meta device would materialise."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (meta tensors only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _CudaLikeAttention(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            kw = dict(kwargs or {})
            q, k, v = [*args, *(kw.get(n) for n in ("query", "key", "value")[len(args) :])][:3]
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention: expand like the kernel
                rep = q.shape[-3] // k.shape[-3]
                k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
            return _FlashAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


class _LivePeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors created inside the mode (meta tensors; views not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not any(t is a for a in args):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


@functools.lru_cache(maxsize=64)
def inference_peak(
    family: str, what: str, resolution: int, batch: int, precision: str, t5_len: int = 0
) -> int:
    """Peak working-set bytes of an inference pass on meta: `vae_encode` (fp32 VAE, pixels in),
    `vae_decode`, or `denoise` (one no-grad denoiser call)."""
    from lorakit.models import FAMILIES

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    side = resolution // 8
    with torch.no_grad(), _CudaLikeAttention():
        if what == "denoise":
            den = _cast(build_denoiser(family), dtype)
            lat, t, cond = _inputs(family, batch, side, side, dtype, t5_len)
            with _LivePeak() as mode:
                FAMILIES[family].predict(den, lat, t, cond)
            return mode.peak
        vae = build_frozen(family)["vae"]
        if what == "vae_encode":
            x = torch.empty(batch, 3, resolution, resolution, device="meta")
            with _LivePeak() as mode:
                vae.encode(x)
        else:
            z = torch.empty(batch, vae.config.latent_channels, side, side, device="meta")
            with _LivePeak() as mode:
                vae.decode(z)
        return mode.peak


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    family: str
    rows: dict[str, int]
    """Component → bytes during the training phase (allocated)."""
    phases: dict[str, int]
    """Phase (`cache`, `train`, `sample`) → predicted `max_memory_allocated` bytes."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def needed(self) -> int:
        """Device memory the run needs: allocated peak + allocator slack + CUDA context."""
        return int(self.peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT)

    def fits(self, vram_gib: float) -> bool:
        return self.needed <= vram_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        gib = lambda n: round(n / GIB, 3)  # noqa: E731
        return {
            "family": self.family,
            "train_components_gib": {k: gib(v) for k, v in self.rows.items()},
            "phases_gib": {k: gib(v) for k, v in self.phases.items()},
            "peak_allocated_gib": gib(self.peak),
            "peak_phase": self.peak_phase,
            "needed_gib": gib(self.needed),
            "notes": self.notes,
        }


def family_of(c: Config) -> str:
    """The family a config trains, without touching the network (hub ids need model.family
    or a name that says which family it is)."""
    from lorakit.errors import ConfigError

    if c.model.family != "auto":
        return c.model.family
    name = c.model.name.lower()
    if name.startswith("tiny:"):
        return name.split(":", 1)[1]
    hints = (("flux", "flux"), ("xl", "sdxl"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"),
             ("v1-5", "sd15"), ("sd15", "sd15"), ("1.5", "sd15"))  # fmt: skip
    for key, fam in hints:
        if key in name:
            return fam
    from pathlib import Path

    if Path(c.model.name).expanduser().exists():
        from lorakit.models import resolve_family

        return resolve_family(c.model)[0].name
    raise ConfigError(
        f"lorakit plan cannot tell the family of model.name '{c.model.name}' offline. Set "
        "model.family (sd15, sdxl, sd3 or flux), e.g. --set model.family=sdxl."
    )


@functools.lru_cache(maxsize=16)
def _counts(family: str, drop_t5: bool):
    den = build_denoiser(family)
    frozen = build_frozen(family, drop_t5)
    return den, {n: m for n, m in frozen.items()}


def plan(c: Config, images: int = VAE_ENCODE_CHUNK) -> Plan:
    """Predicted peak `torch.cuda.max_memory_allocated` of `lorakit train` with config `c`
    (the real architecture of its family; `tiny:` names are planned as the real model)."""
    family = family_of(c)
    t, lo = c.train, c.lora
    prec = t.mixed_precision
    eb = DTYPE_BYTES[prec]
    den, frozen = _counts(family, c.model.drop_t5 and family == "sd3")
    quant = c.model.quantize if family in ("sd3", "flux") else "none"
    targets = tuple(lo.target_modules) or _default_targets(family)
    t5_len = c.model.t5_max_length or {"sd3": 256, "flux": 512}.get(family, 0)

    rows: dict[str, int] = {"denoiser weights": weight_bytes(den, eb, quant)}
    frozen_bytes = {}
    for name, m in frozen.items():
        fb = 4 if name == "vae" else (2 if type(m).__name__.startswith("T5") and eb == 2 else eb)
        frozen_bytes[name] = weight_bytes(m, fb)
    sizes = lora_shapes(den, list(targets), lo.rank)
    te_sizes: list[int] = []
    if lo.train_text_encoder:
        te_rank = lo.text_encoder_rank or lo.rank
        for m in frozen.values():
            if type(m).__name__.startswith("CLIP"):
                te_sizes += lora_shapes(m, lo.text_encoder_target_modules, te_rank)
    all_sizes = sizes + te_sizes
    n_lora = sum(all_sizes)
    rows["LoRA weights (fp32)"] = 4 * n_lora
    rows["LoRA gradients (fp32)"] = 4 * n_lora
    if eb == 2:
        rows["LoRA autocast copies"] = 2 * n_lora
    opt_name = t.optimizer.lower().replace("_", "")
    if opt_name not in OPTIMIZERS:  # an optimizer the planner has no table for: AdamW's 8 B
        opt_name = "adamw"
    rows[f"optimizer state ({t.optimizer})"] = optimizer_bytes(all_sizes, opt_name)

    encode_each_step = lo.train_text_encoder or c.data.shuffle_tags
    resident = encode_each_step
    if resident:
        for name, b in frozen_bytes.items():
            rows[f"{name} (resident)"] = b
    saved = saved_activations(family, c.data.resolution, t.batch_size, t.gradient_checkpointing,
                              prec, targets, lo.rank, t5_len)  # fmt: skip
    rows["activations" + (" (checkpointed)" if t.gradient_checkpointing else "")] = (
        activation_bytes(saved)
    )
    if lo.train_text_encoder:
        # CLIP activations at 77 tokens are small next to the denoiser's: 2 × saved estimate
        te_act = sum(
            t.batch_size * 77 * m.config.hidden_size * m.config.num_hidden_layers * 24 * eb
            for n, m in frozen.items()
            if type(m).__name__.startswith("CLIP")
        )
        rows["text-encoder activations"] = te_act
    rows["batch tensors"] = (
        6 * t.batch_size * ARCHS[family].latent_channels * (c.data.resolution // 8) ** 2 * 4
    )
    train_phase = sum(rows.values())

    # The loop moves the denoiser to the device after caching; a quantized one is loaded there.
    weights_all = sum(frozen_bytes.values()) + (
        rows["denoiser weights"] if getattr(c.model, "quantize", "none") != "none" else 0
    )
    chunk = min(images, VAE_ENCODE_CHUNK)
    cache_phase = weights_all + inference_peak(family, "vae_encode", c.data.resolution, chunk, prec)
    phases = {"cache": cache_phase, "train": train_phase}
    notes = []
    if c.sample.every > 0 or c.sample.every_minutes > 0:
        sw = c.sample.width or c.data.resolution
        sh = c.sample.height or c.data.resolution
        sres = max(sw, sh)
        keep = rows["denoiser weights"] + 4 * n_lora + rows[f"optimizer state ({t.optimizer})"]
        if eb == 2:
            keep += 2 * n_lora
        sample_phase = (
            keep
            + sum(frozen_bytes.values())
            + max(
                inference_peak(family, "denoise", sres, ARCHS[family].cfg_batch, prec, t5_len),
                inference_peak(family, "vae_decode", sres, 1, prec),
            )
        )
        phases["sample"] = sample_phase
    if not resident:
        notes.append("VAE and text encoders leave the device after caching (previews off).")
    if phases["cache"] > phases["train"]:
        notes.append(
            "The caching phase (all weights on the device + VAE encoding of "
            f"{chunk} image(s) at once) is the peak."
        )
    return Plan(family, rows, phases, notes)


def _default_targets(family: str) -> tuple[str, ...]:
    from lorakit.models import FAMILIES

    return tuple(FAMILIES[family].default_targets)


# --- proposals ---------------------------------------------------------------------------------


def _apply(c: Config, section: str, key: str, value: Any) -> Config:
    return replace(c, **{section: replace(getattr(c, section), **{key: value})})


def _steps(c: Config, family: str):
    """Candidate changes, cheapest quality loss first: (description, [(section, key, value)])."""
    if c.train.mixed_precision == "no":
        yield "bf16 mixed precision", [("train", "mixed_precision", "bf16")]
    if not c.train.gradient_checkpointing:
        yield "gradient checkpointing", [("train", "gradient_checkpointing", True)]
    if c.train.optimizer == "adamw":
        yield "8-bit AdamW", [("train", "optimizer", "adamw8bit")]
    te = [("lora", "train_text_encoder", False)] if c.lora.train_text_encoder else []
    te += [("data", "shuffle_tags", False)] if c.data.shuffle_tags else []
    te += [("sample", "every", 0)] if c.sample.every else []
    if te:
        yield "cached text-encoder outputs (encoders off the device)", te
    if family in ("sd3", "flux") and c.model.quantize != "nf4":
        yield "NF4 base", [("model", "quantize", "nf4")]
    batch, accum = c.train.batch_size, c.train.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        yield f"batch {batch} × {accum} accumulation", [
            ("train", "batch_size", batch), ("train", "grad_accum", accum)
        ]  # fmt: skip
    res = c.data.resolution
    floor = 512 if family in ("sdxl", "sd3", "flux") else 256
    while res - 128 >= floor:
        res -= 128
        yield f"resolution {res}", [("data", "resolution", res)]


def propose(c: Config, vram_gib: float) -> tuple[list[str], Plan]:
    """`--set` lines that make `c` fit `vram_gib` by the planner's own estimate, applied in order
    of quality loss; ([], plan) when it already fits. Raises LorakitError when nothing fits."""
    from lorakit.errors import LorakitError

    current = plan(c)
    if current.fits(vram_gib):
        return [], current
    family = family_of(c)
    changes: dict[str, Any] = {}
    for _desc, edits in list(_steps(c, family)):
        for section, key, value in edits:
            c = _apply(c, section, key, value)
            changes[f"{section}.{key}"] = value
        current = plan(c)
        if current.fits(vram_gib):
            return [f"{k}={_toml(v)}" for k, v in changes.items()], current
    raise LorakitError(
        f"No lorakit setting makes this {family} config fit {vram_gib:g} GiB: even with "
        + ", ".join(f"{k}={_toml(v)}" for k, v in changes.items())
        + f" it needs ~{current.needed / GIB:.1f} GiB (peak in the {current.peak_phase} phase). "
        "Use a GPU with more memory."
    )


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    return str(v)


def detected_vram_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def check_before_training(c: Config, device: torch.device, strict: bool) -> str | None:
    """For `train.py`: None when the plan fits the CUDA device (or on CPU, where nothing runs);
    else a one-paragraph warning. Raises LorakitError instead when `strict`."""
    from lorakit.errors import LorakitError

    if device.type != "cuda":
        return None
    if c.model.name.startswith("tiny:"):
        return None  # tiny models: planning the real architecture would be meaningless
    try:
        p = plan(c)
    except LorakitError:
        return None  # family unknown offline: no estimate, no warning
    _free, total = torch.cuda.mem_get_info(device)
    vram = total / GIB
    if p.fits(vram):
        return None
    try:
        sets, _ = propose(copy.deepcopy(c), vram)
        fix = "Try: " + " ".join(f"--set {s}" for s in sets)
    except LorakitError as e:
        fix = str(e)
    msg = (
        f"lorakit plan estimates this run needs ~{p.needed / GIB:.1f} GiB (peak in the "
        f"{p.peak_phase} phase) but the GPU has {vram:.1f} GiB. {fix}"
    )
    if strict:
        raise LorakitError(msg + " (train.strict_memory = true: not starting.)")
    return msg


def table(p: Plan, vram_gib: float | None) -> str:
    """Plain-text table of a plan."""
    lines = [f"{'component (training phase)':<44}{'GiB':>9}"]
    for k, v in p.rows.items():
        lines.append(f"  {k:<42}{v / GIB:>9.2f}")
    lines.append("")
    for k, v in p.phases.items():
        lines.append(f"{'peak allocated, ' + k + ' phase':<44}{v / GIB:>9.2f}")
    lines.append(f"{'needed (+ allocator slack, CUDA context)':<44}{p.needed / GIB:>9.2f}")
    for n in p.notes:
        lines.append(f"note: {n}")
    if vram_gib is not None:
        verdict = "fits" if p.fits(vram_gib) else "does NOT fit"
        lines.append(f"verdict: {verdict} in {vram_gib:g} GiB")
    return "\n".join(lines)
