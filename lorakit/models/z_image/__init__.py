"""Z-Image family (`z-image`: Z-Image 6B S3-DiT, Turbo and base): a single-stream DiT trained with
rectified flow, Qwen3-4B text encoder, FLUX.1's 16-channel VAE.

Tensor conventions (each one what `ZImagePipeline` in diffusers 0.42 does when it samples; the
tests compare against the pipeline's own code):
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 16 (VAE /8, then 2×2 patches inside
  the transformer).
- latents `[B, 16, h, w]` (h = H/8) = `(vae.encode(pixels).latent_dist.mean - shift_factor) *
  scaling_factor` (FLUX.1's VAE: shift 0.1159, scale 0.3611; the pipeline decodes with
  `latents / scaling_factor + shift_factor`). Cached and noised as 4-D batches.
- the transformer takes LISTS: per sample a latent `[C, F, h, w]` (F = 1 frame for images: the
  pipeline's `latents.unsqueeze(2).unbind(0)`) and its caption features `[L_i, 2560]` of the
  sample's own length; it patchifies (2×2, frame patch 1), pads every sequence to a multiple of
  32 with learned pad tokens and builds the 3-axis RoPE ids itself (caption tokens at
  (1 + k, 0, 0), image patches at (L_i' + 1 + f, row, col), L_i' the padded caption length).
  `predict` accepts `[B, C, h, w]` (and `[B, C, F, h, w]`, kept for a frames axis) and returns
  the same shape.
- `cond = {"cap_feats": [B, L, 2560], "cap_mask": [B, L]}`: `ZImagePipeline.encode_prompt`'s
  per-prompt features (Qwen3 chat template with `enable_thinking=True`, tokenized to
  `max_sequence_length` = `model.t5_max_length` or 512, `hidden_states[-2]`, only the unmasked
  tokens kept) zero-padded to L = max_sequence_length so cached captions of any length stack;
  `cap_mask` is 1.0 on the caption's own tokens (a float mask, not a length: the loop casts
  `cond` to bf16, which cannot hold every integer above 256). `predict` unpads them into the
  per-sample list the transformer takes, so the padding never reaches the model.
- timesteps: sigmas σ `[B]` in (0, 1), σ = 1 pure noise. The pipeline's scheduler timestep is
  t = 1000·σ and the transformer gets `(1000 - t) / 1000` = 1 - σ (REVERSED: 1 = clean), which
  it scales by `t_scale` = 1000 inside. `predict` passes 1 - σ.
- target: the pipeline NEGATES the transformer's output before `FlowMatchEulerDiscreteScheduler
  .step` (x_next = x + (σ_next - σ)·v), so the transformer predicts -v = x0 - noise. `predict`
  returns the negated output (the velocity v the scheduler steps with), and the loss is that of
  the other flow families: noisy = (1 - σ)·x0 + σ·noise, target = noise - x0.
- shift: the scheduler's — Turbo `shift = 3.0`, `use_dynamic_shifting = false` (a static shift;
  the pipeline's `mu` is then ignored); a config with dynamic shifting uses FLUX's
  resolution-dependent μ from the image token count (h/2)·(w/2) (`calculate_shift`).
  `train.flow_shift` overrides it.
- guidance: no guidance embedding. Turbo (distilled) samples with `guidance_scale = 0` (no CFG);
  base with CFG as `pos + s·(pos - neg)` (so s = 0 is off, not 1). Training feeds none.
- LoRA goes into `transformer` only (diffusers prefix `transformer.`); see `Family.targets`.
  kohya files use the original names (`lora_unet_layers_0_attention_qkv`, fused q|k|v; names.py),
  which ComfyUI's generic `lora_unet_<weight>` map reads; the diffusers-format file (alpha
  folded into lora_B) loads in diffusers and ComfyUI (`transformer.<diffusers path>`).
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
from lorakit.models.loading import (
    dtype_kwargs,
    freeze,
    from_pretrained_streamed,
    hub_kwargs,
    load_error,
)
from lorakit.models.single_file import SplitPart
from lorakit.models.vae import FLOW_VAE, tiny_flow_vae
from lorakit.models.z_image import names as _names


@dataclass
class ZImageComponents:
    transformer: Any
    vae: Any
    text_encoder: Any
    """Qwen3 (`Qwen3Model`): its second-to-last hidden states are the caption features."""
    tokenizer: Any
    """`Qwen2Tokenizer` with Qwen3's chat template."""
    scheduler: Any
    max_sequence_length: int = 512
    """Caption tokens (template included) the pipeline tokenizes to (`max_sequence_length`)."""


# --- real configs -------------------------------------------------------------------------------

Z_IMAGE_TRANSFORMER = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
    cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)  # fmt: skip
"""Tongyi-MAI/Z-Image-Turbo (and Z-Image base) `transformer/config.json` (6.15 B params)."""

QWEN3_4B = dict(
    architectures=["Qwen3Model"], model_type="qwen3", vocab_size=151936, hidden_size=2560,
    intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False, attention_dropout=0.0,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)  # fmt: skip
"""Qwen/Qwen3-4B, Z-Image's `text_encoder` (as `Qwen3Model`, no LM head; 4.0 B params)."""

Z_IMAGE_VAE = dict(FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)
"""FLUX.1's VAE, Z-Image's `vae/config.json`."""

TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
"""Z-Image-Turbo `scheduler/scheduler_config.json` (static shift 3)."""

# --- tiny offline configs ------------------------------------------------------------------------
# Shape rules: dim = n_heads × sum(axes_dims); cap_feat_dim = the text encoder's hidden size.
# axes_lens[0] must exceed the caption positions (up to max_sequence_length + 32).

TINY_TEXT_DIM = 32
TINY_TRANSFORMER = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=32, n_layers=2,
    n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
    cap_feat_dim=TINY_TEXT_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
    axes_lens=[1536, 64, 64],
)  # fmt: skip


def tiny_qwen3_config(vocab_size: int, hidden: int = TINY_TEXT_DIM):
    """A 2-layer Qwen3 (GQA 4:2 heads, as the real model's 32:8) of width `hidden`."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=2048, rms_norm_eps=1e-6, attention_dropout=0.0,
        tie_word_embeddings=False,
    )  # fmt: skip


def tiny_z_image(seed: int = 0, **transformer: Any) -> ZImageComponents:
    """Tiny Z-Image-Turbo (static shift 3) with random weights; `transformer` overrides the tiny
    transformer config (the agreement test widens it)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    from lorakit.models.text_encoders import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    den = ZImageTransformer2DModel(**dict(TINY_TRANSFORMER, **transformer))
    # diffusers initialises the pad tokens to zeros; random ones make padding visible in tests
    with torch.no_grad():
        den.x_pad_token.normal_()
        den.cap_pad_token.normal_()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_flow_vae(0.1159, 0.3611))
    torch.manual_seed(seed + 2)
    te = Qwen3Model(tiny_qwen3_config(len(tok)))
    sched = FlowMatchEulerDiscreteScheduler(**TURBO_SCHEDULER)
    freeze(den, vae, te)
    return ZImageComponents(den, vae, te, tok, sched)


# --- fixed table of the real architecture ------------------------------------------------------


def z_image_modules(n_layers: int = 30, n_refiner: int = 2) -> frozenset[str]:
    """Every Linear of `ZImageTransformer2DModel` (diffusers names)."""
    return frozenset(
        p for entry in _names.transformer_table(n_layers, n_refiner).values() for p in entry.parts
    )


@cache
def z_image_transformer_modules() -> frozenset[str]:
    """Z-Image 6B: 30 main layers, 2 noise-refiner and 2 context-refiner blocks."""
    return z_image_modules(30, 2)


# --- conditioning --------------------------------------------------------------------------------


def pad_captions(feats: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Per-prompt features `[L_i, D]` → `{"cap_feats": [B, length, D], "cap_mask": [B, length]}`
    (zeros after each caption; mask 1.0 on its tokens)."""
    d = feats[0].shape[-1]
    out = feats[0].new_zeros(len(feats), length, d)
    mask = torch.zeros(len(feats), length, dtype=out.dtype, device=out.device)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
        mask[i, : len(f)] = 1.0
    return {"cap_feats": out, "cap_mask": mask}


def unpad_captions(cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `pad_captions`: the per-sample list `ZImageTransformer2DModel` takes. Meta
    tensors (`lorakit plan`) have no values: every token counts."""
    feats, mask = cond["cap_feats"], cond.get("cap_mask")
    if mask is None or feats.is_meta:
        return list(feats.unbind(0))
    return [f[m > 0.5] for f, m in zip(feats, mask.to(feats.device), strict=True)]


def _config(module: torch.nn.Module):
    # accelerate may wrap the denoiser (DDP); the diffusers config lives on the inner module.
    return getattr(getattr(module, "module", module), "config", None)


# --- single files: ComfyUI's split files -------------------------------------------------------

_TE_FILE_HINT = (
    "ComfyUI's models/text_encoders/qwen_3_4b.safetensors, or the text_encoder/ folder of "
    "Tongyi-MAI/Z-Image-Turbo"
)
_VAE_FILE_HINT = (
    "ComfyUI's models/vae/ae.safetensors, or the vae/ folder of Tongyi-MAI/Z-Image-Turbo"
)


def _looks_like(keys: list[str]) -> str:
    """What a file that is not a Z-Image transformer seems to be, for the error message."""
    if any(".self_attn.q_proj." in k for k in keys):
        return "a Qwen3 text encoder (the text_encoders/ file)"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.conv_in")) for k in keys):
        return "a VAE (the vae/ file)"
    if any(k.startswith(("lora_", "diffusion_model.", "transformer.")) for k in keys):
        return "a LoRA adapter"
    if any("adaLN_modulation.1." in k and ".layers." in f".{k}" for k in keys):
        return "a Lumina 2 transformer"
    return "not a Z-Image transformer"


QWEN3_MARKER = "model.layers.0.self_attn.q_norm.weight"
"""A Qwen3 text-encoder file (ComfyUI's `text_encoders/qwen_3_4b.safetensors`): `q_norm`, the
per-head query RMSNorm, is Qwen3's, not Qwen2's."""

PARTS = {
    "text_encoder": SplitPart(
        "text_encoder", _TE_FILE_HINT, ("model.safetensors", "model.safetensors.index.json"),
        markers=(QWEN3_MARKER,),
    ),
    "vae": SplitPart(
        "vae", _VAE_FILE_HINT, ("diffusion_pytorch_model.safetensors",),
        markers=("decoder.mid.block_1.conv1.weight", "encoder.conv_in.weight"),
        excluded=("bn.running_mean",),  # FLUX.2's VAE
    ),
    "tokenizer": SplitPart(
        "tokenizer",
        "the Qwen tokenizer files (the tokenizer/ folder of Tongyi-MAI/Z-Image-Turbo)",
    ),
}  # fmt: skip
"""What `from_single_file` takes from model.single_file_config (`single_file.SplitPart`)."""


def _qwen3_from_split(model, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen3 file (`model.layers.*`, maybe `lm_head.weight`) → `Qwen3Model` keys."""
    from lorakit.models.naming import read_under

    prefix = "model." if any(k.startswith("model.") for k in checkpoint) else ""
    return read_under(
        checkpoint,
        prefix,
        lambda part: {k: part[k] for k in list(part)},
        ignore=("lm_head.weight",),
    )


class ZImage:
    """Z-Image 6B (Turbo and base: the same architecture; the scheduler config tells the shift)."""

    name = "z-image"
    pipeline_class_names = ("ZImagePipeline",)
    base_model_version = "z_image"
    """kohya/musubi-tuner's `ss_base_model_version` for Z-Image LoRAs."""
    modelspec_architecture = "z-image/lora"
    denoiser_name = "transformer"
    default_export_format = "kohya"
    """`lorakit export` default: original names, what ComfyUI reads (ComfyUI is where Z-Image
    LoRAs are used; diffusers reads the diffusers-format file written next to it)."""
    kohya_names = "z-image"
    """kohya's `original` naming: the original NextDiT names (`layers_0_attention_qkv`, fused)."""
    kohya_split_prefix = "lycoris_"
    """Prefix of diffusers-named kohya and LyCORIS files: the one ComfyUI maps to Z-Image's
    diffusers names (`comfy/lora.py`, the Lumina2 branch, SimpleTuner's form; it maps no
    `lora_transformer_` here). `lora_unet_` + diffusers paths (musubi-tuner's form) is read
    through the legacy table."""
    diffusers_strength = "folded"
    loaders = {  # noqa: RUF012 - read-only; checked by tests/test_z_image.py with tests/loaders.py
        ("kohya",): "ComfyUI",
        ("diffusers",): "diffusers, ComfyUI",
        ("lycoris",): "ComfyUI",
    }
    targets = (AdapterTarget("transformer", "lora_unet_"),)
    """The transformer only. No text-encoder LoRA: Qwen3 is a 4 B decoder LLM whose features
    the transformer's own context refiner already adapts per caption, the community's Z-Image
    LoRAs (ai-toolkit, musubi-tuner, diffusers' dreambooth script) train the transformer alone,
    and ComfyUI's Z-Image LoRA loader maps no Qwen3 keys."""
    default_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3",
    )  # fmt: skip
    """Attention and SwiGLU MLP of every block: the main layers (image and caption tokens in one
    stream) and both refiners (image stream: noise_refiner; caption stream: context_refiner).
    The blocks' modulation Linears must be named by block (`layers.0.adaLN_modulation.0`, …):
    the bare suffix `adaLN_modulation.0` also names the final layer's SiLU."""
    swap_blocks = ("noise_refiner", "context_refiner", "layers")
    """The denoiser's `nn.ModuleList`s of repeated blocks in the order they run: 2 noise-refiner
    blocks (image tokens), 2 context-refiner blocks (caption tokens), then the 30 main layers
    (both streams joined). Block swap streams these."""
    tiny_resolution = 64
    pixel_multiple = 16
    """VAE factor 8 × 2×2 latent patches (the pipeline requires multiples of 16)."""
    text_length = 512
    """`ZImagePipeline`'s `max_sequence_length` default (template tokens included)."""
    quantizable = True
    min_resolution = 512
    name_hints = ("z-image", "z_image", "zimage")
    plan_arch = PlanArch(
        latent_channels=16, text_tokens=0, text_dim=2560, pooled_dim=0, cfg_batch=2
    )
    """Caption tokens = text_len; previews run CFG (2 denoiser samples per image) unless
    sample.guidance = 0 (Turbo), the larger case the planner budgets."""

    single_file_markers = _names.SINGLE_FILE_MARKERS

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        return {}

    def named_by(self, architecture: str, version: str) -> bool:
        return architecture.startswith("z-image") or version.startswith(("z_image", "z-image"))

    # -- building and loading ------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> ZImageComponents:
        return tiny_z_image(seed)

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        quantize: str = "none",
    ) -> ZImageComponents:
        import diffusers
        from transformers import Qwen2Tokenizer, Qwen3Model

        from lorakit.models.quantize import quantized_kwargs

        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            # the class itself, not AutoTokenizer: for a hub id transformers' AutoTokenizer
            # also asks for the repo's tokenizer/config.json, which offline (from the cache)
            # is an error; the released tokenizer_config.json names Qwen2Tokenizer
            tok = Qwen2Tokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            te = Qwen3Model.from_pretrained(
                name,
                subfolder="text_encoder",
                **weights,
                **dtype_kwargs("text_encoder", "transformers"),
            )
            vae = diffusers.AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
            transformer = from_pretrained_streamed(
                diffusers.ZImageTransformer2DModel,
                name,
                "transformer",
                **{**weights, **dtype_kwargs("denoiser"), **quantized_kwargs(quantize)},
            )
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            )
        except (OSError, ValueError) as e:
            raise load_error(
                "Z-Image", name, e, allow_pickle, "transformer/, vae/, text_encoder/, tokenizer/"
            ) from None
        freeze(transformer, vae, te)
        return ZImageComponents(transformer, vae, te, tok, sched)

    def load_configured(self, cfg: ModelConfig, kind: str) -> ZImageComponents:
        """Components with the `model.*` options applied (caption length, quantize)."""
        from lorakit.errors import ConfigError
        from lorakit.models.loading import load_quantizable

        if cfg.drop_t5:
            raise ConfigError(
                "model.drop_t5 = true applies to SD3 only: Z-Image's text conditioning IS the "
                "Qwen3 sequence. Set model.drop_t5 = false."
            )
        comps = load_quantizable(self, cfg, kind)
        comps.max_sequence_length = cfg.text_length(self.text_length)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """The real configs (transformer, FLUX.1 VAE, Qwen3-4B, Turbo scheduler): a split
        diffusion-model file loads with them; the Qwen3 and VAE weights and the tokenizer still
        come from model.single_file_config (see `from_single_file`)."""
        return {
            "transformer": dict(Z_IMAGE_TRANSFORMER, _class_name="ZImageTransformer2DModel"),
            "vae": Z_IMAGE_VAE,
            "text_encoder": QWEN3_4B,
            "scheduler": dict(TURBO_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"),
        }

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> ZImageComponents:
        """Transformer from the file: the original layout (ComfyUI's `diffusion_models/` file,
        with or without `model.diffusion_model.`; names.py) or diffusers' own names. VAE from
        `first_stage_model.`/`vae.` keys of the file when present, else from `folder/vae/`;
        Qwen3 from `folder/text_encoder/`; each of those a diffusers/transformers subfolder OR
        ComfyUI's split file alone in it (`ae.safetensors`, `qwen_3_4b.safetensors`, configs
        then built in). Tokenizer (`folder/tokenizer/`) and scheduler (`folder/scheduler/`, else
        Turbo's) from the folder."""
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        from lorakit.errors import LorakitError
        from lorakit.models import ldm_names
        from lorakit.models import single_file as sf
        from lorakit.models.naming import from_original

        keys = list(checkpoint)
        if not any(k.startswith(self.single_file_markers) for k in keys):
            raise LorakitError(
                f"'{source}' is {_looks_like(keys)}, not a Z-Image diffusion model (it has no "
                "layers.0.adaLN_modulation.0.weight). Pass the diffusion-model file as "
                "model.name (ComfyUI: models/diffusion_models/z_image_turbo_bf16.safetensors); "
                "the text encoder and VAE files go into model.single_file_config "
                "(text_encoder/, vae/)."
            )

        vae_in_file = sf.has_prefix(checkpoint, ldm_names.VAE_PREFIX) or sf.has_prefix(
            checkpoint, "vae."
        )
        parts = [p for p in PARTS.values() if not (vae_in_file and p.sub == "vae")]
        error = sf.missing_parts("Z-Image", source, folder, parts, "Tongyi-MAI/Z-Image-Turbo")
        if error is not None:
            raise error

        def read(model, ck):
            c = model.config
            return _names.read_transformer(ck, c.n_layers, c.n_refiner_layers)

        with sf.config_dir(folder, "transformer", self.single_file_configs()["transformer"]) as d:
            transformer = sf.load_converted(
                ZImageTransformer2DModel, checkpoint, d, "transformer", source, read
            )
        if vae_in_file:
            prefix = (
                ldm_names.VAE_PREFIX if sf.has_prefix(checkpoint, "first_stage_model.") else "vae."
            )
            convert = from_original(prefix, ldm_names.vae_from_ldm)
            with sf.config_dir(folder, "vae", Z_IMAGE_VAE) as d:
                vae = sf.load_converted(AutoencoderKL, checkpoint, d, "vae", source, convert)
        else:
            vae = self._folder_part(
                folder, source, PARTS["vae"], AutoencoderKL,
                from_original("", ldm_names.vae_from_ldm), Z_IMAGE_VAE,
            )  # fmt: skip
        te = self._folder_part(
            folder, source, PARTS["text_encoder"], Qwen3Model, _qwen3_from_split, QWEN3_4B
        )
        tok = sf.load_from_folder(AutoTokenizer, folder, "tokenizer", source, tokenizer=True)
        sched = sf.load_scheduler(
            folder, dict(TURBO_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"), {}
        )
        freeze(transformer, vae, te)
        return ZImageComponents(transformer, vae, te, tok, sched)

    @staticmethod
    def _folder_part(folder, source, part, cls, convert, builtin):
        """A component from model.single_file_config (present: `missing_parts`): its split file
        (`single_file.split_file`), or the library's own layout in `folder/part.sub`."""
        from lorakit.models import single_file as sf

        split = sf.split_file(folder, part)
        if split is not None:
            ck = sf.read_split(split)
            with sf.config_dir(folder, part.sub, builtin) as d:
                return sf.load_converted(cls, ck, d, part.sub, str(split), convert)
        return sf.load_from_folder(cls, folder, part.sub, source)

    def save(self, components: ZImageComponents, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {"transformer": z_image_transformer_modules}[component]()

    def frozen_modules(self, components: ZImageComponents) -> dict[str, torch.nn.Module]:
        return {"vae": components.vae, "text_encoder": components.text_encoder}

    # -- the real model, for `lorakit plan` (meta device) --------------------------------------

    real_label = "Z-Image (6B)"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """Qwen3-4B and the 16-channel VAE (`drop_t5` does not apply)."""
        from diffusers import AutoencoderKL
        from transformers import Qwen3Config, Qwen3Model

        conf = {k: v for k, v in QWEN3_4B.items() if k not in ("architectures", "model_type")}
        return {
            "vae": AutoencoderKL.from_config(Z_IMAGE_VAE),
            "text_encoder": Qwen3Model(Qwen3Config(**conf)),
        }

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 16, h, w]`, sigmas `[B]` (0.5), `cap_feats` `[B, text_len, 2560]` (every token
        counted: a caption filling max_sequence_length, the worst case) and `cap_mask`."""
        a = self.plan_arch
        lat, t, cond = flow.meta_inputs(
            batch, h, w, dtype, a.latent_channels, text_len, a.text_dim, 0
        )
        feats = cond["encoder_hidden_states"]
        return lat, t, {"cap_feats": feats, "cap_mask": torch.empty(feats.shape[:2], device="meta")}

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: ZImageComponents, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flow_latents(components.vae, pixels)

    @torch.no_grad()
    def encode_prompts(
        self, components: ZImageComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: ZImageComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"cap_feats": [B, L, D], "cap_mask": [B, L]}` from `ZImagePipeline.encode_prompt`
        (no CFG), padded to L = max_sequence_length (see the module docstring). Qwen3 carries
        no LoRA here, so the features are constant per caption."""
        pipe = self.pipeline(components)
        feats, _ = pipe.encode_prompt(
            prompt=list(prompts),  # encode_prompt rewrites its list in place (chat template)
            device=components.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=components.max_sequence_length,
        )
        return pad_captions(feats, components.max_sequence_length)

    # -- training ------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def shift_mu(self, components: ZImageComponents, latents: torch.Tensor, train: TrainConfig):
        """μ of the `shift` sampler: ln(train.flow_shift) when set; else the scheduler's static
        ln(shift), or its dynamic μ for (h/2)·(w/2) image tokens (`calculate_shift`)."""
        if train.flow_shift:
            return flow.shift_mu(train, 1.0)
        sc = components.scheduler.config
        if not sc.get("use_dynamic_shifting", False):
            return float(torch.tensor(float(sc.get("shift", 1.0))).log())
        h, w = latents.shape[-2:]
        return flow.flux_mu(
            (h // 2) * (w // 2),
            sc.get("base_image_seq_len", 256),
            sc.get("max_image_seq_len", 4096),
            sc.get("base_shift", 0.5),
            sc.get("max_shift", 1.15),
        )

    def noise_and_timesteps(
        self,
        components: ZImageComponents,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """noise `[B, 16, h, w]` and sigmas `[B]` in (0, 1) (fp32, CPU; σ = 1 is noise)."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        sigmas = flow.sample_sigmas(
            latents.shape[0],
            generator,
            train.timestep_sampling,
            train.logit_mean,
            train.logit_std,
            self.shift_mu(components, latents, train),
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
        """Velocity `[B, 16, h, w]` (or `[B, 16, F, h, w]`) for sigmas `[B]`: the transformer
        gets the per-sample lists and 1 - σ, and its output is negated (module docstring)."""
        frames = noisy.dim() == 5
        x = list((noisy if frames else noisy.unsqueeze(2)).unbind(0))
        # fp32 as the pipeline passes it ((1000 - t) / 1000 of the scheduler's fp32 timesteps):
        # in bf16, 1 - σ would keep 3 significant digits
        t = 1.0 - timesteps.to(noisy.device, torch.float32)
        out = denoiser(x, t, unpad_captions(cond), return_dict=False)[0]
        v = -torch.stack(out)
        return v if frames else v.squeeze(2)

    def loss(
        self,
        components: ZImageComponents,
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

    def pipeline(self, components: ZImageComponents, scheduler: str = "default") -> Any:
        from diffusers import ZImagePipeline

        check_flow_sampler(scheduler, "Z-Image")
        c = components
        pipe = ZImagePipeline(
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            transformer=c.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
