"""Qwen-Image names: the original checkpoint layout IS diffusers' (one table, the identity).

Qwen's own release, ComfyUI's split diffusion-model files (`qwen_image_*.safetensors`, in
`comfy/ldm/qwen_image/model.py` the module tree is `transformer_blocks.{i}.attn.to_q`,
`img_mlp.net.0.proj`, `img_mod.1`, … exactly as in `QwenImageTransformer2DModel`) and diffusers
all use the same module names, so "original" and "diffusers" names coincide:

- kohya LoRA names: `lora_unet_` + the module path with `_` (what musubi-tuner writes for
  Qwen-Image: `lora_unet_transformer_blocks_0_attn_to_q`); ComfyUI maps every
  `diffusion_model.<weight>` as `lora_unet_<weight with _>`, `diffusion_model.<path>`,
  `<path>`, `transformer.<path>` and `lycoris_<path with _>` (`comfy/lora.py`,
  `model_lora_keys_unet`, its QwenImage branch).
- full weights: a single file holds the transformer's state dict under its diffusers keys,
  bare or under `model.diffusion_model.` (the prefix ComfyUI-saved checkpoints add).

The table (`transformer_table`) is built from the FIXED module table of the real architecture
(`qwen_image_modules`), never from an installed model's `named_modules()`.
"""

from __future__ import annotations

from functools import cache

import torch

from lorakit.models.naming import Entry, detached, read_under

SINGLE_FILE_MARKERS = (
    "transformer_blocks.0.img_mod.",
    "model.diffusion_model.transformer_blocks.0.img_mod.",
)
"""Key prefixes only a Qwen-Image diffusion-model file has (with or without ComfyUI's prefix):
`img_mod` is the image stream's adaLN modulation, a name no other family's checkpoint uses."""

PREFIX = "model.diffusion_model."

_ATTN = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip
_MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_TOP = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)


def qwen_image_modules(num_layers: int = 60) -> frozenset[str]:
    """Every Linear of `QwenImageTransformer2DModel` with `num_layers` blocks (Qwen-Image: 60):
    per block the joint attention (image q/k/v/out, text add_q/k/v/to_add_out), both streams'
    MLPs (`img_mlp` / `txt_mlp`: `net.0.proj`, `net.2`) and adaLN modulations (`img_mod.1`,
    `txt_mod.1`); at the top the patch/text input projections, the timestep MLP, the final
    adaLN and the output projection."""
    names = set(_TOP)
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        names |= {f"{b}.attn.{p}" for p in _ATTN}
        names |= {f"{b}.{p}" for p in _MLP}
        names |= {f"{b}.img_mod.1", f"{b}.txt_mod.1"}
    return frozenset(names)


@cache
def transformer_table(num_layers: int = 60) -> dict:
    """(component, original path) → Entry: the identity over `qwen_image_modules`."""
    t = "transformer"
    return {(t, p): Entry(t, (p,)) for p in qwen_image_modules(num_layers)}


def kohya_table(family) -> dict:
    """The kohya/ComfyUI table: the transformer only (lorakit trains no Qwen2.5-VL LoRA)."""
    return dict(transformer_table())


OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.", "cond_stage_model.")
"""What an all-in-one file may hold besides the transformer (never read as its weights)."""


def is_prefixed(checkpoint: dict) -> bool:
    return any(k.startswith(PREFIX) for k in checkpoint)


def read_transformer(checkpoint: dict[str, torch.Tensor], expected: set[str]):
    """The transformer's state dict from a single file: its keys under `model.diffusion_model.`
    or bare (all but `OTHER_PARTS`), names unchanged. Every key of `expected` (the model's own
    state-dict keys) must be present and every key of the file read: ValueError naming the
    first few otherwise (another model's file, or a Qwen-Image variant with other modules)."""

    def convert(part):
        missing = sorted(k for k in expected if k not in part)
        if missing:
            more = " …" if len(missing) > 3 else ""
            raise ValueError(
                f"{len(missing)} transformer weights are missing ({', '.join(missing[:3])}{more})"
            )
        return {k: part[k] for k in expected}

    return read_under(
        checkpoint, PREFIX if is_prefixed(checkpoint) else "", convert, skip=OTHER_PARTS
    )


def to_single_file(components) -> dict[str, torch.Tensor]:
    """The transformer alone under its (diffusers = original) names, as ComfyUI's
    `diffusion_models/qwen_image_*.safetensors` ship it; the VAE and Qwen2.5-VL are separate
    files in ComfyUI's layout and come from a diffusers folder when loading."""
    return detached(components.transformer.state_dict())
