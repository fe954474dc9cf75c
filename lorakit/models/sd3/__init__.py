"""Stable Diffusion 3 / 3.5 family (`sd3`): MMDiT transformer trained with rectified flow.

Tensor conventions:
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 16 (VAE /8, patch 2).
- latents `[B, 16, H/8, W/8]` = `(vae.encode(pixels).latent_dist.mean - shift_factor) *
  scaling_factor` (SD3: shift 0.0609, scale 1.5305). The mean, not a sample (deterministic cache).
- `cond = {"encoder_hidden_states": [B, 77 + T, D_t5], "pooled_projections": [B, P]}` exactly as
  `StableDiffusion3Pipeline.encode_prompt` builds them: CLIP-L and CLIG-G penultimate hidden
  states concatenated on the feature axis and zero-padded to the T5 width D_t5 (4096), then the T5
  sequence (T = `model.t5_max_length`, default 256) appended on the token axis; pooled = CLIP-L and
  CLIP-G projected pooled outputs concatenated (P = 768 + 1280 = 2048).
  `model.drop_t5 = true` leaves T5 out: its T tokens are zeros, which saves ~9 GB (fp16) and
  weakens prompt following and text rendering (Stability AI's own note on running without T5).
- timesteps: sigmas σ `[B]` float in (0, 1), NOT integer steps (`lorakit.models.flow`); the
  transformer is called with `σ · 1000`, as the pipeline does.
- noisy = (1 - σ) · x0 + σ · noise, target = noise - x0, optional σ loss weighting.
- LoRA goes into `transformer` (diffusers prefix `transformer.`); optionally CLIP-L
  (`text_encoder.`, with the `text_model.` level). kohya files use kohya's SD3 names
  (`lora_unet_joint_blocks_…`, fused qkv; names.py: ComfyUI, Forge), or with naming
  `diffusers` `lora_transformer_` + diffusers paths (ComfyUI); CLIP-L is `lora_te1_`. The
  default export is the diffusers-format file (diffusers, ComfyUI; alpha/rank folded into
  lora_B), which diffusers needs: it cannot read SD3 kohya files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from lorakit.config import ModelConfig, TrainConfig
from lorakit.models import flow
from lorakit.models.base import AdapterTarget, PlanArch
from lorakit.models.flow import check_flow_sampler, encode_flow_latents, shift_mu
from lorakit.models.loading import (
    dtype_kwargs,
    freeze,
    from_pretrained_streamed,
    hub_kwargs,
    load_error,
)
from lorakit.models.sd3 import names as _names
from lorakit.models.text_encoders import (
    CLIP_L_TEXT,
    OPENCLIP_BIGG_TEXT,
    T5_XXL,
    TINY_CLIP,
    clip_from_config,
    clip_l_modules,
    openclip_bigg_modules,
    t5_from_config,
    tiny_clip,
    tiny_t5_config,
)
from lorakit.models.vae import FLOW_VAE, tiny_flow_vae


@dataclass
class SD3Components:
    transformer: Any
    vae: Any
    text_encoder: Any
    """CLIP-L with projection (`CLIPTextModelWithProjection`)."""
    tokenizer: Any
    text_encoder_2: Any
    """CLIP-G (OpenCLIP bigG) with projection."""
    tokenizer_2: Any
    text_encoder_3: Any
    """T5-XXL encoder, or None (`model.drop_t5`)."""
    tokenizer_3: Any
    scheduler: Any
    t5_max_length: int = 256
    """T5 tokens per caption (training and previews)."""


# --- fixed tables of the real SD3.5 architectures ----------------------------------------------
# Generated from the published configs' structure, never from `named_modules()`.

_JOINT_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
_TOP_LEVEL = (
    "pos_embed.proj",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)


def mmdit_modules(num_layers: int, dual_attention_layers: tuple[int, ...] = ()) -> set[str]:
    """Linear/Conv modules of an `SD3Transformer2DModel` with this many joint blocks. The last
    block is `context_pre_only`: no context output projection or context feed-forward."""
    names = set(_TOP_LEVEL)
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        names |= {f"{b}.norm1.linear", f"{b}.norm1_context.linear"}
        names |= {f"{b}.attn.{p}" for p in _JOINT_ATTN}
        names |= {f"{b}.ff.net.0.proj", f"{b}.ff.net.2"}
        if i < num_layers - 1:
            names |= {f"{b}.attn.to_add_out", f"{b}.ff_context.net.0.proj"}
            names.add(f"{b}.ff_context.net.2")
        if i in dual_attention_layers:  # SD3.5 medium's MMDiT-X: a second self-attention
            names |= {f"{b}.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    return names


@cache
def sd35_transformer_modules() -> frozenset[str]:
    """Union of SD3.5 large (38 blocks) and SD3.5 medium (24 blocks, `attn2` in blocks 0-12)."""
    return frozenset(mmdit_modules(38) | mmdit_modules(24, tuple(range(13))))


# --- tiny offline configs ----------------------------------------------------------------------
# Shape rules: joint_attention_dim = T5 d_model, pooled_projection_dim = sum of both CLIP
# projection dims, caption_projection_dim = heads × head_dim; block 0 has dual attention
# (SD3.5 medium), block 1 is the context_pre_only last block.

TINY_T5_DIM = 64
TINY_SD3_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=TINY_T5_DIM,
    caption_projection_dim=32,
    pooled_projection_dim=2 * TINY_CLIP["projection_dim"],
    out_channels=16,
    pos_embed_max_size=32,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# --- the real SD3.5 large transformer, for `lorakit plan` (meta device) ------------------------

SD35_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
"""stabilityai/stable-diffusion-3.5-large `transformer/config.json` (8.1 B params)."""


class SD3:
    """Stable Diffusion 3 / 3.5 (large, large-turbo, medium)."""

    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    base_model_version = "5-large"
    """kohya's value for SD3.5 large (`medium` / `5-medium` for the medium models)."""
    modelspec_architecture = "stable-diffusion-3-5-large/lora"
    denoiser_name = "transformer"
    default_export_format = "diffusers"
    kohya_names = "sd3"
    """kohya's `original` naming: SD3's `joint_blocks_{i}_{x,context}_block_…` (fused qkv)."""
    kohya_split_prefix = "lora_transformer_"
    """OneTrainer's prefix for diffusers names, which ComfyUI maps for SD3 (`mmdit_to_diffusers`);
    `lora_unet_` means an ORIGINAL name to every loader."""
    diffusers_strength = "folded"
    loaders = {  # noqa: RUF012 - read-only; checked by tests/test_export_matrix.py
        ("kohya",): "ComfyUI, Forge",
        ("kohya", "diffusers"): "ComfyUI",
        ("diffusers",): "diffusers, ComfyUI",
        ("lycoris",): "ComfyUI",
    }

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        """SD3 medium / SD3.5 medium / SD3.5 large, from the transformer's config."""
        return _names.variant_metadata(components)

    def named_by(self, architecture: str, version: str) -> bool:
        # kohya writes `medium`, `large`, `3`, `sd3`, `5-large`, `5-medium`, …
        return architecture.startswith("stable-diffusion-3") or bool(
            version in ("medium", "large") or re.match(r"(sd)?3|5-", version)
        )

    """`lorakit export` default: the format ComfyUI and A1111 load for this family."""
    targets = (
        AdapterTarget("transformer", "lora_unet_"),
        AdapterTarget("text_encoder", "lora_te1_", canonical_prefix="text_model."),
        AdapterTarget("text_encoder_2", "lora_te2_", canonical_prefix="text_model."),
    )
    """CLIP-L (`lora_te1_`, diffusers `text_encoder.`) and CLIP-G (`lora_te2_`,
    `text_encoder_2.`) can carry a LoRA, as kohya's `lora_sd3.py` and ComfyUI name them; T5
    (`text_encoder_3`) stays frozen."""
    default_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )  # fmt: skip
    """Attention projections of both streams (and SD3.5 medium's `attn2`), as diffusers' script."""
    tiny_resolution = 64
    pixel_multiple = 16
    text_length = 256
    """Bucket sides are multiples of this: VAE factor 8 × 2×2 latent patches."""
    quantizable = True
    swap_blocks = ("transformer_blocks",)
    min_resolution = 512
    name_hints = ("stable-diffusion-3", "sd3")
    plan_arch = PlanArch(
        latent_channels=16, text_tokens=77, text_dim=4096, pooled_dim=2048, cfg_batch=2
    )
    """Text tokens = 77 CLIP + the T5 length."""

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> SD3Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import T5EncoderModel

        from lorakit.models.text_encoders import tiny_clip_tokenizer, tiny_t5_tokenizer

        tok, tok_2, tok_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_flow_vae(0.0609, 1.5305))
        te = tiny_clip(tok, seed=seed + 2)
        te_2 = tiny_clip(tok_2, seed=seed + 3)
        torch.manual_seed(seed + 4)
        te_3 = T5EncoderModel(tiny_t5_config(len(tok_3), TINY_T5_DIM))
        sched = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
        comps = SD3Components(transformer, vae, te, tok, te_2, tok_2, te_3, tok_3, sched)
        freeze(transformer, vae, te, te_2, te_3)
        return comps

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        drop_t5: bool = False,
        quantize: str = "none",
    ) -> SD3Components:
        import diffusers
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            tok = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            tok_2 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common)
            te = CLIPTextModelWithProjection.from_pretrained(
                name,
                subfolder="text_encoder",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            te_2 = CLIPTextModelWithProjection.from_pretrained(
                name,
                subfolder="text_encoder_2",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            te_3 = tok_3 = None
            if not drop_t5:
                tok_3 = T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_3", **common)
                te_3 = T5EncoderModel.from_pretrained(
                    name,
                    subfolder="text_encoder_3",
                    **weights,
                    **dtype_kwargs("t5", "transformers"),
                )
            vae = diffusers.AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
            transformer = from_pretrained_streamed(
                diffusers.SD3Transformer2DModel,
                name,
                "transformer",
                **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
            )
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            )
        except (OSError, ValueError) as e:
            raise load_error(
                "SD3", name, e, allow_pickle, "transformer/, vae/, text_encoder(_2,_3)/, tokenizers"
            ) from None
        comps = SD3Components(transformer, vae, te, tok, te_2, tok_2, te_3, tok_3, sched)
        freeze(transformer, vae, te, te_2, te_3)
        return comps

    def load_configured(self, cfg: ModelConfig, kind: str) -> SD3Components:
        """Components with the `model.*` options applied (T5 length, drop_t5, quantize)."""
        from lorakit.models.quantize import quantize_loaded

        if kind == "tiny":
            comps = self.build_tiny(seed=0)
            if cfg.drop_t5:
                comps.text_encoder_3 = comps.tokenizer_3 = None
            if cfg.quantize != "none":
                comps.transformer = quantize_loaded(comps.transformer, cfg.quantize)
        elif kind == "single_file":
            from lorakit.models.single_file import load_single_file

            comps = load_single_file(
                self, cfg.name, cfg.single_file_config, allow_pickle=cfg.allow_pickle
            )
            if cfg.drop_t5:
                comps.text_encoder_3 = comps.tokenizer_3 = None
            if cfg.quantize != "none":
                comps.transformer = quantize_loaded(comps.transformer, cfg.quantize)
        else:
            comps = self.load(
                cfg.name,
                revision=cfg.revision,
                variant=cfg.variant,
                allow_pickle=cfg.allow_pickle,
                drop_t5=cfg.drop_t5,
                quantize=cfg.quantize,
            )
        comps.t5_max_length = cfg.text_length(self.text_length)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """None built in: an SD3 file lacks usable text encoders (see `from_single_file`)."""
        return {}

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> SD3Components:
        """MMDiT from `joint_blocks.*` (`names.transformer_from_original`: fused q/k/v split,
        adaLN (shift, scale) → (scale, shift)), VAE from `first_stage_model.*` when present
        (`ldm_names.vae_from_ldm`); CLIP-L,
        CLIP-G, T5 (if `folder` has text_encoder_3/), tokenizers and scheduler from `folder`.
        The text encoders embedded in some SD3 files (`text_encoders.*`) are not read: diffusers
        replaces CLIP-L's projection by an identity when converting them."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        from lorakit.models import ldm_names
        from lorakit.models import single_file as sf
        from lorakit.models.naming import from_original

        def folder_part(cls, sub, **kw):
            return sf.load_from_folder(cls, folder, sub, source, **kw)

        read_vae = from_original(ldm_names.VAE_PREFIX, ldm_names.vae_from_ldm)
        te = folder_part(CLIPTextModelWithProjection, "text_encoder")
        te_2 = folder_part(CLIPTextModelWithProjection, "text_encoder_2")
        tok = folder_part(CLIPTokenizer, "tokenizer", tokenizer=True)
        tok_2 = folder_part(CLIPTokenizer, "tokenizer_2", tokenizer=True)
        te_3 = tok_3 = None
        if (Path(folder) / "text_encoder_3").is_dir():
            te_3 = folder_part(T5EncoderModel, "text_encoder_3")
            tok_3 = folder_part(T5TokenizerFast, "tokenizer_3", tokenizer=True)
        transformer = sf.load_converted(
            SD3Transformer2DModel,
            checkpoint,
            folder,
            "transformer",
            source,
            _names.read_transformer,
        )
        if sf.has_prefix(checkpoint, ldm_names.VAE_PREFIX):
            vae = sf.load_converted(AutoencoderKL, checkpoint, folder, "vae", source, read_vae)
        else:
            vae = folder_part(AutoencoderKL, "vae")
        sched = sf.load_scheduler(
            folder, dict(SD3_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"), {}
        )
        assert isinstance(sched, FlowMatchEulerDiscreteScheduler), type(sched)
        comps = SD3Components(transformer, vae, te, tok, te_2, tok_2, te_3, tok_3, sched)
        freeze(transformer, vae, te, te_2, te_3)
        return comps

    def save(self, components: SD3Components, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {
            "transformer": sd35_transformer_modules,
            "text_encoder": clip_l_modules,
            "text_encoder_2": openclip_bigg_modules,
        }[component]()

    def frozen_modules(self, components: SD3Components) -> dict[str, torch.nn.Module]:
        out = {
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "text_encoder_2": components.text_encoder_2,
        }
        if components.text_encoder_3 is not None:
            out["text_encoder_3"] = components.text_encoder_3
        return out

    # -- the real model, for `lorakit plan` (meta device) --------------------------------------

    real_label = "SD3.5 large"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """CLIP-L, CLIP-G and (unless `drop_t5`) T5-XXL with projection, the 16-channel VAE."""
        from diffusers import AutoencoderKL

        t5 = t5_from_config(T5_XXL)
        out = {
            "vae": AutoencoderKL.from_config(FLOW_VAE),
            "text_encoder": clip_from_config(CLIP_L_TEXT, True),
            "text_encoder_2": clip_from_config(OPENCLIP_BIGG_TEXT, True),
        }
        if not drop_t5:
            out["text_encoder_3"] = t5
        return out

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 16, h, w]`, sigmas `[B]` (0.5), `encoder_hidden_states` `[B, 77 + text_len,
        4096]`, `pooled_projections` `[B, 2048]`."""
        a = self.plan_arch
        tokens = a.text_tokens + text_len
        return flow.meta_inputs(
            batch, h, w, dtype, a.latent_channels, tokens, a.text_dim, a.pooled_dim
        )

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: SD3Components, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_latents(components.vae, pixels)

    @torch.no_grad()
    def encode_prompts(
        self, components: SD3Components, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: SD3Components, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": [B, 77 + T5 length, 4096], "pooled_projections": [B,
        2048]}`, with autograd: the CLIP encoders' LoRA gets gradients, T5 (no LoRA) none."""
        # The pipeline's own encoder: training sees exactly what sampling feeds the transformer.
        pipe = self.pipeline(components)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=components.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=components.t5_max_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def noise_and_timesteps(
        self,
        components: SD3Components,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """noise `[B, 16, h, w]` and sigmas `[B]` in (0, 1) (fp32, CPU)."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        mu = shift_mu(train, float(components.scheduler.config.get("shift", 3.0)))
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
        """Velocity prediction `[B, 16, h, w]`; `timesteps` are sigmas, scaled ×1000 here."""
        t = (timesteps.to(noisy.device, torch.float32) * 1000.0).to(noisy.dtype)
        return denoiser(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def loss(
        self,
        components: SD3Components,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        train: TrainConfig,
    ) -> torch.Tensor:
        noisy, target = flow.noisy_and_target(latents, noise, timesteps)
        pred = self.predict(denoiser, noisy, timesteps, cond)
        return flow.weighted_mse(pred, target, timesteps, train.loss_weighting)

    # -- sampling ------------------------------------------------------------------------------

    def pipeline(self, components: SD3Components, scheduler: str = "default") -> Any:
        from diffusers import StableDiffusion3Pipeline

        check_flow_sampler(scheduler, "SD3")
        c = components
        pipe = StableDiffusion3Pipeline(
            transformer=c.transformer,
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2,
            tokenizer_2=c.tokenizer_2,
            text_encoder_3=c.text_encoder_3,
            tokenizer_3=c.tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
