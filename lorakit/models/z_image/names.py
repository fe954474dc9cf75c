"""Z-Image names: diffusers ↔ the original (Tongyi-MAI / ComfyUI "NextDiT") layout.

The original checkpoint (what ComfyUI's split `diffusion_models/z_image_*.safetensors` holds,
optionally under `model.diffusion_model.`) differs from diffusers' `ZImageTransformer2DModel`
in a few names only, as diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` and
ComfyUI's `comfy/utils.py::z_image_to_diffusers` map them:
- `{layers,noise_refiner,context_refiner}.{i}.attention.qkv` = to_q | to_k | to_v stacked along
  the output dim (equal widths, no bias); `attention.out` = `attention.to_out.0`;
  `attention.q_norm` / `k_norm` = `attention.norm_q` / `norm_k` (RMSNorm weights);
- `x_embedder` = `all_x_embedder.2-1` and `final_layer.*` = `all_final_layer.2-1.*` (diffusers
  keys its embedder and final layer by "patch-frame patch" size; the released model has 2-1);
- everything else (`feed_forward.w1/w2/w3`, `adaLN_modulation.0`, the norms, `t_embedder.mlp.*`,
  `cap_embedder.*`, the pad tokens) is named alike. `final_layer.adaLN_modulation.1` is a plain
  scale (no (shift, scale) swap, unlike FLUX/SD3). Some files carry `norm_final.weight`, a
  weight the model does not have (its final LayerNorm has no affine): ignored, as diffusers does.

ONE table, `transformer_table(n_layers, n_refiner)` (one `Entry` per original LoRA-able module),
gives the kohya LoRA names (`kohya_table`, `lora_unet_layers_0_attention_qkv`: what ComfyUI's
generic `lora_unet_<weight name>` map reads), full weights both ways (`transformer_to_original`
for `lorakit merge --single-file`, `transformer_from_original` for single-file loading, the
table plus `norm_table`), and the single-file markers.
"""

from __future__ import annotations

import torch

from lorakit.models.naming import (
    Entry,
    detached,
    entries_from_original,
    entries_to_original,
    read_under,
)

PATCH = "2-1"
"""diffusers' key of the (patch 2, frame patch 1) embedder / final layer of the released model."""

SINGLE_FILE_MARKERS = (
    "layers.0.adaLN_modulation.0.",
    "model.diffusion_model.layers.0.adaLN_modulation.0.",
)
"""Z-Image's main blocks have a bare `adaLN_modulation.0` Linear; Lumina 2 (the other NextDiT,
`cap_embedder.*` too) has `adaLN_modulation.1` after a SiLU, so this tells them apart. The
diffusers-layout transformer file has the same key."""

DIFFUSERS_MARKER = f"all_x_embedder.{PATCH}."
"""A transformer file saved by diffusers (`transformer/diffusion_pytorch_model.safetensors`):
loaded by its own names."""

_BLOCK_LINEARS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_TOP = {
    "x_embedder": f"all_x_embedder.{PATCH}",
    "final_layer.linear": f"all_final_layer.{PATCH}.linear",
    "final_layer.adaLN_modulation.1": f"all_final_layer.{PATCH}.adaLN_modulation.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
    "cap_embedder.1": "cap_embedder.1",
}
"""Top-level Linear modules (all with bias)."""


def blocks(n_layers: int, n_refiner: int) -> list[tuple[str, bool]]:
    """(block path, has adaLN) of every transformer block: the noise refiner (image tokens,
    modulated), the context refiner (caption tokens, unmodulated), the main layers."""
    out = [(f"noise_refiner.{i}", True) for i in range(n_refiner)]
    out += [(f"context_refiner.{i}", False) for i in range(n_refiner)]
    return out + [(f"layers.{i}", True) for i in range(n_layers)]


def transformer_table(n_layers: int = 30, n_refiner: int = 2) -> dict:
    """(component, original path) → Entry for every LoRA-able Linear of the transformer."""
    t = "transformer"
    out = {(t, k): Entry(t, (v,)) for k, v in _TOP.items()}
    for b, adaln in blocks(n_layers, n_refiner):
        qkv = tuple(f"{b}.attention.{p}" for p in ("to_q", "to_k", "to_v"))
        out[(t, f"{b}.attention.qkv")] = Entry(t, qkv, (1, 1, 1))
        out[(t, f"{b}.attention.out")] = Entry(t, (f"{b}.attention.to_out.0",))
        names = _BLOCK_LINEARS + (("adaLN_modulation.0",) if adaln else ())
        out |= {(t, f"{b}.{n}"): Entry(t, (f"{b}.{n}",)) for n in names}
    return out


def kohya_table(family) -> dict:
    """The transformer's table (Z-Image 6B: 30 layers, 2 + 2 refiner blocks): the only
    component lorakit puts a LoRA on."""
    return transformer_table()


def _biased(table: dict) -> tuple[dict, dict]:
    """(entries with a bias: the top-level Linears and adaLN, entries without: qkv, out, MLP)."""
    with_bias = {k: e for k, e in table.items() if k[1] in _TOP or "adaLN" in k[1]}
    return with_bias, {k: e for k, e in table.items() if k not in with_bias}


def norm_table(n_layers: int, n_refiner: int) -> dict[str, str]:
    """diffusers weight → original weight of everything no LoRA module carries."""
    out = {
        "cap_embedder.0.weight": "cap_embedder.0.weight",
        "x_pad_token": "x_pad_token",
        "cap_pad_token": "cap_pad_token",
    }
    for b, _ in blocks(n_layers, n_refiner):
        out[f"{b}.attention.norm_q.weight"] = f"{b}.attention.q_norm.weight"
        out[f"{b}.attention.norm_k.weight"] = f"{b}.attention.k_norm.weight"
        for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            out[f"{b}.{n}.weight"] = f"{b}.{n}.weight"
    return out


def _sizes(transformer) -> tuple[int, int]:
    config = getattr(transformer, "config", transformer)
    return int(config["n_layers"]), int(config["n_refiner_layers"])


def transformer_to_original(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """ZImageTransformer2DModel → the original layout (q|k|v fused), as ComfyUI's
    `diffusion_models/` files ship it (no prefix by default)."""
    n, r = _sizes(transformer)
    sd = transformer.state_dict()
    biased, plain = _biased(transformer_table(n, r))
    o = entries_to_original(biased, sd) | entries_to_original(plain, sd, ("weight",))
    o |= {theirs: sd[ours] for ours, theirs in norm_table(n, r).items()}
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def transformer_from_original(
    checkpoint: dict[str, torch.Tensor], n_layers: int, n_refiner: int
) -> dict[str, torch.Tensor]:
    """Original-layout weights (prefix removed) → ZImageTransformer2DModel names; the fused qkv
    split in three equal row blocks. Raises KeyError on a missing weight."""
    biased, plain = _biased(transformer_table(n_layers, n_refiner))
    out = entries_from_original(biased, checkpoint)
    out |= entries_from_original(plain, checkpoint, ("weight",))
    out |= {ours: checkpoint[theirs] for ours, theirs in norm_table(n_layers, n_refiner).items()}
    return {k: v.contiguous() for k, v in out.items()}


OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.")
"""What a single file may hold besides the transformer (never read as transformer weights)."""
IGNORED = ("norm_final.weight",)


def read_transformer(checkpoint: dict[str, torch.Tensor], n_layers: int, n_refiner: int):
    """The transformer's weights under diffusers names from a single file: the original layout
    (under `model.diffusion_model.` or unprefixed) or diffusers' own (`all_x_embedder.2-1.*`).
    A transformer key no table maps is an error (ValueError naming it)."""
    prefixed = any(k.startswith("model.diffusion_model.") for k in checkpoint)
    prefix = "model.diffusion_model." if prefixed else ""
    if any(k.startswith(prefix + DIFFUSERS_MARKER) for k in checkpoint):
        return read_under(
            checkpoint, prefix, lambda part: {k: part[k] for k in list(part)}, OTHER_PARTS
        )
    return read_under(
        checkpoint,
        prefix,
        lambda part: transformer_from_original(part, n_layers, n_refiner),
        skip=OTHER_PARTS,
        ignore=IGNORED,
    )


def to_single_file(components) -> dict[str, torch.Tensor]:
    """The transformer in the original layout, as ComfyUI's `diffusion_models/` file: the VAE
    and Qwen3 ship as separate files there, and the loader takes them from
    model.single_file_config."""
    return detached(transformer_to_original(components.transformer))
