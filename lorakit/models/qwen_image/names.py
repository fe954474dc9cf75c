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

ComfyUI's two other split files are NOT in diffusers/transformers names (read with
`text_encoder_from_comfy` and `vae_from_original`):

- `text_encoders/qwen_2.5_vl_7b.safetensors`: the module tree of ComfyUI's `Qwen25_7BVLI`
  (`comfy/text_encoders/llama.py`): `model.` = `Llama2_` (`embed_tokens`, `layers.{i}.self_attn.
  {q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`,
  `norm`) and `visual.` = `Qwen2VLVisionTransformer` (`comfy/text_encoders/qwen_vl.py`:
  `patch_embed.proj`, `blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.*}`, `merger.{ln_q,mlp.0,
  mlp.2}`), plus an optional `lm_head.weight` (ComfyUI loads non-strictly and has no LM head).
  transformers 5's `Qwen2_5_VLForConditionalGeneration` names the same tensors
  `model.language_model.*`, `model.visual.*`, `lm_head.weight`. ComfyUI recognises the file by
  `model.layers.0.self_attn.k_proj.bias` (`comfy/sd.py`, `detect_te_model`: Qwen2.5 has q/k/v
  biases, 512 wide for 7B; Qwen3 has none and has `q_norm`).
- `vae/qwen_image_vae.safetensors`: Wan 2.1's ORIGINAL VAE layout (`comfy/ldm/wan/vae.py`,
  `WanVAE`, which `comfy/sd.py` picks by `decoder.middle.0.residual.0.gamma`): flat
  `encoder.downsamples.{k}` / `decoder.upsamples.{k}` Sequentials, `ResidualBlock.residual` =
  [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d] + `shortcut`,
  `middle` = [residual, attention, residual], `head` = [RMS_norm, SiLU, CausalConv3d], and the
  top-level `conv1` / `conv2` (diffusers' `quant_conv` / `post_quant_conv`).
"""

from __future__ import annotations

from functools import cache

import torch

from lorakit.models.naming import Entry, detached, read_under

TEXT_ENCODER_MARKER = "model.layers.0.self_attn.k_proj.bias"
"""The key ComfyUI recognises a Qwen2.5 text-encoder file by (`comfy/sd.py`, detect_te_model)."""
VAE_MARKER = "decoder.middle.0.residual.0.gamma"
"""The key of Wan's original VAE layout (ComfyUI's and diffusers' `wan_vae` detection)."""
WAN22_VAE_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
"""Wan 2.2's 48-channel VAE (nested upsample blocks): not Qwen-Image's."""

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
    files (ComfyUI's layouts above, or diffusers subfolders) in model.single_file_config."""
    return detached(components.transformer.state_dict())


def text_encoder_from_comfy(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen2.5-VL file (module docstring) → transformers 5 names: `model.<x>` →
    `model.language_model.<x>`, `visual.<x>` → `model.visual.<x>`, `lm_head.weight` kept. A key
    under none of them: KeyError naming it (another model's file)."""
    out = {}
    for key, value in checkpoint.items():
        if key.startswith("model."):
            out["model.language_model." + key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            out["model.visual." + key.removeprefix("visual.")] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            raise KeyError(f"'{key}' is no Qwen2.5-VL weight")
    return out


_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_HEAD = {"0.gamma": "norm_out.gamma", "2.weight": "conv_out.weight", "2.bias": "conv_out.bias"}
_VAE_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}


def _vae_name(key: str, num_res_blocks: int) -> str:
    """One original Wan VAE key → `AutoencoderKLQwenImage`'s (KeyError for an unknown one)."""
    for old, new in _VAE_TOP.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(f"'{key}' is no Wan VAE weight")
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest.removeprefix('conv1.')}"
    if rest.startswith("head."):
        return f"{side}.{_HEAD[rest.removeprefix('head.')]}"
    part, index, leaf = rest.split(".", 2)
    if part == "middle":
        return f"{side}.{_MIDDLE[index]}.{_RESIDUAL.get(leaf, leaf)}"
    if part == "downsamples" and side == "encoder":
        # the encoder's flat Sequential keeps its indices in diffusers (`down_blocks`)
        return f"encoder.down_blocks.{index}.{_RESIDUAL.get(leaf, leaf)}"
    if part == "upsamples" and side == "decoder":
        # per level: num_res_blocks + 1 residual blocks, then one upsampler (not after the last)
        level, j = divmod(int(index), num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_RESIDUAL[leaf]}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{leaf}"
    raise KeyError(f"'{key}' is no Wan VAE weight")


def vae_from_original(
    checkpoint: dict[str, torch.Tensor], num_res_blocks: int
) -> dict[str, torch.Tensor]:
    """Wan 2.1's original VAE state dict (ComfyUI's `qwen_image_vae.safetensors`) →
    `AutoencoderKLQwenImage` names, for any `num_res_blocks` (diffusers'
    `convert_wan_vae_to_diffusers` hard-codes the released 2; tests check both agree on it)."""
    return {_vae_name(k, num_res_blocks): v for k, v in checkpoint.items()}
