"""Stable Diffusion 1.x / 2.x-style UNet family (`sd15`).

Tensor conventions:
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 8.
- latents `[B, 4, H/8, W/8]` = `vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor`
  (0.18215 for SD1.5). The mean, not a sample: cached latents are then deterministic.
- `cond = {"encoder_hidden_states": [B, 77, D]}` — CLIP last hidden state (D = 768 for SD1.5).
- timesteps: integers in [0, num_train_timesteps) (1000), drawn uniformly.
- target: `noise` (epsilon) or `scheduler.get_velocity(latents, noise, t)` (v-prediction), read
  from the scheduler config's `prediction_type`. Optional noise offset
  (`noise += offset * randn(B, C, 1, 1)`) and min-SNR-γ weighting
  (`w = min(SNR, γ) / SNR` for epsilon, `min(SNR, γ) / (SNR + 1)` for v-prediction).
- LoRA goes into `unet`; exported with kohya prefix `lora_unet_` and diffusers prefix `unet.`.
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
from lorakit.models.sd15 import names as _names
from lorakit.models.text_encoders import CLIP_L_TEXT, TINY_CLIP, clip_from_config, clip_l_modules
from lorakit.models.vae import SD_VAE, TINY_VAE


@dataclass
class SD15Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


# --- fixed tables of the real SD1.5 architecture -----------------------------------------------
# Key names for exports come from these, never from `named_modules()` of the installed libraries
# (transformers 5 changed CLIP's nesting; a derived name would silently miss `text_model.`).

_ATTN_LEAVES = (
    "proj_in",
    "proj_out",
    *(
        f"transformer_blocks.0.{attn}.{p}"
        for attn in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    ),
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
)


@cache
def sd15_unet_modules() -> frozenset[str]:
    """Every Linear/Conv module of the SD1.5 UNet that a LoRA/LoCon can target."""
    names: set[str] = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    attn_parents = [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
    attn_parents += ["mid_block.attentions.0"]
    attn_parents += [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(3)]
    names |= {f"{p}.{leaf}" for p in attn_parents for leaf in _ATTN_LEAVES}
    res = ("conv1", "conv2", "time_emb_proj")
    for b in range(4):
        for i in range(2):
            names |= {f"down_blocks.{b}.resnets.{i}.{leaf}" for leaf in res}
    names |= {"down_blocks.1.resnets.0.conv_shortcut", "down_blocks.2.resnets.0.conv_shortcut"}
    names |= {f"down_blocks.{b}.downsamplers.0.conv" for b in range(3)}
    names |= {f"mid_block.resnets.{i}.{leaf}" for i in range(2) for leaf in res}
    for b in range(4):
        for i in range(3):
            names |= {f"up_blocks.{b}.resnets.{i}.{leaf}" for leaf in (*res, "conv_shortcut")}
    names |= {f"up_blocks.{b}.upsamplers.0.conv" for b in range(3)}
    return frozenset(names)


# --- tiny offline configs ----------------------------------------------------------------------
# Same block types and naming as SD1.5 (a strict subset of its module names), small widths.

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
# (TINY_VAE: `models/vae.py`; TINY_CLIP: `models/text_encoders.py`.)
# The real SD1.5 scheduler config (PNDM, scaled-linear betas, epsilon target).
SD15_SCHEDULER = SCALED_LINEAR_SCHEDULER

# --- the real SD1.5 component configs (stable-diffusion-v1-5), for single-file checkpoints -----
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_UNET = dict(
    _class_name="UNet2DConditionModel",
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD15_VAE = SD_VAE
"""The KL-f8 VAE (`models/vae.py`); the text encoder is CLIP-L (`text_encoders.CLIP_L_TEXT`)."""


class SD15:
    """Stable Diffusion 1.5 (and UNet models with the same layout)."""

    name = "sd15"
    pixel_multiple = 8
    text_length = 0
    pipeline_class_names = ("StableDiffusionPipeline",)
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    denoiser_name = "unet"
    default_export_format = "kohya"
    kohya_names = "diffusers"
    """What kohya's `original` naming means here (`lorakit.kohya_names`): diffusers module
    names, which is what kohya itself writes for SD1.5."""
    kohya_split_prefix = ""
    """Denoiser prefix of kohya files with diffusers names when it differs from the original
    naming's (transformer families); empty: the same `lora_unet_`."""
    diffusers_strength = "header"
    """diffusers-format files: `header` (alpha only in diffusers' JSON header: only diffusers and
    peft read them) or `folded` (alpha/rank multiplied into lora_B: ComfyUI/Forge read them)."""
    loaders: dict = {}  # noqa: RUF012 - read-only
    """Who loads which exported file at the trained strength, by (format[, kohya naming]), where
    it differs from the format's default (`export.EXPORTERS[...].loads_in`)."""

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        """Kohya names ↔ diffusers modules for the `original` naming; None = identity."""
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        return {}

    def named_by(self, architecture: str, version: str) -> bool:
        """Whether a file's `modelspec.architecture` / `ss_base_model_version` name this family."""
        return architecture.startswith("stable-diffusion-v1") or version == "sd_v1"

    """`lorakit export` default: the format ComfyUI and A1111 load for this family."""
    default_targets = ATTENTION_PROJECTIONS
    targets = (
        AdapterTarget("unet", "lora_unet_"),
        AdapterTarget("text_encoder", "lora_te_", canonical_prefix="text_model."),
    )
    tiny_resolution = 64
    quantizable = True
    """NF4 / int8 (bitsandbytes) quantize the UNet's Linear layers only, 31% of its weights: NF4
    keeps 0.77 of its bf16 bytes, fp8 0.50 (`quantize.bnb_advice` says so at the start)."""
    swap_blocks = ()
    min_resolution = 256
    name_hints = ("v1-5", "sd15", "1.5")
    plan_arch = PlanArch(latent_channels=4, text_tokens=77, text_dim=768, pooled_dim=0, cfg_batch=2)

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> SD15Components:
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from lorakit.models.text_encoders import tiny_clip_tokenizer

        tokenizer = tiny_clip_tokenizer()
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CLIP,
        )
        text_encoder = CLIPTextModel(text_config)
        scheduler = PNDMScheduler(**SD15_SCHEDULER)
        comps = SD15Components(unet, vae, text_encoder, tokenizer, scheduler)
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
    ) -> SD15Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            text_encoder = CLIPTextModel.from_pretrained(
                name,
                subfolder="text_encoder",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
            unet = from_pretrained_streamed(
                UNet2DConditionModel,
                name,
                "unet",
                **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
            )
            scheduler = load_scheduler(name, common)
        except (OSError, ValueError) as e:
            hint = (
                " The folder or repo has only pickled weights (.bin/.ckpt): convert them to "
                "safetensors, or allow unpickling with --allow-pickle if you "
                "trust the source."
                if "safetensors" in str(e).lower() and not allow_pickle
                else ""
            )
            raise LorakitError(
                f"Could not load the SD1.5 model '{name}': {first_line(e)}.{hint} "
                "model.name must be a diffusers folder (with model_index.json, unet/, vae/, "
                "text_encoder/, tokenizer/, scheduler/) or a hub id you can reach."
            ) from None
        comps = SD15Components(unet, vae, text_encoder, tokenizer, scheduler)
        _freeze(comps)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        return {
            "unet": SD15_UNET,
            "vae": SD15_VAE,
            "text_encoder": CLIP_L_TEXT,
            "scheduler": {"_class_name": "PNDMScheduler", **SD15_SCHEDULER},
        }

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> SD15Components:
        """`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from lorakit.models import single_file as sf

        def part(cls, sub):  # converted by the names.py tables
            return sf.load_converted(
                cls, checkpoint, folder, sub, source, _names.FROM_SINGLE_FILE[sub]
            )

        comps = SD15Components(
            unet=part(UNet2DConditionModel, "unet"),
            vae=part(AutoencoderKL, "vae"),
            text_encoder=part(CLIPTextModel, "text_encoder"),
            tokenizer=sf.load_tokenizer(folder, "tokenizer", SD15_HUB_ID, source),
            scheduler=sf.load_scheduler(
                folder, self.single_file_configs()["scheduler"], checkpoint
            ),
        )
        _freeze(comps)
        return comps

    def save(self, components: SD15Components, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {"unet": sd15_unet_modules, "text_encoder": clip_l_modules}[component]()

    def frozen_modules(self, components: SD15Components) -> dict[str, torch.nn.Module]:
        return {"vae": components.vae, "text_encoder": components.text_encoder}

    def load_configured(self, cfg: ModelConfig, kind: str) -> SD15Components:
        """`model.quantize` of the UNet is the only loading option (`load_quantizable`)."""
        return load_quantizable(self, cfg, kind)

    # -- the real model, for `lorakit plan` (meta device) --------------------------------------

    real_label = "SD1.5"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(SD15_UNET)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL

        return {
            "vae": AutoencoderKL.from_config(SD_VAE),
            "text_encoder": clip_from_config(CLIP_L_TEXT, False),
        }

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 4, h, w]`, steps `[B]` (500), `encoder_hidden_states` `[B, 77, 768]`."""
        a = self.plan_arch
        return meta_inputs(batch, h, w, dtype, a.latent_channels, a.text_tokens, a.text_dim)

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: SD15Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(
        self, components: SD15Components, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: SD15Components, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        tok = components.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        te = components.text_encoder
        hidden = te(ids.to(te.device))[0]
        return {"encoder_hidden_states": hidden}

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def noise_and_timesteps(
        self,
        components: SD15Components,
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
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]

    def loss(
        self,
        components: SD15Components,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        cond: dict[str, torch.Tensor],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        train: TrainConfig,
    ) -> torch.Tensor:
        return ddpm_loss(self.predict, components, denoiser, latents, cond, noise, timesteps, train)

    # -- sampling ------------------------------------------------------------------------------

    def pipeline(self, components: SD15Components, scheduler: str = "default") -> Any:
        import diffusers

        sched = preview_scheduler(components.scheduler, scheduler)
        pipe = diffusers.StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _freeze(c: SD15Components) -> None:
    # Modules built from configs start in train mode; frozen parts must not run dropout.
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
        m.eval()
