"""Qwen-Image family (`qwen-image`): a 20B MMDiT trained with rectified flow, Qwen2.5-VL text.

Every convention below is the one `QwenImagePipeline` (diffusers 0.42) samples with; tests
(tests/test_qwen_image.py) compare each against the pipeline's own code on the same inputs.

Tensor conventions:
- pixels `[B, 3, H, W]` float in [-1, 1]; H, W multiples of 16 (VAE /8, then 2×2 packing).
- VAE: `AutoencoderKLQwenImage`, a causal 3D VAE whose latents carry a frames axis
  `[B, 16, F, h, w]`; an image is one frame (F = 1). Latents here are `[B, 16, h, w]` (h = H/8,
  the frame axis dropped so buckets, caches and the loop stay 2-D) =
  `(vae.encode(pixels[:, :, None]).latent_dist.mean - latents_mean) / latents_std` with the
  VAE config's PER-CHANNEL `latents_mean` / `latents_std` (the pipeline decodes with
  `latents · std + mean`; diffusers' Qwen-Image LoRA script normalises the same way).
  `predict` also accepts `[B, 16, 1, h, w]`; a video/edit family would pass F > 1 frames and
  extend `img_shapes`, which is the only place the frame count enters.
- packing: `[B, C, h, w]` → `[B, (h/2)·(w/2), 4C]`, 2×2 patches, channel order (c, dy, dx)
  (`QwenImagePipeline._pack_latents`); `unpack_latents` is its exact inverse.
- position ids: none are passed. The transformer builds its 3-axis RoPE from
  `img_shapes = [[(1, h/2, w/2)]] * B` (frame, row, column; centred rows/columns,
  `scale_rope=True`: patch rows/columns at -n/2 … n/2 - 1); text token i takes position
  `max(h/4, w/4) + i` on all three axes, past every image position and independent of how
  many padded tokens follow it.
- text: `cond = {"encoder_hidden_states": [B, T, 3584], "encoder_hidden_states_mask": [B, T]}`
  from `QwenImagePipeline.encode_prompt` itself: the caption in Qwen-Image's chat template
  (system prompt "Describe the image by detailing …"), Qwen2.5-VL's LAST hidden state
  (`hidden_states[-1]`), the first 34 positions (the template's prefix) dropped, truncated to
  `max_sequence_length` (the pipeline's default 512; `model.t5_max_length` overrides it).
  Stacking: the pipeline pads a batch's captions to the longest with zero embeddings and a 0
  mask. Here every caption is padded to the FIXED length T = max_sequence_length, so cached
  captions of different lengths stack (`torch.stack`) in any combination, and `predict` cuts
  the columns no caption of the batch uses before calling the transformer — exactly the
  pipeline's pad-to-the-longest — and passes no mask when none is left (as the pipeline does
  when its mask is all ones). Padded tokens are masked out of the joint attention and text
  RoPE positions do not depend on the padded length, so padding never changes the output
  (tested).
- timesteps: sigmas σ `[B]` in (0, 1). The pipeline calls the transformer with `t / 1000` where
  its scheduler's t = 1000·σ, i.e. with σ itself (the timestep projection scales by 1000).
- shift: the scheduler config decides. Qwen-Image: `use_dynamic_shifting` with
  `calculate_shift` over the image token count (h/2)·(w/2) between (256 tokens, μ = 0.5) and
  (8192 tokens, μ = 0.9), exponential time shift σ' = e^μ / (e^μ + 1/σ - 1) — the `shift`
  sampler draws sigmoid(N(logit_mean, logit_std)) and shifts it by that μ (`train.flow_shift`
  overrides it with a constant). `shift_terminal` (0.02) only stretches the inference
  schedule's tail; training draws σ on the whole of (0, 1).
- objective: noisy = (1 - σ)·x0 + σ·noise, target = noise - x0 (velocity), optional σ loss
  weighting (`flow.weighted_mse`).
- guidance: no guidance embedding (`guidance_embeds` is false in every Qwen-Image release):
  nothing is fed. Sampling uses TRUE classifier-free guidance (`true_cfg_scale` with a negative
  prompt: two transformer calls per step, so `plan_arch.cfg_batch` = 2).
- LoRA: the transformer only (diffusers prefix `transformer.`, kohya `lora_unet_` + the
  module path — original names are diffusers names, names.py). Qwen2.5-VL gets no LoRA: it is a
  7B vision-language model whose LoRA no loader applies with an image LoRA (ComfyUI's
  Qwen-Image LoRAs and musubi-tuner / ai-toolkit / diffusers train the transformer alone), and
  training it would keep a 7B encoder on the device every step.
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
from lorakit.models import single_file as sf
from lorakit.models.base import AdapterTarget, PlanArch
from lorakit.models.flow import check_flow_sampler
from lorakit.models.loading import (
    freeze,
    from_pretrained_streamed,
    hub_kwargs,
    load_error,
    target_dtype,
)
from lorakit.models.qwen_image import names as _names
from lorakit.models.single_file import SplitPart


@dataclass
class QwenImageComponents:
    transformer: Any
    vae: Any
    """`AutoencoderKLQwenImage` (latents `[B, 16, F, h, w]`)."""
    text_encoder: Any
    """`Qwen2_5_VLForConditionalGeneration` (only its language model's last hidden state is
    used; the vision tower is never run for text-to-image)."""
    tokenizer: Any
    scheduler: Any
    max_sequence_length: int = 512
    """Text tokens kept after the template prefix (the pipeline's `max_sequence_length`)."""


PROMPT_PREFIX_TOKENS = 34
"""`QwenImagePipeline.prompt_template_encode_start_idx`: hidden states of the template's system
prompt dropped from every caption's embedding."""
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


# --- fixed table of the real architecture --------------------------------------------------------


@cache
def qwen_image_transformer_modules() -> frozenset[str]:
    """Qwen-Image: 60 double-stream blocks (names.qwen_image_modules)."""
    return _names.qwen_image_modules(60)


# --- packing ------------------------------------------------------------------------------------


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


def img_shapes(batch: int, h: int, w: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's RoPE grid per sample: one frame of (h/2) × (w/2) patches."""
    return [[(1, h // 2, w // 2)]] * batch


def trim_text(hidden: torch.Tensor, mask: torch.Tensor | None):
    """Cut the trailing columns no sample of the batch uses (`encoder_hidden_states` `[B, T, D]`,
    mask `[B, T]`, 1 = token); the mask becomes None when every remaining entry is a token —
    the pipeline's own layout for the same captions (padded to the longest, mask or None)."""
    if mask is None or mask.is_meta:
        return hidden, mask
    used = mask.bool().any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    hidden, mask = hidden[:, :length], mask[:, :length]
    return hidden, None if bool(mask.bool().all()) else mask


# --- configs --------------------------------------------------------------------------------------

QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""Qwen/Qwen-Image `transformer/config.json` (20.4 B params)."""
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
    time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
)  # fmt: skip
"""Qwen/Qwen-Image `scheduler/scheduler_config.json`."""
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)  # fmt: skip
"""Qwen/Qwen-Image `vae/config.json` (latents_mean / latents_std: diffusers' defaults, the
released values)."""
QWEN25_VL_7B = dict(
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
        rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu",
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
)  # fmt: skip
"""Qwen/Qwen-Image `text_encoder/config.json` (Qwen2.5-VL-7B-Instruct, 8.3 B params)."""

TINY_TEXT_DIM = 32
TINY_QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=TINY_TEXT_DIM, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)  # fmt: skip
"""Shape rules: in_channels = 4 × 16 latent channels (2×2 packing), sum(axes_dims_rope) =
attention_head_dim (each even), joint_attention_dim = the text encoder's hidden size."""
TINY_QWEN_IMAGE_VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)  # fmt: skip
"""Three 2× spatial downsamples (VAE factor 8, as the real one), the real latents_mean/std."""


def tiny_text_encoder_config(tokenizer):
    """A Qwen2.5-VL config at tiny width (2 layers × 32, M-RoPE sections summing to the head's
    half width 8) with a one-block vision tower, ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
            max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
            out_hidden_size=TINY_TEXT_DIM, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def tiny_qwen_image(seed: int = 0) -> QwenImageComponents:
    """Random-weight Qwen-Image with the real module structure, offline, in about a second."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lorakit.models.text_encoders import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_QWEN_IMAGE_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**TINY_QWEN_IMAGE_VAE)
    torch.manual_seed(seed + 2)
    te = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config(tok))
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    freeze(transformer, vae, te)
    return QwenImageComponents(transformer, vae, te, tok, sched)


def _image_vae(base: type) -> type:
    """`AutoencoderKLQwenImage` as the planner drives a VAE: `encode([B, 3, H, W])`,
    `decode([B, config.latent_channels, h, w])` — one frame added and removed around the causal
    3D VAE's `[B, C, F, H, W]` calls (same weights, same work). `lorakit plan` measures the
    VAE passes on these image-shaped tensors (see the report: a contract gap)."""

    class ImageVAE(base):
        def __init__(self, **config):
            super().__init__(**config)
            self.register_to_config(latent_channels=config.get("z_dim", 16))

        def encode(self, x, *args, **kwargs):
            return super().encode(x[:, :, None] if x.dim() == 4 else x, *args, **kwargs)

        def decode(self, z, *args, **kwargs):
            return super().decode(z[:, :, None] if z.dim() == 4 else z, *args, **kwargs)

    return ImageVAE


def load_transformer(
    checkpoint: dict[str, torch.Tensor], folder: str, source: str, where: str = ""
):
    """`QwenImageTransformer2DModel` with the config of `folder/transformer` and the file's
    weights (names.read_transformer), frozen, eval. The weights keep the file's dtype (bf16 for
    the released files; fp8 files are widened to bf16): a 20 B model in fp32 would need 82 GB of
    RAM before the loop casts it to the run's weight dtype anyway."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from lorakit.errors import LorakitError
    from lorakit.models.loading import first_line

    try:
        config = QwenImageTransformer2DModel.load_config(
            folder, subfolder="transformer", local_files_only=True
        )
        with init_empty_weights():
            model = QwenImageTransformer2DModel.from_config(config)
        state = _names.read_transformer(checkpoint, set(model.state_dict()))
        wide = (torch.float32, torch.bfloat16, torch.float16)
        target = target_dtype("denoiser")  # inside `loading.load_in`: the run's dtype
        state = {
            k: v.to(target) if target else v if v.dtype in wide else v.to(torch.bfloat16)
            for k, v in state.items()
        }
        model.load_state_dict(state, strict=True, assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(
            f"Could not read the Qwen-Image transformer from the checkpoint '{source}': "
            f"{first_line(e)}. The file must be a Qwen-Image diffusion model (ComfyUI's "
            f"qwen_image_*.safetensors) matching {where or folder + '/transformer'}; set "
            "model.single_file_config to a local diffusers folder of the model it was made from."
        ) from None
    freeze(model)
    return model


def _config(module: torch.nn.Module):
    # accelerate may wrap the denoiser (DDP); the diffusers config lives on the inner module.
    return getattr(getattr(module, "module", module), "config", None)


def _edit_refusal(where: str, cls: str) -> str:
    return (
        f"{where} is a Qwen-Image-Edit model ({cls}): its transformer is conditioned on a "
        "reference image as well as the caption, and lorakit does not train edit models yet "
        "(they need control → target image pairs). Pass the text-to-image base instead: "
        "model.name = 'Qwen/Qwen-Image' (or a local diffusers folder of it, or ComfyUI's "
        "qwen_image_*.safetensors diffusion-model file with model.single_file_config)."
    )


EDIT_MARKER = "__index_timestep_zero__"
"""An empty tensor ComfyUI's Qwen-Image-Edit-2511 files carry (ComfyUI registers it as a buffer
when the model's reference method is `index_timestep_zero`; musubi-tuner reads it as "this is
the 2511 edit model")."""


def _edit_file(checkpoint: dict[str, torch.Tensor], source: str) -> str:
    """What marks a diffusion-model file as Qwen-Image-Edit, or "". The edit transformers have
    the base model's keys and shapes exactly, so only two things tell them apart: the 2511
    marker tensor, and the name every published edit file carries (`qwen_image_edit_*`,
    `Qwen-Image-Edit-2509…`)."""
    if any(k.rsplit(".", 1)[-1] == EDIT_MARKER or k == EDIT_MARKER for k in checkpoint):
        return f"its '{EDIT_MARKER}' marker, Qwen-Image-Edit-2511"
    name = Path(source).name.lower().replace("-", "_")
    if "image_edit" in name or re.search(r"(^|_)edit(_|\.|$)", name):
        return (
            "its file name; the edit models have the base model's weights' names and shapes, "
            "so a file of the text-to-image model named '…edit…' must be given under another "
            "name, e.g. a symbolic link"
        )
    return ""


def _stored_dtype(name: str, sub: str) -> torch.dtype:
    """The dtype of the first tensor in a local folder's `sub/*.safetensors` (fp32, bf16 or
    fp16); bf16 — Qwen-Image's published dtype — for a hub id or anything unreadable here."""
    from safetensors import safe_open

    from lorakit.models.fp8_files import WIDE_DTYPES

    files = sorted((Path(name).expanduser() / sub).glob("*.safetensors"))
    if not files:
        return torch.bfloat16
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            key = next(iter(f.keys()))
            return WIDE_DTYPES.get(f.get_slice(key).get_dtype(), torch.bfloat16)
    except Exception:  # a broken file: from_pretrained reports it
        return torch.bfloat16


def _pipeline_class(name: str, revision: str) -> str:
    """`_class_name` of the model_index.json of a local folder or (from the local cache only) a
    hub repo; '' when it cannot be read here."""
    path = Path(name).expanduser() / "model_index.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "model_index.json", revision=revision or None)
        except Exception:  # not a repo id, no cache: the load itself reports the problem
            return ""
        if not isinstance(cached, str):
            return ""
        path = Path(cached)
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


# --- single files: ComfyUI's split files -------------------------------------------------------

_TE_FILE_HINT = (
    "ComfyUI's models/text_encoders/qwen_2.5_vl_7b.safetensors (bf16), or the text_encoder/ "
    "folder of Qwen/Qwen-Image"
)
_VAE_FILE_HINT = (
    "ComfyUI's models/vae/qwen_image_vae.safetensors, or the vae/ folder of Qwen/Qwen-Image"
)
PARTS = {
    "text_encoder": SplitPart(
        "text_encoder", _TE_FILE_HINT,
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
        markers=(_names.TEXT_ENCODER_MARKER,),
    ),
    "vae": SplitPart(
        "vae", _VAE_FILE_HINT,
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        markers=(_names.VAE_MARKER,), excluded=(_names.WAN22_VAE_MARKER,),
    ),
    "tokenizer": SplitPart(
        "tokenizer", "the Qwen2 tokenizer files (the tokenizer/ folder of Qwen/Qwen-Image)"
    ),
}  # fmt: skip
"""What `from_single_file` takes from model.single_file_config, found and named by
`single_file` (`split_file`, `missing_parts`)."""


def _te_looks_like(keys: set[str]) -> str:
    if any(".self_attn.q_norm." in k for k in keys):
        return "a Qwen3 text encoder (ComfyUI's qwen_3_*.safetensors, for Z-Image / FLUX.2 klein)"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a VAE"
    if any("transformer_blocks." in k or "double_blocks." in k for k in keys):
        return "a diffusion model"
    return "no Qwen2.5-VL text encoder"


def _split_text_encoder(path: Path, folder: str):
    """`Qwen2_5_VLForConditionalGeneration` (fp32, frozen) from ComfyUI's Qwen2.5-VL-7B file
    (names.text_encoder_from_comfy), config from `folder/text_encoder/config.json` when present,
    else the real model's (`QWEN25_VL_7B`). Parts the file may lack: the LM head (never read
    for the conditioning: `encode_prompt` takes hidden states) is then tied to the embedding,
    and the vision tower (never run for text-to-image) is zeros. Everything the file has loads
    exactly; an unknown or missing language-model key fails."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lorakit.errors import LorakitError
    from lorakit.models.loading import first_line

    ck = sf.read_split(path)
    keys = set(ck)
    if any(k.startswith("model.language_model.") for k in keys):
        state = dict(ck)  # transformers 5's own names in a single file
    elif _names.TEXT_ENCODER_MARKER in keys:
        state = _names.text_encoder_from_comfy(ck)
    else:
        raise LorakitError(
            f"'{path}' is {_te_looks_like(keys)}, not Qwen-Image's Qwen2.5-VL-7B "
            f"text encoder (it has no {_names.TEXT_ENCODER_MARKER}). Put {_TE_FILE_HINT} there "
            "instead."
        )
    try:
        sub = Path(folder) / "text_encoder"
        if (sub / "config.json").is_file():
            config = Qwen2_5_VLConfig.from_pretrained(str(sub), local_files_only=True)
        else:
            config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
        embed = "model.language_model.embed_tokens.weight"
        tied = "lm_head.weight" not in state and embed in state
        if tied:
            config.tie_word_embeddings = True
        with init_empty_weights():
            te = Qwen2_5_VLForConditionalGeneration(config)
        expected = te.state_dict()
        visual = [k for k in expected if k.startswith("model.visual.")]
        if not any(k in state for k in visual):
            state.update({k: torch.zeros(expected[k].shape) for k in visual})
        dtype = target_dtype("text_encoder") or torch.float32  # see loading.load_in
        state = {k: v.to(dtype) for k, v in state.items()}
        if tied:
            state["lm_head.weight"] = state[embed]
        te.load_state_dict(state, strict=True, assign=True)
        te.tie_weights()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(
            f"Could not read the Qwen2.5-VL text encoder from '{path}': {first_line(e)}. lorakit "
            f"reads {_TE_FILE_HINT}; a text_encoder/config.json next to the file must describe "
            "the same model (remove it to use Qwen2.5-VL-7B's)."
        ) from None
    te.requires_grad_(False)
    te.eval()
    return te


def _vae_looks_like(keys: set[str]) -> str:
    if _names.WAN22_VAE_MARKER in keys:
        return "Wan 2.2's 48-channel VAE (wan2.2_vae.safetensors)"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.conv_in.")) for k in keys):
        return "a 2-D VAE of another family (FLUX's ae.safetensors or an SD/SDXL VAE)"
    if any(".self_attn." in k for k in keys):
        return "a text encoder"
    return "no Wan VAE"


def _split_vae(path: Path, folder: str):
    """`AutoencoderKLQwenImage` (fp32, frozen) from ComfyUI's `qwen_image_vae.safetensors`
    (Wan 2.1's original layout, names.vae_from_original; a file already in diffusers' names
    loads as it is), config from `folder/vae/config.json` when present, else Qwen-Image's."""
    from diffusers import AutoencoderKLQwenImage

    from lorakit.errors import LorakitError
    from lorakit.models import single_file as sf

    ck = sf.read_split(path)
    keys = set(ck)
    if _names.VAE_MARKER in keys and _names.WAN22_VAE_MARKER not in keys:

        def convert(model, checkpoint):
            return _names.vae_from_original(checkpoint, model.config.num_res_blocks)

    elif "decoder.mid_block.resnets.0.norm1.gamma" in keys:

        def convert(model, checkpoint):
            return dict(checkpoint)

    else:
        raise LorakitError(
            f"'{path}' is {_vae_looks_like(keys)}, not Qwen-Image's Wan-2.1-style VAE "
            f"(it has no {_names.VAE_MARKER}). Put {_VAE_FILE_HINT} there instead."
        )
    vae_config = dict(QWEN_IMAGE_VAE, _class_name="AutoencoderKLQwenImage")
    with sf.config_dir(folder, "vae", vae_config) as d:
        return sf.load_converted(AutoencoderKLQwenImage, ck, d, "vae", str(path), convert)


class QwenImage:
    """Qwen-Image (text-to-image; the edit variants are recognised and refused)."""

    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline", *EDIT_PIPELINES)
    """The edit pipelines are listed so a folder of one resolves here and `load` refuses it with
    what to pass instead (edit models are not trained yet)."""
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    denoiser_name = "transformer"
    swap_blocks: tuple[str, ...] = ("transformer_blocks",)
    """The denoiser's ModuleLists of repeated blocks, in the order they run: Qwen-Image has one,
    60 double-stream `QwenImageTransformerBlock`s (block swap streams these)."""
    default_export_format = "kohya"
    kohya_names = "diffusers"
    """Qwen-Image's original module names ARE diffusers' (names.py): kohya's `original` naming
    is `lora_unet_` + the diffusers path, as musubi-tuner writes it."""
    kohya_split_prefix = ""
    """No separate prefix: `lora_unet_<diffusers path>` already names the original module
    (ComfyUI's QwenImage map has no `lora_transformer_` entry)."""
    diffusers_strength = "folded"
    """alpha/rank folded into lora_B, so ComfyUI (which maps `transformer.<path>`) loads the
    diffusers-format file at the trained strength too."""
    loaders = {  # noqa: RUF012 - read-only; checked by tests/test_export_matrix.py
        ("kohya",): "ComfyUI",
        ("diffusers",): "diffusers, ComfyUI",
        ("lycoris",): "ComfyUI",
    }
    """Forge has no Qwen-Image support; ComfyUI maps `lora_unet_`, `diffusion_model.`,
    `transformer.` and `lycoris_` keys of its diffusers-named weights (comfy/lora.py)."""

    single_file_markers = _names.SINGLE_FILE_MARKERS

    targets = (AdapterTarget("transformer", "lora_unet_", label="Qwen-Image transformer"),)
    """The transformer only: no LoRA on Qwen2.5-VL (see the module docstring)."""
    default_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )  # fmt: skip
    """Attention (both streams' q/k/v and outputs) and both streams' MLPs of every block — the
    modules the community's Qwen-Image LoRAs carry (musubi-tuner, ai-toolkit, diffusers'
    script); add `img_mod.1` / `txt_mod.1` for the adaLN modulations. The LAST block's
    text-only outputs (`attn.add_q_proj`, `attn.to_add_out`, `txt_mlp.*` of block 59) never
    reach the image output — the transformer discards the text stream after it — so their
    LoRAs get no gradient and export as zero updates (as in every trainer's Qwen-Image LoRA)."""
    tiny_resolution = 64
    pixel_multiple = 16
    """VAE factor 8 × 2×2 latent patches."""
    text_length = 512
    """Default `max_sequence_length`: `QwenImagePipeline.__call__`'s (captions are shorter)."""
    quantizable = True
    min_resolution = 512
    name_hints = ("qwen-image", "qwen_image", "qwenimage")
    plan_arch = PlanArch(
        latent_channels=16, text_tokens=0, text_dim=3584, pooled_dim=0, cfg_batch=2
    )
    """Text tokens = `max_sequence_length` (the planner's worst case: a caption that long);
    true CFG runs the prompt and the negative per preview image."""

    # -- names ----------------------------------------------------------------------------------

    def kohya_original_table(self) -> dict | None:
        return _names.kohya_table(self)

    def to_single_file(self, components: Any) -> dict[str, torch.Tensor]:
        return _names.to_single_file(components)

    def variant_metadata(self, components: Any) -> dict[str, str]:
        return {}

    def named_by(self, architecture: str, version: str) -> bool:
        return architecture.startswith("qwen-image") or version.startswith("qwen_image")

    # -- building and loading -------------------------------------------------------------------

    def build_tiny(self, seed: int = 0) -> QwenImageComponents:
        return tiny_qwen_image(seed)

    def load(
        self,
        name: str,
        *,
        revision: str,
        variant: str,
        allow_pickle: bool,
        quantize: str = "none",
    ) -> QwenImageComponents:
        """From a diffusers folder or hub id. The transformer and Qwen2.5-VL load in the dtype
        their files store (`_stored_dtype`: bf16 for the hub release — fp32 would take 80 + 33 GB
        of RAM); the loop casts them to the run's weight dtype. Edit models are refused before
        any weight is read."""
        import diffusers
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from lorakit.errors import LorakitError
        from lorakit.models.quantize import quantized_kwargs

        cls = _pipeline_class(name, revision)
        if cls in EDIT_PIPELINES:
            raise LorakitError(_edit_refusal(f"model.name '{name}'", cls))
        common, weights = hub_kwargs(revision, variant, allow_pickle)
        try:
            big = dict(
                weights, torch_dtype=target_dtype("denoiser") or _stored_dtype(name, "transformer")
            )
            tok = Qwen2Tokenizer.from_pretrained(name, subfolder="tokenizer", **common)
            te = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                name,
                subfolder="text_encoder",
                **dict(
                    weights,
                    dtype=target_dtype("text_encoder") or _stored_dtype(name, "text_encoder"),
                ),
            )
            vae = diffusers.AutoencoderKLQwenImage.from_pretrained(name, subfolder="vae", **weights)
            transformer = from_pretrained_streamed(
                diffusers.QwenImageTransformer2DModel,
                name,
                "transformer",
                **dict(big, **quantized_kwargs(quantize)),
            )
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                name, subfolder="scheduler", **common
            )
        except (OSError, ValueError) as e:
            raise load_error(
                "Qwen-Image", name, e, allow_pickle, "transformer/, vae/, text_encoder/, tokenizer/"
            ) from None
        freeze(transformer, vae, te)
        return QwenImageComponents(transformer, vae, te, tok, sched)

    def load_configured(self, cfg: ModelConfig, kind: str) -> QwenImageComponents:
        """Components with the `model.*` options applied (text length, quantize)."""
        from lorakit.errors import ConfigError
        from lorakit.models.loading import load_quantizable

        if cfg.drop_t5:
            raise ConfigError(
                "model.drop_t5 = true applies to SD3 only: Qwen-Image's text conditioning is "
                "Qwen2.5-VL's (there is no T5). Set model.drop_t5 = false."
            )
        comps = load_quantizable(self, cfg, kind)
        comps.max_sequence_length = cfg.text_length(self.text_length)
        return comps

    def single_file_configs(self) -> dict[str, dict[str, Any]]:
        """The real transformer config and scheduler; the VAE, Qwen2.5-VL and tokenizer come
        from model.single_file_config (see `from_single_file`: ComfyUI's split files or
        diffusers subfolders; the split files load with the real VAE / Qwen2.5-VL-7B configs
        built in here)."""
        return {
            "transformer": dict(QWEN_IMAGE_TRANSFORMER, _class_name="QwenImageTransformer2DModel"),
            "scheduler": dict(QWEN_IMAGE_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"),
        }

    def from_single_file(
        self, checkpoint: dict[str, torch.Tensor], folder: str, source: str
    ) -> QwenImageComponents:
        """The transformer from a diffusion-model file (ComfyUI's `qwen_image_*.safetensors`, or
        diffusers' `diffusion_pytorch_model.safetensors`: diffusers key names, bare or under
        `model.diffusion_model.`; `load_transformer`) with the config of `folder/transformer`
        (else the real one). From `folder` (model.single_file_config): `text_encoder/` and
        `vae/` each either the library layout or ComfyUI's split file alone in it
        (`qwen_2.5_vl_7b.safetensors`: `_split_text_encoder`; `qwen_image_vae.safetensors`, Wan
        2.1's original layout: `_split_vae`; configs from a config.json beside the file, else
        the real ones), `tokenizer/` from the diffusers repo, the scheduler from `scheduler/`
        or the built-in one. One paragraph naming every missing part (before the transformer is
        read) and each wrong file."""
        from diffusers import AutoencoderKLQwenImage
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from lorakit.errors import LorakitError
        from lorakit.models import single_file as sf

        edit = _edit_file(checkpoint, source)
        if edit:
            raise LorakitError(_edit_refusal(f"model.name '{source}'", edit))
        error = sf.missing_parts(
            "Qwen-Image", source, folder, list(PARTS.values()), "Qwen/Qwen-Image"
        )
        if error is not None:
            raise error
        if (Path(folder) / "model_index.json").is_file():
            cls = _pipeline_class(folder, "")
            if cls in EDIT_PIPELINES:
                raise LorakitError(_edit_refusal(f"model.single_file_config '{folder}'", cls))
        transformer_config = self.single_file_configs()["transformer"]
        sub = Path(folder) / "transformer"
        where = str(sub) if (sub / "config.json").is_file() else "Qwen-Image's transformer config"
        with sf.config_dir(folder, "transformer", transformer_config) as d:
            transformer = load_transformer(checkpoint, d, source, where)
        split = sf.split_file(folder, PARTS["text_encoder"])
        if split is not None:
            te = _split_text_encoder(split, folder)
        else:
            te = sf.load_from_folder(
                Qwen2_5_VLForConditionalGeneration, folder, "text_encoder", source
            )
        tok = sf.load_from_folder(Qwen2Tokenizer, folder, "tokenizer", source, tokenizer=True)
        split = sf.split_file(folder, PARTS["vae"])
        if split is not None:
            vae = _split_vae(split, folder)
        else:
            vae = sf.load_from_folder(AutoencoderKLQwenImage, folder, "vae", source)
        sched = sf.load_scheduler(
            folder, dict(QWEN_IMAGE_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler"), {}
        )
        freeze(transformer, vae, te)
        return QwenImageComponents(transformer, vae, te, tok, sched)

    def save(self, components: QwenImageComponents, folder: str) -> None:
        self.pipeline(components).save_pretrained(folder, safe_serialization=True)

    def known_modules(self, component: str) -> frozenset[str]:
        return {"transformer": qwen_image_transformer_modules}[component]()

    def frozen_modules(self, components: QwenImageComponents) -> dict[str, torch.nn.Module]:
        return {"vae": components.vae, "text_encoder": components.text_encoder}

    # -- the real model, for `lorakit plan` (meta device) ----------------------------------------

    real_label = "Qwen-Image (20B)"

    def real_model(self, model_name: str):
        return self  # one published width

    def build_real_denoiser(self) -> torch.nn.Module:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER)

    def build_real_frozen(self, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
        """Qwen2.5-VL-7B (language model and vision tower, as loaded) and the VAE; `drop_t5`
        does not apply (no T5)."""
        from diffusers import AutoencoderKLQwenImage
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))
        return {"vae": _image_vae(AutoencoderKLQwenImage)(**QWEN_IMAGE_VAE), "text_encoder": te}

    def planner_inputs(self, batch: int, h: int, w: int, dtype: torch.dtype, text_len: int):
        """`[B, 16, h, w]`, sigmas `[B]` (0.5), `encoder_hidden_states` `[B, text_len, 3584]`
        and no mask (every position a token: the longest caption the run allows)."""
        meta = dict(device="meta", dtype=dtype)
        a = self.plan_arch
        lat = torch.empty(batch, a.latent_channels, h, w, **meta)
        cond = {"encoder_hidden_states": torch.empty(batch, text_len, a.text_dim, **meta)}
        return lat, torch.full((batch,), 0.5, device="meta"), cond

    # -- encoding -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: QwenImageComponents, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` → `[B, 16, H/8, W/8]`: the one-frame latent's mean, normalised per
        channel by the VAE config's latents_mean / latents_std."""
        vae = components.vae
        x = pixels.to(vae.device, vae.dtype)[:, :, None]
        mean = vae.encode(x).latent_dist.mean[:, :, 0]
        shape = (1, vae.config.z_dim, 1, 1)
        mu = torch.tensor(vae.config.latents_mean, device=mean.device, dtype=mean.dtype)
        std = torch.tensor(vae.config.latents_std, device=mean.device, dtype=mean.dtype)
        return (mean - mu.view(shape)) / std.view(shape)

    @torch.no_grad()
    def encode_prompts(
        self, components: QwenImageComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return self.encode_prompts_train(components, prompts)

    def encode_prompts_train(
        self, components: QwenImageComponents, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": [B, T, D], "encoder_hidden_states_mask": [B, T]}` (D = 3584
        real, T = max_sequence_length): `QwenImagePipeline.encode_prompt`'s embeddings and mask
        (1 = token), padded with zeros / 0 to T (see the module docstring)."""
        pipe = self.pipeline(components)
        embeds, mask = pipe.encode_prompt(
            prompt=list(prompts),
            device=components.text_encoder.device,
            max_sequence_length=components.max_sequence_length,
        )
        b, length, _ = embeds.shape
        if mask is None:
            mask = torch.ones(b, length, device=embeds.device)
        pad = components.max_sequence_length - length
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask.to(embeds.dtype), (0, pad))
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    # -- training -------------------------------------------------------------------------------

    def image_conditioning(self, components, original_size, crop_top_left, target_size):
        return {}

    def noise_and_timesteps(
        self,
        components: QwenImageComponents,
        latents: torch.Tensor,
        generator: torch.Generator,
        train: TrainConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """noise `[B, 16, h, w]` and sigmas `[B]` in (0, 1) (fp32, CPU); the `shift` sampler's μ
        is `shift_mu` of the scheduler config for this latent size."""
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        h, w = latents.shape[-2:]
        mu = (
            flow.shift_mu(train, 1.0)
            if train.flow_shift
            else shift_mu(components.scheduler.config, (h // 2) * (w // 2))
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
        """Velocity prediction `[B, 16, h, w]` (packed in, unpacked out; `[B, 16, 1, h, w]` is
        accepted and returned as such). Text columns no sample uses are cut (`trim_text`)."""
        frames = noisy.dim() == 5
        if frames:
            noisy = noisy[:, :, 0]
        b, _, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        hidden, mask = trim_text(
            cond["encoder_hidden_states"], cond.get("encoder_hidden_states_mask")
        )
        out = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(device, torch.float32).to(dtype),
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask,
            img_shapes=img_shapes(b, h, w),
            return_dict=False,
        )[0]
        out = unpack_latents(out, h, w)
        return out[:, :, None] if frames else out

    def loss(
        self,
        components: QwenImageComponents,
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

    # -- sampling -------------------------------------------------------------------------------

    def pipeline(self, components: QwenImageComponents, scheduler: str = "default") -> Any:
        from diffusers import QwenImagePipeline

        check_flow_sampler(scheduler, "Qwen-Image")
        c = components
        pipe = QwenImagePipeline(
            scheduler=c.scheduler,
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            transformer=c.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def shift_mu(config, image_tokens: int) -> float:
    """μ of the exponential time shift the scheduler `config` applies for `image_tokens`
    (h/2)·(w/2): `calculate_shift` (linear in the token count) with dynamic shifting, else
    ln(shift). A `linear` time_shift_type (σ' = μ / (μ + 1/σ - 1)) is the exponential one at
    ln μ."""
    if config.get("use_dynamic_shifting", False):
        mu = flow.flux_mu(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    else:
        return float(torch.tensor(float(config.get("shift", 1.0))).log())
    if config.get("time_shift_type", "exponential") == "linear":
        return float(torch.tensor(mu).log())
    return mu
