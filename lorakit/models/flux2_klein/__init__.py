"""FLUX.2 [klein] family (`flux2-klein`, 4B and 9B, base and distilled): a FLUX.2 MM-DiT trained
with rectified flow, conditioned on a Qwen3 text encoder.

Every convention below is `Flux2KleinPipeline`'s (diffusers 0.42), and the code calls the
pipeline's own static helpers so the two cannot drift apart:
- pixels `[B, 3, H, W]` in [-1, 1]; H, W multiples of 16 (VAE /8, then 2×2 patches).
- latents `[B, 32, h, w]` (h = H/8): the VAE posterior mean, patchified 2×2
  (`_patchify_latents`: `[B, 128, h/2, w/2]`, channel order (c, dy, dx)), normalised with the
  VAE's batch-norm running statistics `(x - bn.running_mean) / sqrt(bn.running_var +
  batch_norm_eps)` (`_encode_vae_image`), then un-patchified back to `[B, 32, h, w]` so that
  latents keep the (C, H/8, W/8) geometry every family shares. The pipeline's decode is the exact
  inverse (un-normalise the patchified latents, `_unpatchify_latents`, `vae.decode`). Noise is
  i.i.d. per element, so noising before or after the (permutation) patchify is the same.
- packing (inside `predict`): `_patchify_latents` then `_pack_latents`, `[B, (h/2)(w/2), 128]`,
  tokens row-major; `_unpack_latents_with_ids` order on the way back.
- position ids, 4 axes (t, h, w, l): image `_prepare_latent_ids` = (0, row, col, 0) per token;
  text `_prepare_text_ids` = (0, 0, 0, l) for token l. Conditioning images would take t = 10,
  20, … (`_prepare_image_ids`) and a frames axis t: the 4-axis ids already carry both; neither
  edit nor video is built here.
- `cond = {"encoder_hidden_states": [B, L, 3·D]}` from `Flux2KleinPipeline.encode_prompt`:
  Qwen3 on the chat template (`apply_chat_template(…, add_generation_prompt=True,
  enable_thinking=False)`), padded to L = `max_sequence_length` (512, `model.t5_max_length`
  overrides), hidden states of layers (9, 18, 27) stacked on the feature axis (D = 2560 for
  Qwen3-4B / klein 4B, 4096 for Qwen3-8B / klein 9B). No attention mask reaches the
  transformer (the pipeline passes none): padding embeddings are part of the conditioning.
- timesteps: sigmas σ `[B]` in (0, 1); the transformer takes σ (the pipeline passes
  `scheduler.timesteps / 1000`) and scales ×1000 inside. noisy = (1-σ)·x0 + σ·noise, target =
  noise - x0 (FlowMatchEuler steps x += (σ_next - σ)·v).
- shift: the scheduler has `use_dynamic_shifting` and the pipeline sets μ =
  `compute_empirical_mu(image tokens, num_inference_steps)`; the `shift` sampler uses that μ
  for the image's token count at the pipeline's default 50 steps (`SHIFT_STEPS`), or
  ln(train.flow_shift) when set.
- guidance: klein has no guidance embedding (`guidance_embeds = false`): the transformer gets
  `guidance=None`, as in the pipeline. The base models sample with classifier-free guidance
  (`guidance_scale` > 1, two sequential batch-1 calls: cond then uncond with the empty prompt);
  the distilled ones (`is_distilled` in model_index.json) ignore it. A FLUX.2 transformer WITH
  a guidance embedding would get `train.guidance`, as FLUX.1-dev does.
- LoRA: only the transformer (kohya prefix `lora_unet_`, BFL names from names.py, fused
  q|k|v). The Qwen3 encoder is not a LoRA target: diffusers' `Flux2LoraLoaderMixin` loads
  transformer LoRAs only (`_lora_loadable_modules = ["transformer"]`), the community's trainers
  (diffusers' train_dreambooth_lora_flux2_klein.py, musubi-tuner, ai-toolkit) train the
  transformer alone, and a frozen encoder lets captions be encoded once and the 8–16 GB
  encoder leave the GPU before training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from lorakit.config import ModelConfig, TrainConfig
from lorakit.models import flow
from lorakit.models.base import AdapterTarget, PlanArch
from lorakit.models.flow import check_flow_sampler
from lorakit.models.flux2_klein import names as _names
from lorakit.models.loading import (
    dtype_kwargs,
    freeze,
    from_pretrained_streamed,
    hub_kwargs,
    load_error,
    target_dtype,
)
from lorakit.models.single_file import SplitPart


@dataclass
class Flux2KleinComponents:
    transformer: Any
    """`Flux2Transformer2DModel`."""
    vae: Any
    """`AutoencoderKLFlux2` (32 latent channels; batch-norm statistics of the patchified
    latents in `vae.bn`)."""
    text_encoder: Any
    """`Qwen3ForCausalLM`; hidden states of layers (9, 18, 27) are the conditioning."""
    tokenizer: Any
    """`Qwen2Tokenizer` with Qwen3's chat template."""
    scheduler: Any
    max_sequence_length: int = 512
    """Text tokens per caption (the pipeline's `max_sequence_length`)."""
    is_distilled: bool = False
    """Step-distilled klein (4 steps, no CFG); False = base (CFG, the one to train on)."""


PIPELINE = "Flux2KleinPipeline"
TEXT_LAYERS = (9, 18, 27)
"""`Flux2KleinPipeline.encode_prompt`'s default `text_encoder_out_layers`."""
SHIFT_STEPS = 50
"""`num_inference_steps` whose `compute_empirical_mu` the `shift` sampler uses (the pipeline's
default)."""

# --- the real architectures ----------------------------------------------------------------------

_KLEIN = dict(
    patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
    guidance_embeds=False,
)  # fmt: skip
KLEIN_4B_TRANSFORMER = dict(
    _KLEIN, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680
)
"""black-forest-labs/FLUX.2-klein-4B (and -base-4B) `transformer/config.json`."""
KLEIN_9B_TRANSFORMER = dict(
    _KLEIN, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288
)
"""black-forest-labs/FLUX.2-klein-9B (and -base-9B) `transformer/config.json`: the largest
published klein, which `lorakit plan` plans for."""

QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", attention_bias=False,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)  # fmt: skip
"""Qwen/Qwen3-4B `config.json` (klein 4B's `text_encoder`; joint dim 3 × 2560 = 7680)."""
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
"""Qwen/Qwen3-8B (klein 9B's `text_encoder`; joint dim 3 × 4096 = 12288)."""

FLUX2_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=32, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
    batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=(2, 2),
)  # fmt: skip
"""The FLUX.2 VAE (`vae/config.json` of every FLUX.2 repo, AutoencoderKLFlux2)."""

FLUX2_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    time_shift_type="exponential",
)  # fmt: skip
"""FLUX.2 klein `scheduler/scheduler_config.json` (μ comes from the pipeline, see SHIFT_STEPS)."""

# --- tiny offline configs ------------------------------------------------------------------------
# Shape rules: in_channels = 4 × VAE latent channels (2×2 patches), sum(axes_dims_rope) =
# attention_head_dim, joint_attention_dim = 3 × Qwen3 hidden size (three stacked layers); the
# Qwen3 stack needs > 27 layers for hidden state 27 to be a layer's output, not the final norm.

TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope_theta=1000000.0, hidden_act="silu", attention_bias=False, tie_word_embeddings=True,
    attention_dropout=0.0,
)  # fmt: skip
TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=3 * TINY_QWEN3["hidden_size"],
    timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8), rope_theta=2000,
    guidance_embeds=False,
)  # fmt: skip
"""Hidden 128 = the 128 features of a 2×2×32 patch, wide enough to memorise an image."""
TINY_VAE = dict(
    block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=32,
    norm_num_groups=8, sample_size=64,
)  # fmt: skip


def _linear_modules(num_double: int, num_single: int, guidance: bool = False) -> set[str]:
    table = _names.transformer_table(num_double, num_single, guidance)
    return {p for entry in table.values() for p in entry.parts}


@cache
def klein_transformer_modules() -> frozenset[str]:
    """Every Linear of the klein 9B transformer (8 double, 24 single blocks; klein 4B's are a
    subset), from the naming table: the same fixed list both ways."""
    return frozenset(_linear_modules(8, 24))


def tiny_flux2_klein(seed: int = 0) -> Flux2KleinComponents:
    """Random-weight tiny klein (base: CFG), offline tokenizer, eval and frozen. The VAE's
    batch-norm statistics are drawn away from (0, 1) so that the normalisation is visible."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit.models.text_encoders import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**TINY_VAE)
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 0.1 + 0.02)
    torch.manual_seed(seed + 2)
    te = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **TINY_QWEN3,
        )
    )
    sched = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    freeze(transformer, vae, te)
    return Flux2KleinComponents(transformer, vae, te, tok, sched)


# --- latents, packing, ids: the pipeline's own static helpers --------------------------------


def _pipe_cls():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def bn_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) `[1, 128, 1, 1]` of the patchified latents, as `_encode_vae_image` reads them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(device, dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std.to(device, dtype)


def normalise(vae, raw: torch.Tensor) -> torch.Tensor:
    """VAE latents `[B, 32, h, w]` → the pipeline's normalised latents, un-patchified."""
    p = _pipe_cls()
    x = p._patchify_latents(raw)
    mean, std = bn_stats(vae, x.device, x.dtype)
    return p._unpatchify_latents((x - mean) / std)


def denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalise` (what the pipeline does before `vae.decode`)."""
    p = _pipe_cls()
    x = p._patchify_latents(latents)
    mean, std = bn_stats(vae, x.device, x.dtype)
    return p._unpatchify_latents(x * std + mean)


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, C, h, w]` → (tokens `[B, (h/2)(w/2), 4C]`, image ids `[B, (h/2)(w/2), 4]`)."""
    p = _pipe_cls()
    patches = p._patchify_latents(latents)
    return p._pack_latents(patches), p._prepare_latent_ids(patches).to(latents.device)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`'s tokens for latent height h and width w: `[B, C, h, w]`."""
    b, _, d = tokens.shape
    patches = tokens.permute(0, 2, 1).reshape(b, d, h // 2, w // 2)
    return _pipe_cls()._unpatchify_latents(patches)


def _config(module: torch.nn.Module):
    # accelerate may wrap the denoiser (DDP); the diffusers config lives on the inner module.
    return getattr(getattr(module, "module", module), "config", None)


def _is_distilled(folder: str) -> bool:
    index = Path(folder) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text(encoding="utf-8")).get("is_distilled", False))
    return False


PARTS = {
    "text_encoder": SplitPart(
        "text_encoder",
        "ComfyUI's text_encoders/qwen_3_4b.safetensors (qwen_3_8b for klein 9B)",
        ("model.safetensors", "model.safetensors.index.json"),
        markers=_names.TEXT_ENCODER_MARKERS,
    ),
    "vae": SplitPart(
        "vae", "ComfyUI's vae/flux2-vae.safetensors", ("diffusion_pytorch_model.safetensors",),
        markers=_names.VAE_MARKERS,
    ),
}  # fmt: skip
"""ComfyUI's split files in model.single_file_config (`single_file.split_file`: in `text_encoder/`
or `vae/`, or at the folder's top level, recognised by these keys)."""


def _split_error(kind: str, path: Path, e: BaseException):
    from lorakit.errors import LorakitError
    from lorakit.models.loading import first_line

    return LorakitError(
        f"Could not read the {kind} from '{path}': {first_line(e)}. lorakit reads ComfyUI's "
        f"split files (bf16, fp32, fp8 or scaled fp8) with their original key names; put the "
        f"diffusers {'vae' if kind == 'VAE' else 'text_encoder'}/ folder of the "
        "same klein in model.single_file_config instead."
    )


def _split_vae(path: Path, folder: str):
    """AutoencoderKLFlux2 from a FLUX.2 VAE file (names.vae_names), config from `folder/vae`
    when present, else the real FLUX.2 VAE's."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2

    from lorakit.models import single_file as sf

    try:
        sub = Path(folder) / "vae"
        if (sub / "config.json").is_file():
            config = AutoencoderKLFlux2.load_config(str(sub), local_files_only=True)
        else:
            config = FLUX2_VAE
        with init_empty_weights():
            vae = AutoencoderKLFlux2.from_config(config)
        ck = sf.read_split(path)
        state = _names.vae_from_original(vae, ck)
        levels = len(vae.config.block_out_channels)
        unread = set(ck) - set(_names.vae_names(vae.state_dict(), levels).values())
        if unread:
            raise KeyError(f"{len(unread)} keys no name table maps ({sorted(unread)[0]} …)")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        vae.load_state_dict(state, strict=True, assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _split_error("VAE", path, e) from None
    return vae


def _split_text_encoder(path: Path, folder: str):
    """Qwen3ForCausalLM from ComfyUI's Qwen3 file (transformers' names; the LM head, which the
    conditioning never reads, tied to the embedding when the file has none), config from
    `folder/text_encoder` when present, else read off the shapes (`names.qwen3_config`)."""
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lorakit.models import single_file as sf

    try:
        ck = sf.read_split(path)
        sub = Path(folder) / "text_encoder"
        if (sub / "config.json").is_file():
            config = Qwen3Config.from_pretrained(str(sub), local_files_only=True)
        else:
            config = Qwen3Config(**_names.qwen3_config(ck))
        if "lm_head.weight" not in ck:
            config.tie_word_embeddings = True
        with init_empty_weights():
            te = Qwen3ForCausalLM(config)
        dtype = target_dtype("text_encoder") or torch.float32  # see loading.load_in
        state = {k: v.to(dtype) for k, v in ck.items()}
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        te.load_state_dict(state, strict=True, assign=True)
        te.tie_weights()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _split_error("Qwen3 text encoder", path, e) from None
    return te


class Flux2Klein:
    """FLUX.2 [klein] 4B / 9B, base or distilled (see the module docstring)."""

    name = "flux2-klein"
    pipeline_class_names = (PIPELINE,)
    base_model_version = "flux2_klein"
    modelspec_architecture = "flux-2-klein/lora"
    denoiser_name = "transformer"
    default_export_format = "kohya"
    kohya_names = "bfl"
    """kohya's `original` naming: BFL's FLUX.2 names (`double_blocks_{i}_img_attn_qkv`, fused;
    musubi-tuner writes these)."""
    kohya_split_prefix = "lora_transformer_"
    diffusers_strength = "folded"
    loaders = {  # noqa: RUF012 - read-only; checked by tests/test_flux2_klein.py (export matrix)
        ("kohya", "original"): "ComfyUI",
        ("kohya", "diffusers"): "lorakit only (for UIs: kohya with original names)",
        ("diffusers",): "diffusers",
        ("lycoris",): "lorakit only (for UIs: kohya with original names, LoRA)",
    }
    """ComfyUI loads FLUX.2 LoRAs under their BFL weight names (comfy/lora.py maps
    `lora_unet_<X>` and `diffusion_model.<X>` for every weight X of the model): the kohya file
    with original names. Its diffusers map (`comfy/utils.py::flux_to_diffusers`) is FLUX.1's,
    without FLUX.2's module names (linear_in, to_qkv_mlp_proj, the shared modulations), so the
    `lora_transformer_` / diffusers-named files (kohya `diffusers` naming, LyCORIS, diffusers)
    are not claimed for it. Forge cannot load a FLUX.2 model."""
    targets = (AdapterTarget("transformer", "lora_unet_"),)
    """Only the transformer (why: the module docstring's last point)."""
    default_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
        *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)),
    )  # fmt: skip
    """Attention and MLP of both streams in the double blocks, and the single blocks' fused
    qkv+MLP input and attention+MLP output: every block Linear, as musubi-tuner's and
    ai-toolkit's FLUX.2 LoRAs. The single blocks' output is named per block (up to klein 9B's 24)
    because the suffix `attn.to_out` also names the double blocks' `to_out` ModuleList, which
    cannot carry a LoRA."""
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")
    """The transformer's `nn.ModuleList`s of repeated blocks, in the order `forward` runs them:
    the double-stream blocks, then the single-stream blocks (block swap moves these)."""
    tiny_resolution = 64
    pixel_multiple = 16
    """VAE factor 8 × 2×2 latent patches."""
    text_length = 512
    """`max_sequence_length` of `Flux2KleinPipeline` (every caption is padded to it)."""
    quantizable = True
    min_resolution = 512
    name_hints = ("flux.2-klein", "flux2-klein", "flux-2-klein", "klein")
    plan_arch = PlanArch(
        latent_channels=32, text_tokens=0, text_dim=12288, pooled_dim=0, cfg_batch=1
    )
    """klein 9B: 32-channel latents, Qwen3-8B's three stacked layers (3 × 4096); CFG runs the
    cond and uncond passes one after the other at batch 1 (`Flux2KleinPipeline.__call__`).
    `real_model` gives klein 4B's (3 × 2560) for a 4B model name."""
    real_label = "FLUX.2 klein 9B"
    size = "9b"
    """The published width `build_real_*` build: "9b" (default, the largest) or "4b"."""

    def real_model(self, model_name: str) -> Flux2Klein:
        """klein 4B when the name says so (`FLUX.2-klein-base-4B`, `flux-2-klein-4b.safetensors`,
        a local folder named after it), else 9B."""
        if not re.search(r"(?<![0-9])4b(?![a-z0-9])", model_name.lower()):
            return self
        small = Flux2Klein()
        small.size, small.real_label = "4b", "FLUX.2 klein 4B"
        small.plan_arch = PlanArch(
            latent_channels=32, text_tokens=0, text_dim=7680, pooled_dim=0, cfg_batch=1
        )
        return small

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        """klein 4B (5 double blocks) or 9B (8): `flux2_klein_4b` / `flux-2-klein-4b/lora`;
        {} for other sizes (the tiny model)."""
        size = {5: "4b", 8: "9b"}.get(components.transformer.config.num_layers)
        if size is None:
            return {}
        return {
            "ss_base_model_version": f"flux2_klein_{size}",
            "modelspec.architecture": f"flux-2-klein-{size}/lora",
        }

    def named_by(self, architecture: str, version: str) -> bool:
        return architecture.startswith(("flux-2-klein", "flux2-klein")) or version.startswith(
            ("flux2_klein", "flux2-klein")
        )

    # -- building and loading ----------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> Flux2KleinComponents:
        return tiny_flux2_klein(seed)

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        quantize: str = "none",
    ) -> Flux2KleinComponents:
        import diffusers
        from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            # the class itself, not AutoTokenizer: for a hub id transformers' AutoTokenizer
            # also asks for the repo's tokenizer/config.json, which offline (from the cache)
            # is an error; the released tokenizer_config.json names Qwen2Tokenizer
            tok = Qwen2Tokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            te = Qwen3ForCausalLM.from_pretrained(
                name,
                subfolder="text_encoder",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            vae = diffusers.AutoencoderKLFlux2.from_pretrained(name, subfolder="vae", **weights)
            transformer = from_pretrained_streamed(
                diffusers.Flux2Transformer2DModel,
                name,
                "transformer",
                **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
            )
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            )
            distilled = self._distilled(name, revision)
        except (OSError, ValueError) as e:
            raise load_error(
                "FLUX.2 klein",
                name,
                e,
                allow_pickle,
                "transformer/, vae/, text_encoder/, tokenizer/",
            ) from None
        freeze(transformer, vae, te)
        return Flux2KleinComponents(transformer, vae, te, tok, sched, is_distilled=distilled)

    @staticmethod
    def _distilled(name: str, revision: str) -> bool:
        if Path(name).expanduser().is_dir():
            return _is_distilled(str(Path(name).expanduser()))
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(name, "model_index.json", revision=revision or None)
        return _is_distilled(str(Path(index).parent))

    def load_configured(self, cfg: ModelConfig, kind: str) -> Flux2KleinComponents:
        """Components with the `model.*` options applied (text length, quantize)."""
        from lorakit.errors import ConfigError
        from lorakit.models.loading import load_quantizable

        if cfg.drop_t5:
            raise ConfigError(
                "model.drop_t5 = true applies to SD3 only: FLUX.2 klein's text conditioning is "
                "Qwen3's (there is no T5). Set model.drop_t5 = false."
            )
        comps = load_quantizable(self, cfg, kind)
        comps.max_sequence_length = cfg.text_length(self.text_length)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """The VAE and scheduler configs; the transformer's is read off the file's shapes (4B or
        9B, `names.infer_config`), and Qwen3 and its tokenizer must come from a folder."""
        return {
            "vae": dict(FLUX2_VAE, _class_name="AutoencoderKLFlux2"),
            "scheduler": dict(FLUX2_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"),
        }

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> Flux2KleinComponents:
        """The transformer from a BFL / ComfyUI `flux-2-klein-*.safetensors` (BFL names, bare or
        under `model.diffusion_model.`; or diffusers names), its config from
        `folder/transformer` when present, else read off the file's shapes. From `folder`
        (model.single_file_config): the VAE and Qwen3 either as diffusers subfolders (`vae/`,
        `text_encoder/` with weights) or as ComfyUI's split files lying in the folder
        (`flux2-vae.safetensors`, `qwen_3_4b.safetensors`: found by their keys, configs from
        `vae/` / `text_encoder/` config.json when present, else the real VAE's and Qwen3's
        read off the shapes), the tokenizer from `tokenizer/` (no split file carries one), the
        scheduler from `scheduler/` or the built-in one. One paragraph when the file is
        FLUX.2 [dev] or the folder has no text encoder."""
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from lorakit.errors import LorakitError
        from lorakit.models import single_file as sf

        try:
            inferred = _names.infer_config(checkpoint)
        except (KeyError, IndexError, ValueError) as e:
            raise LorakitError(
                f"'{source}' looks like a FLUX.2 transformer file but lacks {sf._first_line(e)}: "
                "it is not a complete flux-2-klein-*.safetensors. Download the file again, or "
                "pass a diffusers folder of the model as model.name."
            ) from None
        if inferred["guidance_embeds"]:
            raise LorakitError(
                f"'{source}' is a FLUX.2 [dev] transformer (it has a guidance embedding and "
                "pairs with a Mistral text encoder), not FLUX.2 [klein]; lorakit trains klein "
                "only. Pass a flux-2-klein-*.safetensors file (4B or 9B, base or distilled)."
            )
        if not sf.part_present(folder, PARTS["text_encoder"]):
            raise LorakitError(
                f"The FLUX.2 klein checkpoint '{source}' holds the transformer only, and its "
                f"Qwen3 text encoder must come from model.single_file_config, but '{folder}' "
                "has neither a text_encoder/ with weights nor a Qwen3 .safetensors file "
                "(ComfyUI's text_encoders/qwen_3_4b.safetensors, or qwen_3_8b for klein 9B). "
                "Set model.single_file_config to a folder holding one of them plus tokenizer/, "
                "e.g. a downloaded copy of black-forest-labs/FLUX.2-klein-base-4B (or -9B), or "
                "pass that diffusers folder itself as model.name."
            )
        sub = Path(folder) / "transformer"
        if sub.is_dir():
            config = Flux2Transformer2DModel.load_config(str(sub), local_files_only=True)
        else:
            config = dict(_KLEIN, **inferred)
        try:
            from accelerate import init_empty_weights

            with init_empty_weights():
                transformer = Flux2Transformer2DModel.from_config(config)
            state = _names.read_transformer(checkpoint, transformer.config)
            dtype = target_dtype("denoiser") or torch.float32  # inside `loading.load_in`
            state = {k: v.to(dtype) for k, v in state.items()}
            transformer.load_state_dict(sf.own_storage(state), strict=True, assign=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise LorakitError(
                f"Could not read the FLUX.2 klein transformer from '{source}': "
                f"{sf._first_line(e)}. The file and the transformer config "
                f"({sub if sub.is_dir() else 'read off the file'}) must describe the same klein "
                "(4B: 5 double / 20 single blocks, 9B: 8 / 24); set model.single_file_config to "
                "a local diffusers folder of the model the file was made from."
            ) from None
        split = sf.split_file(folder, PARTS["text_encoder"])
        if split is None:
            te = sf.load_from_folder(Qwen3ForCausalLM, folder, "text_encoder", source)
        else:
            te = _split_text_encoder(split, folder)
        tok = sf.load_from_folder(AutoTokenizer, folder, "tokenizer", source, tokenizer=True)
        split = sf.split_file(folder, PARTS["vae"])
        if split is None:
            vae = sf.load_from_folder(AutoencoderKLFlux2, folder, "vae", source)
        else:
            vae = _split_vae(split, folder)
        sched = sf.load_scheduler(
            folder, dict(FLUX2_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"), {}
        )
        joint = transformer.config.joint_attention_dim
        if 3 * te.config.hidden_size != joint:
            raise LorakitError(
                f"The text encoder from '{folder}' is {te.config.hidden_size} wide but the "
                f"transformer in '{source}' reads 3 × {joint // 3} features: klein 4B pairs with "
                "Qwen3-4B, klein 9B with Qwen3-8B. Set model.single_file_config to a diffusers "
                "folder of the same klein size as the file."
            )
        freeze(transformer, vae, te)
        return Flux2KleinComponents(
            transformer, vae, te, tok, sched, is_distilled=_is_distilled(folder)
        )

    def save(self, components: Flux2KleinComponents, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {"transformer": klein_transformer_modules}[component]()

    def frozen_modules(self, components: Flux2KleinComponents) -> dict[str, torch.nn.Module]:
        return {"vae": components.vae, "text_encoder": components.text_encoder}

    # -- the real model, for `lorakit plan` (meta device) ---------------------------------------

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel(
            **(KLEIN_4B_TRANSFORMER if self.size == "4b" else KLEIN_9B_TRANSFORMER)
        )

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """Qwen3-8B (klein 9B's encoder, as loaded: with its LM head) and the FLUX.2 VAE;
        `drop_t5` does not apply (no T5)."""
        from diffusers import AutoencoderKLFlux2
        from transformers import Qwen3Config, Qwen3ForCausalLM

        te = Qwen3ForCausalLM(Qwen3Config(**(QWEN3_4B if self.size == "4b" else QWEN3_8B)))
        return {"vae": AutoencoderKLFlux2(**FLUX2_VAE), "text_encoder": te}

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 32, h, w]`, sigmas `[B]` (0.5), `encoder_hidden_states` `[B, text_len, 12288]`."""
        meta = dict(device="meta", dtype=dtype)
        a = self.plan_arch
        lat = torch.empty(batch, a.latent_channels, h, w, **meta)
        cond = {"encoder_hidden_states": torch.empty(batch, text_len, a.text_dim, **meta)}
        return lat, torch.full((batch,), 0.5, device="meta"), cond

    # -- encoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: Flux2KleinComponents, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` → normalised latents `[B, 32, H/8, W/8]` (module docstring)."""
        vae = components.vae
        raw = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return normalise(vae, raw)

    @torch.no_grad()
    def encode_prompts(
        self, components: Flux2KleinComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: Flux2KleinComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": [B, max_sequence_length, 3·D]}` from the pipeline's own
        `encode_prompt` (chat template, layers 9/18/27)."""
        pipe = self.pipeline(components)
        embeds, _ = pipe.encode_prompt(
            prompt=list(prompts),
            device=components.text_encoder.device,
            max_sequence_length=components.max_sequence_length,
            text_encoder_out_layers=TEXT_LAYERS,
        )
        return {"encoder_hidden_states": embeds}

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def noise_and_timesteps(
        self,
        components: Flux2KleinComponents,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """noise `[B, 32, h, w]` and sigmas `[B]` in (0, 1) (fp32, CPU); `shift` sampling with
        the pipeline's μ for (h/2)(w/2) image tokens at `SHIFT_STEPS` steps."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        h, w = latents.shape[-2:]
        mu = shift_mu(train, (h // 2) * (w // 2))
        sigmas = flow.sample_sigmas(
            latents.shape[0],
            generator,
            train.timestep_sampling,
            train.logit_mean,
            train.logit_std,
            mu,
            bias=train.timestep_bias,
        )
        return noise, sigmas

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Velocity `[B, 32, h, w]` for noisy latents `[B, 32, h, w]` and sigmas `[B]` (packed
        and given ids inside). `cond["guidance"]` `[B]` reaches a transformer with a guidance
        embedding only (klein has none)."""
        b, _, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        hidden = cond["encoder_hidden_states"]
        tokens, img_ids = pack(noisy)
        guidance = None
        config = _config(denoiser)
        if config is not None and config.get("guidance_embeds", False):
            guidance = cond.get("guidance")
            guidance = (torch.ones(b) if guidance is None else guidance).to(device, torch.float32)
        out = denoiser(
            hidden_states=tokens,
            timestep=timesteps.to(device, torch.float32).to(dtype),
            guidance=guidance,
            encoder_hidden_states=hidden,
            txt_ids=_pipe_cls()._prepare_text_ids(hidden).to(device),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack(out[:, : tokens.shape[1]], h, w)

    def loss(
        self,
        components: Flux2KleinComponents,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        train: TrainConfig,
    ) -> torch.Tensor:
        noisy, target = flow.noisy_and_target(latents, noise, timesteps)
        cond = dict(cond, guidance=torch.full((latents.shape[0],), float(train.guidance)))
        pred = self.predict(denoiser, noisy, timesteps, cond)
        return flow.weighted_mse(pred, target, timesteps, train.loss_weighting)

    # -- sampling --------------------------------------------------------------------------------

    def pipeline(self, components: Flux2KleinComponents, scheduler: str = "default") -> Any:
        check_flow_sampler(scheduler, "FLUX.2 klein")
        c = components
        pipe = _pipe_cls()(
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            transformer=c.transformer,
            is_distilled=c.is_distilled,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def shift_mu(train: TrainConfig, image_tokens: int) -> float:
    """μ of the `shift` sampler: ln(train.flow_shift) when set, else the pipeline's
    `compute_empirical_mu(image_tokens, SHIFT_STEPS)`."""
    if train.flow_shift:
        return float(torch.tensor(train.flow_shift).log())
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_tokens, SHIFT_STEPS)
