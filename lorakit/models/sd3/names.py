"""SD3 / SD3.5 names: diffusers ↔ the original MMDiT layout (SAI `sd3_impl` / sd-scripts).

`joint_blocks.{i}.x_block` is the image stream, `context_block` the text stream; `attn.qkv` fuses
q|k|v. SD3.5 medium (MMDiT-X) blocks 0-12 have a second self-attention `x_block.attn2`. The last
block's context stream is `context_pre_only` (only qkv and its adaLN, whose two halves are
(shift, scale) where diffusers has (scale, shift)).

ONE table, `transformer_table(known)` (one `Entry` per original module), gives:
- kohya LoRA names (`kohya_table`; kohya's `lora_sd3` writes them; diffusers cannot load them,
  ComfyUI can, so SD3 exports default to the diffusers format);
- full weights both ways: `transformer_to_original` (`lorakit merge --single-file`) and
  `transformer_from_original` (loading a single file, `SD3.from_single_file` through
  `read_transformer`), each the table over the model's own modules plus the parameters no LoRA
  module carries (`pos_embed`, q/k norms).
Single files: `joint_blocks.*` (optionally under `model.diffusion_model.`) plus an optional
`first_stage_model.` VAE (`ldm_names`) and text encoders (`text_encoders.*`, not read).
Also here: the variant names (SD3 medium / SD3.5 medium / SD3.5 large) kohya records.
"""

from __future__ import annotations

import torch

from lorakit.models import ldm_names
from lorakit.models.naming import (
    Entry,
    detached,
    entries_from_original,
    entries_to_original,
    identity_table,
    read_under,
)

SINGLE_FILE_MARKERS = ("joint_blocks.", "model.diffusion_model.joint_blocks.")
"""Key prefixes only an SD3/SD3.5 single-file checkpoint has (with or without the prefix)."""

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def transformer_table(known: frozenset[str]) -> dict:
    """Entries for every original module whose diffusers parts are in `known` (the union of
    SD3.5 large and medium tables, so both layouts are covered)."""
    t = "transformer"
    out = {(t, k): Entry(t, (v,)) for k, v in _TOP.items()}
    out[(t, "final_layer.adaLN_modulation.1")] = Entry(t, ("norm_out.linear",), swap=True)
    i = 0
    while f"transformer_blocks.{i}.norm1.linear" in known:
        j, b = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = f"{b}.attn.to_add_out" not in known  # context_pre_only
        x = {
            "x_block.attn.proj": "attn.to_out.0",
            "x_block.mlp.fc1": "ff.net.0.proj",
            "x_block.mlp.fc2": "ff.net.2",
            "x_block.adaLN_modulation.1": "norm1.linear",
        }
        if not last:
            x |= {
                "context_block.attn.proj": "attn.to_add_out",
                "context_block.mlp.fc1": "ff_context.net.0.proj",
                "context_block.mlp.fc2": "ff_context.net.2",
            }
        out |= {(t, f"{j}.{k}"): Entry(t, (f"{b}.{v}",)) for k, v in x.items()}
        # A context_pre_only block's adaLN has 2 chunks (swapped), a normal one 6 (not):
        # decided from the weight shapes, since block 23 is the last in medium, not in large.
        out[(t, f"{j}.context_block.adaLN_modulation.1")] = Entry(
            t, (f"{b}.norm1_context.linear",), swap="if_two_chunks"
        )
        qkv = tuple(f"{b}.attn.to_{p}" for p in "qkv")
        out[(t, f"{j}.x_block.attn.qkv")] = Entry(t, qkv, (1, 1, 1))
        ctx = tuple(f"{b}.attn.add_{p}_proj" for p in "qkv")
        out[(t, f"{j}.context_block.attn.qkv")] = Entry(t, ctx, (1, 1, 1))
        if f"{b}.attn2.to_q" in known:
            qkv2 = tuple(f"{b}.attn2.to_{p}" for p in "qkv")
            out[(t, f"{j}.x_block.attn2.qkv")] = Entry(t, qkv2, (1, 1, 1))
            out[(t, f"{j}.x_block.attn2.proj")] = Entry(t, (f"{b}.attn2.to_out.0",))
        i += 1
    return out


def kohya_table(family) -> dict:
    """(component, original path) → Entry for SD3/SD3.5; text encoders keep their names."""
    comps = tuple(t.component for t in family.targets if t.component != "transformer")
    return identity_table(family, comps) | transformer_table(family.known_modules("transformer"))


_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
"""q/k RMSNorms (no LoRA modules, so not in the table): written where the model has them."""


def transformer_to_original(transformer, prefix: str = "model.diffusion_model.") -> dict:
    """SD3Transformer2DModel → `joint_blocks.*` (SD3/SD3.5 single-file layout): the table over
    the model's own modules, `pos_embed` and the q/k norms."""
    sd = transformer.state_dict()
    modules = frozenset(k.rsplit(".", 1)[0] for k in sd)
    o = {"pos_embed": sd["pos_embed.pos_embed"]}
    o |= entries_to_original(transformer_table(modules), sd)
    for i in range(transformer.config.num_layers):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for ours, theirs in _NORMS.items():
            if f"{b}{ours}.weight" in sd:
                o[f"{j}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def transformer_from_original(transformer, checkpoint) -> dict[str, torch.Tensor]:
    """Inverse of `transformer_to_original` for the (empty) `transformer`: original weights
    (prefix removed) → SD3Transformer2DModel names; fused qkv split, swapped adaLN halves
    swapped back. Raises KeyError on a missing weight."""
    keys = transformer.state_dict().keys()
    modules = frozenset(k.rsplit(".", 1)[0] for k in keys)
    out = {"pos_embed.pos_embed": checkpoint["pos_embed"]}
    out |= entries_from_original(transformer_table(modules), checkpoint)
    for i in range(transformer.config.num_layers):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for ours, theirs in _NORMS.items():
            if f"{b}{ours}.weight" in keys:
                out[f"{b}{ours}.weight"] = checkpoint[f"{j}{theirs}.weight"]
    return out


OTHER_PARTS = ("first_stage_model.", "text_encoders.")
"""What a single file holds besides the transformer (never read as transformer weights)."""


def read_transformer(transformer, checkpoint) -> dict[str, torch.Tensor]:
    """`single_file.load_converted` converter: the transformer under `model.diffusion_model.`,
    or unprefixed (every key but `OTHER_PARTS`); a key the table does not map is an error."""
    prefixed = any(k.startswith("model.diffusion_model.") for k in checkpoint)
    return read_under(
        checkpoint,
        "model.diffusion_model." if prefixed else "",
        lambda part: transformer_from_original(transformer, part),
        skip=OTHER_PARTS,
    )


def to_single_file(components) -> dict[str, torch.Tensor]:
    """The transformer in the original layout plus the VAE (`first_stage_model.`); the text
    encoders are not written (the loader takes them from a diffusers folder, as for the files
    model sites ship)."""
    state = transformer_to_original(components.transformer)
    return state | detached(ldm_names.vae_to_ldm(components.vae))


# -- variant names -------------------------------------------------------------------------------

VARIANTS = {
    "sd3-medium": ("medium", "stable-diffusion-3-medium/lora"),
    "sd35-medium": ("5-medium", "stable-diffusion-3-5-medium/lora"),
    "sd35-large": ("5-large", "stable-diffusion-3-5-large/lora"),
}
"""SD3 variant → (`ss_base_model_version`, `modelspec.architecture`), kohya's values."""


def variant(config) -> str:
    """SD3 variant from an `SD3Transformer2DModel` config: SD3.5 medium is the 24-block MMDiT-X
    (blocks with `attn2`), SD3 medium the plain 24-block MMDiT, anything deeper SD3.5 large."""
    dual = tuple(getattr(config, "dual_attention_layers", None) or ())
    if int(getattr(config, "num_layers", 38)) <= 24:
        return "sd35-medium" if dual else "sd3-medium"
    return "sd35-large"


def variant_metadata(components) -> dict[str, str]:
    """`ss_base_model_version` / `modelspec.architecture` of the loaded variant ({} without a
    transformer)."""
    if getattr(components, "transformer", None) is None:
        return {}
    version, arch = VARIANTS[variant(components.transformer.config)]
    return {"ss_base_model_version": version, "modelspec.architecture": arch}
