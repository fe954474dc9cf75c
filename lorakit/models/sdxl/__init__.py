"""Stable Diffusion XL base family (`sdxl`).

Tensor conventions:
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 8 (SDXL is trained at ~1024² px).
- latents `[B, 4, H/8, W/8]` = `vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor`
  (0.13025 for SDXL). The mean, not a sample, so cached latents are deterministic.
- `cond` (what `predict` reads), batch-first:
  - `encoder_hidden_states` `[B, 77, 768 + 1280]`: the PENULTIMATE hidden states of CLIP ViT-L
    (`text_encoder`, CLIPTextModel) and OpenCLIP ViT-bigG (`text_encoder_2`,
    CLIPTextModelWithProjection), concatenated on the last dim — as diffusers'
    StableDiffusionXLPipeline.encode_prompt does (clip_skip None).
  - `text_embeds` `[B, 1280]`: text_encoder_2's projected pooled output.
  - `time_ids` `[B, 6]`: micro-conditioning `(orig_h, orig_w, crop_top, crop_left, target_h,
    target_w)` in pixels, float32. Per IMAGE, not per caption: `image_conditioning(...)` returns
    it as `[1, 6]` and the training loop merges it into `cond`.
- timesteps: integers in [0, 1000), uniform. Target epsilon or v (the scheduler config's
  `prediction_type`), noise offset and min-SNR-γ exactly as sd15 (shared `ddpm_*` helpers).
- LoRA: `unet` (kohya `lora_unet_`, diffusers module names), optionally `text_encoder`
  (`lora_te1_`) and `text_encoder_2` (`lora_te2_`), both with the `text_model.` level.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from lorakit.config import ModelConfig, TrainConfig
from lorakit.errors import LorakitError
from lorakit.models.base import ATTENTION_PROJECTIONS, AdapterTarget, PlanArch
from lorakit.models.ddpm import (
    SCALED_LINEAR_SCHEDULER,
    ddpm_loss,
    ddpm_noise_and_timesteps,
    load_scheduler,
    meta_inputs,
    preview_scheduler,
)
from lorakit.models.loading import (
    dtype_kwargs,
    first_line,
    from_pretrained_streamed,
    hub_kwargs,
    load_quantizable,
)
from lorakit.models.sdxl import names as _names
from lorakit.models.text_encoders import (
    CLIP_L_TEXT,
    OPENCLIP_BIGG_TEXT,
    TINY_CLIP,
    clip_from_config,
    clip_l_modules,
    openclip_bigg_modules,
)
from lorakit.models.vae import SD_VAE, TINY_VAE

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass
class SDXLComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any


# --- fixed tables of the real SDXL base architecture -------------------------------------------
# Built from the block layout (diffusers naming), never from `named_modules()` of the installed
# libraries. Levels: 320 / 640 / 1280 channels; transformer depth 0 / 2 / 10 per attention.

_DOWN_DEPTH = (0, 2, 10)  # transformer blocks per attention in down_blocks.{0,1,2}
_UP_DEPTH = (10, 2, 0)  # up_blocks.{0,1,2}
_MID_DEPTH = 10


def _attention_leaves(depth: int) -> list[str]:
    leaves = ["proj_in", "proj_out"]  # Linear in SDXL (use_linear_projection)
    for k in range(depth):
        tb = f"transformer_blocks.{k}"
        leaves += [f"{tb}.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
        leaves += [f"{tb}.attn1.to_out.0", f"{tb}.attn2.to_out.0"]
        leaves += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
    return leaves


@cache
def sdxl_unet_modules() -> frozenset[str]:
    """Every Linear/Conv module of the SDXL base UNet that a LoRA/LoCon can target."""
    names: set[str] = {"conv_in", "conv_out"}
    names |= {f"{e}.linear_{i}" for e in ("time_embedding", "add_embedding") for i in (1, 2)}
    res = ("conv1", "conv2", "time_emb_proj")
    for b, depth in enumerate(_DOWN_DEPTH):
        for i in range(2):
            names |= {f"down_blocks.{b}.resnets.{i}.{leaf}" for leaf in res}
            if depth:
                names |= {f"down_blocks.{b}.attentions.{i}.{x}" for x in _attention_leaves(depth)}
        if b < 2:
            names.add(f"down_blocks.{b}.downsamplers.0.conv")
    # channels change in the first resnet of levels 1 and 2 (320→640, 640→1280)
    names |= {"down_blocks.1.resnets.0.conv_shortcut", "down_blocks.2.resnets.0.conv_shortcut"}
    names |= {f"mid_block.resnets.{i}.{leaf}" for i in range(2) for leaf in res}
    names |= {f"mid_block.attentions.0.{x}" for x in _attention_leaves(_MID_DEPTH)}
    for b, depth in enumerate(_UP_DEPTH):
        for i in range(3):
            # every up resnet takes a skip concatenation, so every one has a shortcut conv
            names |= {f"up_blocks.{b}.resnets.{i}.{leaf}" for leaf in (*res, "conv_shortcut")}
            if depth:
                names |= {f"up_blocks.{b}.attentions.{i}.{x}" for x in _attention_leaves(depth)}
        if b < 2:
            names.add(f"up_blocks.{b}.upsamplers.0.conv")
    return frozenset(names)


# --- the real SDXL base 1.0 configs, for single-file checkpoints -------------------------------

SDXL_UNET = dict(
    _class_name="UNet2DConditionModel",
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 6 × 256 time ids + 1280 pooled
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(
    SCALED_LINEAR_SCHEDULER,
    _class_name="EulerDiscreteScheduler",
    interpolation_type="linear",
    timestep_spacing="leading",
    use_karras_sigmas=False,
)

# --- tiny offline configs ----------------------------------------------------------------------
# SDXL's block layout (DownBlock2D first, linear projections, add_embedding), small widths; module
# names are a strict subset of `sdxl_unet_modules()` (tests assert it).

# Hidden sizes of text_encoder, text_encoder_2. They must differ (768 vs 1280 in the real model):
# diffusers' single-file loader tells the two CLIP towers apart by their width.
TINY_TEXT_DIMS = (32, 48)
TINY_PROJECTION_DIM = 48  # text_encoder_2 projection (pooled) size, = its width as in the real
TINY_TIME_EMBED_DIM = 8
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=sum(TINY_TEXT_DIMS),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_PROJECTION_DIM,
    norm_num_groups=8,
)


class SDXL:
    """Stable Diffusion XL base 1.0 (and finetunes with its UNet layout)."""

    name = "sdxl"
    pixel_multiple = 8
    text_length = 0
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    denoiser_name = "unet"
    default_export_format = "kohya"
    kohya_names = "sgm"
    """kohya's `original` naming: SGM/ldm block names (`input_blocks_4_1_…`)."""
    kohya_split_prefix = ""
    diffusers_strength = "header"
    loaders: dict = {}  # noqa: RUF012 - read-only

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        return {}

    def named_by(self, architecture: str, version: str) -> bool:
        return architecture.startswith("stable-diffusion-xl") or version.startswith("sdxl")

    """`lorakit export` default: the format ComfyUI and A1111 load for this family."""
    default_targets = ATTENTION_PROJECTIONS
    targets = (
        AdapterTarget("unet", "lora_unet_"),
        AdapterTarget("text_encoder", "lora_te1_", canonical_prefix="text_model."),
        AdapterTarget("text_encoder_2", "lora_te2_", canonical_prefix="text_model."),
    )
    tiny_resolution = 64
    quantizable = True
    """NF4 / int8 (bitsandbytes) quantize the UNet's Linear layers, 87% of its weights: NF4
    leaves 0.35 of its bf16 bytes (fp8: 0.50); its convolutions stay in the compute dtype."""
    swap_blocks = ()
    min_resolution = 512
    name_hints = ("xl",)
    plan_arch = PlanArch(
        latent_channels=4, text_tokens=77, text_dim=2048, pooled_dim=1280, cfg_batch=2
    )

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> SDXLComponents:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from lorakit.models.text_encoders import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_clip_tokenizer()
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**dict(TINY_VAE, scaling_factor=SDXL_VAE["scaling_factor"]))
        encoders = []
        for i, (cls, hidden) in enumerate(
            zip((CLIPTextModel, CLIPTextModelWithProjection), TINY_TEXT_DIMS, strict=True)
        ):
            torch.manual_seed(seed + 2 + i)
            config = CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **dict(TINY_CLIP, hidden_size=hidden, projection_dim=TINY_PROJECTION_DIM),
            )
            encoders.append(cls(config))
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
        comps = SDXLComponents(unet, vae, *encoders, tokenizer, tokenizer_2, scheduler)
        _freeze(comps)
        return comps

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        quantize: str = "none",
    ) -> SDXLComponents:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            comps = SDXLComponents(
                unet=from_pretrained_streamed(
                    UNet2DConditionModel,
                    name,
                    "unet",
                    **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
                ),
                vae=AutoencoderKL.from_pretrained(name, subfolder="vae", **weights),
                text_encoder=CLIPTextModel.from_pretrained(
                    name,
                    subfolder="text_encoder",
                    **weights,
                    **dtype_kwargs("text_encoder", "transformers"),
                ),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    name,
                    subfolder="text_encoder_2",
                    **weights,
                    **dtype_kwargs("text_encoder", "transformers"),
                ),
                tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common),
                tokenizer_2=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common),
                scheduler=load_scheduler(name, common),
            )
        except (OSError, ValueError) as e:
            hint = (
                " The folder or repo has only pickled weights (.bin/.ckpt): convert them to "
                "safetensors, or allow unpickling with --allow-pickle if you "
                "trust the source."
                if "safetensors" in str(e).lower() and not allow_pickle
                else ""
            )
            raise LorakitError(
                f"Could not load the SDXL model '{name}': {first_line(e)}.{hint} model.name must "
                "be a diffusers folder (with model_index.json, unet/, vae/, text_encoder/, "
                "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), a hub id you can reach, "
                "or a single-file .safetensors checkpoint."
            ) from None
        _freeze(comps)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        return {
            "unet": SDXL_UNET,
            "vae": SDXL_VAE,
            "text_encoder": CLIP_L_TEXT,
            "text_encoder_2": OPENCLIP_BIGG_TEXT,
            "scheduler": SDXL_SCHEDULER,
        }

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> SDXLComponents:
        """SGM keys: `model.diffusion_model.*`, `first_stage_model.*`,
        `conditioner.embedders.0.transformer.*` (CLIP-L), `conditioner.embedders.1.model.*`
        (OpenCLIP bigG, fused in_proj q/k/v, `text_projection` stored transposed)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from lorakit.models import single_file as sf

        def part(cls, sub):  # converted by the names.py tables
            return sf.load_converted(
                cls, checkpoint, folder, sub, source, _names.FROM_SINGLE_FILE[sub]
            )

        comps = SDXLComponents(
            unet=part(UNet2DConditionModel, "unet"),
            vae=part(AutoencoderKL, "vae"),
            text_encoder=part(CLIPTextModel, "text_encoder"),
            text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2"),
            tokenizer=sf.load_tokenizer(folder, "tokenizer", SDXL_HUB_ID, source),
            tokenizer_2=sf.load_tokenizer(folder, "tokenizer_2", SDXL_HUB_ID, source),
            scheduler=sf.load_scheduler(folder, SDXL_SCHEDULER, checkpoint),
        )
        _freeze(comps)
        return comps

    def save(self, components: SDXLComponents, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {
            "unet": sdxl_unet_modules,
            "text_encoder": clip_l_modules,
            "text_encoder_2": openclip_bigg_modules,
        }[component]()

    def frozen_modules(self, components: SDXLComponents) -> dict[str, torch.nn.Module]:
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "text_encoder_2": components.text_encoder_2,
        }

    def load_configured(self, cfg: ModelConfig, kind: str) -> SDXLComponents:
        """`model.quantize` of the UNet is the only loading option (`load_quantizable`)."""
        return load_quantizable(self, cfg, kind)

    # -- the real model, for `lorakit plan` (meta device) --------------------------------------

    real_label = "SDXL base 1.0"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(SDXL_UNET)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL

        return {
            "vae": AutoencoderKL.from_config(SDXL_VAE),
            "text_encoder": clip_from_config(CLIP_L_TEXT, False),
            "text_encoder_2": clip_from_config(OPENCLIP_BIGG_TEXT, True),
        }

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 4, h, w]`, steps `[B]` (500), `encoder_hidden_states` `[B, 77, 2048]`,
        `text_embeds` `[B, 1280]`, `time_ids` `[B, 6]` (fp32)."""
        a = self.plan_arch
        lat, t, cond = meta_inputs(batch, h, w, dtype, a.latent_channels, a.text_tokens, a.text_dim)
        cond["text_embeds"] = torch.empty(batch, a.pooled_dim, device="meta", dtype=dtype)
        cond["time_ids"] = torch.empty(batch, 6, device="meta")
        return lat, t, cond

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: SDXLComponents, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(
        self, components: SDXLComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: SDXLComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": [B, 77, D1 + D2], "text_embeds": [B, P2]}`."""
        hidden, pooled = [], None
        pairs = (
            (components.tokenizer, components.text_encoder),
            (components.tokenizer_2, components.text_encoder_2),
        )
        for tok, te in pairs:
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = te(ids.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_encoder_2's text_embeds wins, as in diffusers
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(
        self,
        components: SDXLComponents,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int],
        target_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """`{"time_ids": [1, 6]}` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
        float32 — diffusers' `_get_add_time_ids` order. Sizes are (height, width) in pixels of
        the source image, the crop's top-left corner in the resized image, the training crop."""
        values = [*original_size, *crop_top_left, *target_size]
        if len(values) != 6:
            raise ValueError(f"time ids need 2 + 2 + 2 numbers, got {values}")
        return {"time_ids": torch.tensor([values], dtype=torch.float32)}

    def noise_and_timesteps(
        self,
        components: SDXLComponents,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ddpm_noise_and_timesteps(components, latents, generator, train)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if "time_ids" not in cond or "text_embeds" not in cond:
            raise LorakitError(
                "SDXL needs `text_embeds` (from encode_prompts) and `time_ids` (from "
                f"image_conditioning) in cond, got {sorted(cond)}: the training loop must merge "
                "family.image_conditioning(...) of each image into its conditioning."
            )
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(
            noisy,
            timesteps,
            cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def loss(
        self,
        components: SDXLComponents,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        train: TrainConfig,
    ) -> torch.Tensor:
        return ddpm_loss(self.predict, components, denoiser, latents, cond, noise, timesteps, train)

    # -- sampling ------------------------------------------------------------------------------

    def pipeline(self, components: SDXLComponents, scheduler: str = "default") -> Any:
        import diffusers

        sched = preview_scheduler(components.scheduler, scheduler)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=sched,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _freeze(c: SDXLComponents) -> None:
    # Modules built from configs start in train mode; frozen parts must not run dropout.
    for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2):
        m.requires_grad_(False)
        m.eval()
