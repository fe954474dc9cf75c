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
import torch.nn.functional as F

from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.models.base import AdapterTarget

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


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


@cache
def clip_l_modules(layers: int = 12) -> frozenset[str]:
    """CLIP ViT-L/14 text encoder projections, with the `text_model.` level all formats use."""
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    leaves += ("mlp.fc1", "mlp.fc2")
    return frozenset(
        f"text_model.encoder.layers.{i}.{leaf}" for i in range(layers) for leaf in leaves
    )


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
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    attention_dropout=0.0,
    dropout=0.0,
)
# The real SD1.5 scheduler config (PNDM, scaled-linear betas, epsilon target).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

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
SD15_VAE = dict(
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    scaling_factor=0.18215,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
# OpenAI CLIP ViT-L/14 text tower. bos/eos/pad ids as in the SD repos: eos_token_id = 2 selects
# transformers' legacy pooling (argmax of the ids = the end token), which these models expect.
CLIP_L_TEXT = dict(
    architectures=["CLIPTextModel"],
    model_type="clip_text_model",
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="quick_gelu",
    hidden_size=768,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=3072,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    num_attention_heads=12,
    num_hidden_layers=12,
    pad_token_id=1,
    projection_dim=768,
    vocab_size=49408,
)

_SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


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

    def kohya_original_table(self) -> dict | None:
        """Kohya names ↔ diffusers modules for the `original` naming; None = identity."""
        return None

    def named_by(self, architecture: str, version: str) -> bool:
        """Whether a file's `modelspec.architecture` / `ss_base_model_version` name this family."""
        return architecture.startswith("stable-diffusion-v1") or version == "sd_v1"

    """`lorakit export` default: the format ComfyUI and A1111 load for this family."""
    default_targets = UNET_ATTENTION
    targets = (
        AdapterTarget("unet", "lora_unet_"),
        AdapterTarget("text_encoder", "lora_te_", canonical_prefix="text_model."),
    )
    tiny_resolution = 64

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> SD15Components:
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from lorakit.models.tiny_tokenizer import tiny_clip_tokenizer

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

    def load(self, name: str, *, revision: str, variant: str, allow_pickle: bool) -> SD15Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        common: dict[str, Any] = {"revision": revision or None}
        weights = dict(common, variant=variant or None, use_safetensors=not allow_pickle)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **weights)
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **weights)
            scheduler = _load_scheduler(name, common)
        except (OSError, ValueError) as e:
            hint = (
                " The folder or repo has only pickled weights (.bin/.ckpt): convert them to "
                "safetensors, or allow unpickling with --set model.allow_pickle=true if you "
                "trust the source."
                if "safetensors" in str(e).lower() and not allow_pickle
                else ""
            )
            raise LorakitError(
                f"Could not load the SD1.5 model '{name}': {_first_line(e)}.{hint} "
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

        comps = SD15Components(
            unet=sf.load_component(UNet2DConditionModel, checkpoint, folder, "unet", source),
            vae=sf.load_component(AutoencoderKL, checkpoint, folder, "vae", source),
            text_encoder=sf.load_component(
                CLIPTextModel, checkpoint, folder, "text_encoder", source
            ),
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


# --- shared by the UNet (DDPM-trained) families: sd15, sdxl -----------------------------------


def ddpm_noise_and_timesteps(
    components: Any, latents: torch.Tensor, generator: torch.Generator, train: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise `[B, C, H, W]` (+ noise offset `[B, C, 1, 1]`) and integer timesteps `[B]`, seeded."""
    b, ch = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if train.noise_offset:
        noise += train.noise_offset * torch.randn((b, ch, 1, 1), generator=generator)
    steps = components.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (b,), generator=generator)
    return noise, timesteps


def ddpm_loss(
    predict,
    components: Any,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    train: TrainConfig,
) -> torch.Tensor:
    """Epsilon / v-prediction MSE (from the scheduler config), optionally min-SNR-γ weighted.
    `predict(denoiser, noisy, timesteps, cond)` is the family's denoiser call."""
    sched = _training_scheduler(components)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise LorakitError(
            f"The model's scheduler has prediction_type '{kind}'; lorakit trains SD1.5/SDXL "
            "models with 'epsilon' or 'v_prediction' targets."
        )
    pred = predict(denoiser, noisy, timesteps, cond)
    if not train.min_snr_gamma:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, pred.dim()))
    )
    return (per_sample * min_snr_weights(sched, timesteps, train.min_snr_gamma, kind)).mean()


def preview_scheduler(scheduler, name: str):
    """The model's own scheduler (`default`) or a sampler built from its config."""
    if name == "default":
        return scheduler
    import diffusers

    return getattr(diffusers, _SAMPLERS[name]).from_config(scheduler.config)


def _freeze(c: SD15Components) -> None:
    # Modules built from configs start in train mode; frozen parts must not run dropout.
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
        m.eval()


def min_snr_weights(sched, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) for a DDPM schedule, per sample."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if kind == "v_prediction" else clipped / snr


def _training_scheduler(c: SD15Components):
    """DDPM noise schedule from the model's scheduler config (the sampler may differ)."""
    cached = getattr(c, "_ddpm", None)
    if cached is None:
        from diffusers import DDPMScheduler

        cached = DDPMScheduler.from_config(c.scheduler.config)
        c._ddpm = cached  # type: ignore[attr-defined]
    return cached


def _load_scheduler(name: str, common: dict[str, Any]):
    """The scheduler class the model names in its config (PNDM for SD1.5), DDPM otherwise."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(name, subfolder="scheduler", **common)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    return cls.from_config(config)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
