"""FLUX.1 family (`flux`, dev and schnell): MM-DiT transformer trained with rectified flow.

Tensor conventions:
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 16 (VAE /8, then 2×2 packing).
- latents `[B, 16, h, w]` (h = H/8) = `(vae.encode(pixels).latent_dist.mean - shift_factor) *
  scaling_factor` (FLUX: shift 0.1159, scale 0.3611). Cached and noised UNPACKED; packing
  happens inside `predict`.
- packing: `[B, C, h, w]` → `[B, (h/2)·(w/2), 4C]`, each token one 2×2 patch, channel order
  (c, dy, dx) — `pack_latents` / `unpack_latents` are exact inverses (diffusers' layout).
- position ids: image `[(h/2)·(w/2), 3]` = (0, row, col); text `[T, 3]` zeros.
- `cond = {"encoder_hidden_states": [B, T, 4096], "pooled_projections": [B, 768]}` as
  `FluxPipeline.encode_prompt` builds them: T5 last hidden state (T = `model.t5_max_length`,
  default 512) and the CLIP-L pooled output.
- guidance: FLUX.1-dev has a guidance embedding (`transformer.config.guidance_embeds`); training
  feeds `train.guidance` (default 1.0) for every sample. schnell has none: nothing is fed.
- timesteps: sigmas σ `[B]` in (0, 1); the transformer takes σ itself (it scales ×1000 inside).
  `shift` sampling uses FLUX's resolution-dependent μ from the image token count (h/2)·(w/2).
- noisy = (1 - σ) · x0 + σ · noise, target = noise - x0, optional σ loss weighting.
- LoRA goes into `transformer` (diffusers prefix `transformer.`); optionally CLIP-L
  (`text_encoder.`). T5 (`text_encoder_2.`, kohya `lora_te3_`) is never trained here, but
  kohya sd-scripts files trained with `train_t5xxl` carry T5 LoRA keys: they are read, applied
  to the T5 encoder and re-exported (`models/text_encoders.py`). kohya files use the original
  BFL names (`lora_unet_double_blocks_…`, fused qkv; names.py), or with naming `diffusers`
  `lora_transformer_` + diffusers paths; CLIP-L is `lora_te1_`. diffusers, ComfyUI and Forge
  also load the diffusers-format file (alpha/rank folded into lora_B).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from lorakit.config import ModelConfig, TrainConfig
from lorakit.models import flow
from lorakit.models.base import AdapterTarget, PlanArch
from lorakit.models.flow import check_flow_sampler, encode_flow_latents
from lorakit.models.flux import names as _names
from lorakit.models.loading import (
    dtype_kwargs,
    freeze,
    from_pretrained_streamed,
    hub_kwargs,
    load_error,
    target_dtype,
)
from lorakit.models.text_encoders import (
    CLIP_L_TEXT,
    T5_XXL,
    clip_from_config,
    clip_l_modules,
    t5_from_config,
    t5_xxl_modules,
    tiny_clip,
    tiny_t5_config,
)
from lorakit.models.vae import FLOW_VAE, tiny_flow_vae


@dataclass
class FluxComponents:
    transformer: Any
    vae: Any
    text_encoder: Any
    """CLIP-L (`CLIPTextModel`); only its pooled output is used."""
    tokenizer: Any
    text_encoder_2: Any
    """T5-XXL encoder."""
    tokenizer_2: Any
    scheduler: Any
    t5_max_length: int = 512


# --- fixed table of the real FLUX.1 architecture -----------------------------------------------

_DOUBLE_ATTN = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip


def flux_modules(num_layers: int = 19, num_single_layers: int = 38) -> set[str]:
    """Linear modules of `FluxTransformer2DModel` (union of dev and schnell: the guidance
    embedder exists only in dev)."""
    names = {"x_embedder", "context_embedder", "norm_out.linear", "proj_out"}
    for emb in ("timestep_embedder", "text_embedder", "guidance_embedder"):
        names |= {f"time_text_embed.{emb}.linear_1", f"time_text_embed.{emb}.linear_2"}
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        names |= {f"{b}.norm1.linear", f"{b}.norm1_context.linear"}
        names |= {f"{b}.attn.{p}" for p in _DOUBLE_ATTN}
        names |= {f"{b}.{ff}.{p}" for ff in ("ff", "ff_context") for p in ("net.0.proj", "net.2")}
    for i in range(num_single_layers):
        b = f"single_transformer_blocks.{i}"
        names |= {f"{b}.norm.linear", f"{b}.proj_mlp", f"{b}.proj_out"}
        names |= {f"{b}.attn.{p}" for p in ("to_q", "to_k", "to_v")}
    return names


@cache
def flux_transformer_modules() -> frozenset[str]:
    """FLUX.1 dev/schnell: 19 double-stream and 38 single-stream blocks."""
    return frozenset(flux_modules(19, 38))


# --- packing and ids -----------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, (h/2)(w/2), 4C]` (2×2 patches, channel order c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latent height h and width w."""
    b, _, d = packed.shape
    c = d // 4
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[(h/2)(w/2), 3]` rows (0, row, col) for a latent of size h × w."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[T, 3]` zeros: text tokens share position 0 on all rope axes."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


# --- tiny offline configs ----------------------------------------------------------------------
# Shape rules: in_channels = 4 × VAE latent channels (2×2 packing), sum(axes_dims_rope) =
# attention_head_dim, joint_attention_dim = T5 d_model, pooled_projection_dim = CLIP-L hidden.

TINY_FLUX_T5_DIM = 32
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TINY_FLUX_T5_DIM,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# --- the real FLUX.1-dev transformer, for `lorakit plan` (meta device) -------------------------

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""black-forest-labs/FLUX.1-dev `transformer/config.json` (11.9 B params)."""


def tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxComponents:
    """Tiny FLUX.1-dev (guidance embedding) or, with `guidance_embeds=False`, schnell."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5EncoderModel

    from lorakit.models.text_encoders import tiny_clip_tokenizer, tiny_t5_tokenizer

    tok, tok_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        **dict(TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_flow_vae(0.1159, 0.3611))
    te = tiny_clip(tok, with_projection=False, seed=seed + 2)
    torch.manual_seed(seed + 3)
    te_2 = T5EncoderModel(tiny_t5_config(len(tok_2), TINY_FLUX_T5_DIM))
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    freeze(transformer, vae, te, te_2)
    return FluxComponents(transformer, vae, te, tok, te_2, tok_2, sched)


def load_bfl_transformer(checkpoint: dict[str, torch.Tensor], folder: str, source: str):
    """FluxTransformer2DModel with the config of `folder/transformer` and the file's weights
    (fp32, or the run's dtype inside `loading.load_in`; frozen, eval). Clear errors when the file
    and the config disagree."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lorakit.errors import LorakitError
    from lorakit.models.single_file import _first_line, own_storage

    try:
        config = FluxTransformer2DModel.load_config(
            folder, subfolder="transformer", local_files_only=True
        )
        with init_empty_weights():  # no random 12B init to overwrite
            model = FluxTransformer2DModel.from_config(config)
        inner = model.config.num_attention_heads * model.config.attention_head_dim
        state = _names.read_transformer(
            checkpoint, model.config.num_layers, model.config.num_single_layers, inner
        )
        dtype = target_dtype("denoiser") or torch.float32
        state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        model.load_state_dict(own_storage(state), strict=True, assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(
            f"Could not read the FLUX transformer from the checkpoint '{source}': "
            f"{_first_line(e)}. The file and {folder}/transformer must describe the same "
            "architecture (FLUX.1 dev or schnell); set model.single_file_config to a local "
            "diffusers folder of the model the file was made from."
        ) from None
    freeze(model)
    return model


def _config(module: torch.nn.Module):
    # accelerate may wrap the denoiser (DDP); the diffusers config lives on the inner module.
    return getattr(getattr(module, "module", module), "config", None)


class Flux:
    """FLUX.1 [dev] / [schnell] (guidance embedding detected from the transformer config)."""

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"
    """For dev; a schnell run is labelled `flux-1-schnell/lora` (see `modelspec_for`)."""
    denoiser_name = "transformer"
    default_export_format = "kohya"
    kohya_names = "bfl"
    """kohya's `original` naming: BFL's (`double_blocks_{i}_img_attn_qkv`, fused)."""
    kohya_split_prefix = "lora_transformer_"
    """OneTrainer's prefix for diffusers names, which ComfyUI (`flux_to_diffusers`) and Forge map;
    `lora_unet_` means an ORIGINAL name to every loader."""
    diffusers_strength = "folded"
    loaders = {  # noqa: RUF012 - read-only; checked by tests/test_export_matrix.py
        ("kohya",): "ComfyUI, Forge",
        ("diffusers",): "diffusers, ComfyUI, Forge",
        ("lycoris",): "ComfyUI, Forge",
    }

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        """FLUX.1 dev / schnell (`modelspec_for`)."""
        return {"modelspec.architecture": self.modelspec_for(components)}

    def named_by(self, architecture: str, version: str) -> bool:
        return architecture.startswith("flux-1") or version.startswith("flux")

    """`lorakit export` default: the format ComfyUI and A1111 load for this family."""
    targets = (
        AdapterTarget("transformer", "lora_unet_"),
        AdapterTarget("text_encoder", "lora_te1_", canonical_prefix="text_model."),
        # kohya sd-scripts' `train_t5xxl` / ComfyUI name T5 `lora_te3_` (te2 is unused in FLUX)
        AdapterTarget("text_encoder_2", "lora_te3_", label="T5-XXL", trained=False),
    )
    default_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )  # fmt: skip
    """Attention projections of the double blocks and q/k/v of the single blocks; add
    `proj_mlp` and `proj_out` to lora.target_modules for the single blocks' MLP/output too."""
    tiny_resolution = 64
    pixel_multiple = 16
    text_length = 512
    """Bucket sides are multiples of this: VAE factor 8 × 2×2 latent patches."""
    quantizable = True
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")
    min_resolution = 512
    name_hints = ("flux",)
    plan_arch = PlanArch(
        latent_channels=16, text_tokens=0, text_dim=4096, pooled_dim=768, cfg_batch=1
    )
    """Text tokens = the T5 length; FLUX-dev samples with guidance distillation (no CFG)."""

    @staticmethod
    def modelspec_for(components: FluxComponents) -> str:
        dev = bool(getattr(components.transformer.config, "guidance_embeds", True))
        return "flux-1-dev/lora" if dev else "flux-1-schnell/lora"

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> FluxComponents:
        return tiny_flux(seed)

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        quantize: str = "none",
    ) -> FluxComponents:
        import diffusers
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            tok = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            tok_2 = T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2", **common)
            te = CLIPTextModel.from_pretrained(
                name,
                subfolder="text_encoder",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            te_2 = T5EncoderModel.from_pretrained(
                name, subfolder="text_encoder_2", **weights, **dtype_kwargs("t5", "transformers")
            )
            vae = diffusers.AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
            transformer = from_pretrained_streamed(
                diffusers.FluxTransformer2DModel,
                name,
                "transformer",
                **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
            )
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            )
        except (OSError, ValueError) as e:
            raise load_error(
                "FLUX", name, e, allow_pickle, "transformer/, vae/, text_encoder(_2)/, tokenizers"
            ) from None
        freeze(transformer, vae, te, te_2)
        return FluxComponents(transformer, vae, te, tok, te_2, tok_2, sched)

    def load_configured(self, cfg: ModelConfig, kind: str) -> FluxComponents:
        """Components with the `model.*` options applied (T5 length, quantize)."""
        from lorakit.errors import ConfigError
        from lorakit.models.loading import load_quantizable

        if cfg.drop_t5:
            raise ConfigError(
                "model.drop_t5 = true applies to SD3 only: FLUX's text conditioning IS the T5 "
                "sequence. Set model.drop_t5 = false."
            )
        comps = load_quantizable(self, cfg, kind)
        comps.t5_max_length = cfg.text_length(self.text_length)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """None built in: FLUX files hold the transformer only (see `from_single_file`)."""
        return {}

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> FluxComponents:
        """Transformer from the BFL layout (`double_blocks.*`, `single_blocks.*`, optionally
        under `model.diffusion_model.`; `names.transformer_from_original`), VAE from
        `first_stage_model.*` or `vae.*` when present, else from `folder`; CLIP-L, T5, tokenizers
        and scheduler from `folder` (model.single_file_config)."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from lorakit.models import ldm_names
        from lorakit.models import single_file as sf
        from lorakit.models.naming import from_original

        def folder_part(cls, sub, **kw):
            return sf.load_from_folder(cls, folder, sub, source, **kw)

        te = folder_part(CLIPTextModel, "text_encoder")
        te_2 = folder_part(T5EncoderModel, "text_encoder_2")
        tok = folder_part(CLIPTokenizer, "tokenizer", tokenizer=True)
        tok_2 = folder_part(T5TokenizerFast, "tokenizer_2", tokenizer=True)
        transformer = load_bfl_transformer(checkpoint, folder, source)
        if sf.has_prefix(checkpoint, ldm_names.VAE_PREFIX):
            read_vae = from_original(ldm_names.VAE_PREFIX, ldm_names.vae_from_ldm)
            vae = sf.load_converted(AutoencoderKL, checkpoint, folder, "vae", source, read_vae)
        else:
            vae = folder_part(AutoencoderKL, "vae")
        sched = sf.load_scheduler(
            folder, dict(FLUX_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"), {}
        )
        freeze(transformer, vae, te, te_2)
        return FluxComponents(transformer, vae, te, tok, te_2, tok_2, sched)

    def save(self, components: FluxComponents, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {
            "transformer": flux_transformer_modules,
            "text_encoder": clip_l_modules,
            "text_encoder_2": t5_xxl_modules,
        }[component]()

    def frozen_modules(self, components: FluxComponents) -> dict[str, torch.nn.Module]:
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "text_encoder_2": components.text_encoder_2,
        }

    # -- the real model, for `lorakit plan` (meta device) --------------------------------------

    real_label = "FLUX.1-dev"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """CLIP-L, T5-XXL and the 16-channel VAE; `drop_t5` does not apply (FLUX's text
        conditioning is the T5 sequence)."""
        from diffusers import AutoencoderKL

        t5 = t5_from_config(T5_XXL)
        vae = AutoencoderKL.from_config(FLOW_VAE)
        return {
            "vae": vae,
            "text_encoder": clip_from_config(CLIP_L_TEXT, False),
            "text_encoder_2": t5,
        }

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 16, h, w]`, sigmas `[B]` (0.5), `encoder_hidden_states` `[B, text_len, 4096]`,
        `pooled_projections` `[B, 768]`."""
        a = self.plan_arch
        tokens = a.text_tokens + text_len
        return flow.meta_inputs(
            batch, h, w, dtype, a.latent_channels, tokens, a.text_dim, a.pooled_dim
        )

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: FluxComponents, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_latents(components.vae, pixels)

    @torch.no_grad()
    def encode_prompts(
        self, components: FluxComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: FluxComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": [B, T5 length, 4096], "pooled_projections": [B, 768]}`,
        with autograd: CLIP-L's LoRA gets gradients (its pooled output); T5 stays frozen."""
        pipe = self.pipeline(components)
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=components.text_encoder.device,
            max_sequence_length=components.t5_max_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def noise_and_timesteps(
        self,
        components: FluxComponents,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """noise `[B, 16, h, w]` and sigmas `[B]` in (0, 1) (fp32, CPU)."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        if train.flow_shift:
            mu = float(torch.tensor(train.flow_shift).log())
        else:
            sc = components.scheduler.config
            h, w = latents.shape[-2:]
            mu = flow.flux_mu(
                (h // 2) * (w // 2),
                sc.get("base_image_seq_len", 256),
                sc.get("max_image_seq_len", 4096),
                sc.get("base_shift", 0.5),
                sc.get("max_shift", 1.15),
            )
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
        """Velocity prediction `[B, 16, h, w]` (packed in, unpacked out). `cond["guidance"]`
        `[B]` is used when the transformer has a guidance embedding (default 1.0)."""
        b, _, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        hidden = cond["encoder_hidden_states"]
        guidance = None
        config = _config(denoiser)
        if config is not None and config.get("guidance_embeds", False):
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.ones(b)
            guidance = guidance.to(device, torch.float32)
        out = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(device, torch.float32).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=text_ids(hidden.shape[1], device, dtype),
            img_ids=image_ids(h, w, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def loss(
        self,
        components: FluxComponents,
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

    # -- sampling ------------------------------------------------------------------------------

    def pipeline(self, components: FluxComponents, scheduler: str = "default") -> Any:
        from diffusers import FluxPipeline

        check_flow_sampler(scheduler, "FLUX")
        c = components
        pipe = FluxPipeline(
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2,
            tokenizer_2=c.tokenizer_2,
            transformer=c.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
