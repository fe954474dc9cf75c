"""FLUX.1 names: diffusers ↔ the original Black Forest Labs (BFL) layout.

BFL fuses projections that diffusers splits: `double_blocks.{i}.img_attn.qkv` = to_q|to_k|to_v,
`txt_attn.qkv` = add_q_proj|add_k_proj|add_v_proj, `single_blocks.{i}.linear1` =
to_q|to_k|to_v|proj_mlp (widths 1:1:1:4 of the hidden size), stacked along the output dim.
`final_layer.adaLN_modulation.1` orders (shift, scale) where diffusers' `norm_out.linear` has
(scale, shift).

ONE table, `transformer_table(...)` (one `Entry` per original module), gives:
- kohya LoRA names (`kohya_table`: kohya sd-scripts, ComfyUI and Forge use them for FLUX LoRAs);
- full weights both ways: `transformer_to_original` (`lorakit merge --single-file`) and
  `transformer_from_original` (loading a BFL single file), each the table plus the q/k norms
  (`norm_table`: no LoRA modules; BFL calls their weight `scale`).
Single files: `double_blocks.*` / `single_blocks.*`, usually the transformer alone, with or
without `model.diffusion_model.`.
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

SINGLE_FILE_MARKERS = ("double_blocks.", "model.diffusion_model.double_blocks.")
"""Key prefixes only a FLUX.1 single-file checkpoint has (with or without the prefix)."""

_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}


def transformer_table(num_double: int = 19, num_single: int = 38, guidance: bool = True) -> dict:
    """(component, original path) → Entry for the transformer (FLUX.1 dev: 19 double, 38 single
    blocks, a guidance embedding; schnell has none)."""
    t = "transformer"
    top = {k: v for k, v in _TOP.items() if guidance or not k.startswith("guidance_in.")}
    out = {(t, k): Entry(t, (v,)) for k, v in top.items()}
    out[(t, "final_layer.adaLN_modulation.1")] = Entry(t, ("norm_out.linear",), swap=True)
    for i in range(num_double):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        out |= {(t, f"{d}.{k}"): Entry(t, (f"{b}.{v}",)) for k, v in _DOUBLE.items()}
        qkv = ("to_q", "to_k", "to_v")
        out[(t, f"{d}.img_attn.qkv")] = Entry(t, tuple(f"{b}.attn.{p}" for p in qkv), (1, 1, 1))
        add = ("add_q_proj", "add_k_proj", "add_v_proj")
        out[(t, f"{d}.txt_attn.qkv")] = Entry(t, tuple(f"{b}.attn.{p}" for p in add), (1, 1, 1))
    for i in range(num_single):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        parts = (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp")
        out[(t, f"{s}.linear1")] = Entry(t, parts, (1, 1, 1, 4))
        out[(t, f"{s}.linear2")] = Entry(t, (f"{b}.proj_out",))
        out[(t, f"{s}.modulation.lin")] = Entry(t, (f"{b}.norm.linear",))
    return out


def kohya_table(family) -> dict:
    """(component, original path) → Entry for FLUX.1 dev/schnell (19 double, 38 single blocks);
    the text encoders (CLIP-L, and T5 from sd-scripts' train_t5xxl files) keep their
    transformers names."""
    return identity_table(family, ("text_encoder", "text_encoder_2")) | transformer_table()


_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def norm_table(num_double: int, num_single: int) -> dict[str, str]:
    """diffusers q/k RMSNorm weight → BFL `….scale`."""
    out = {}
    for i in range(num_double):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out |= {f"{b}{k}.weight": f"{d}{v}.scale" for k, v in _DOUBLE_NORMS.items()}
    for i in range(num_single):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out |= {f"{b}{k}.weight": f"{s}{v}.scale" for k, v in _SINGLE_NORMS.items()}
    return out


def transformer_to_original(transformer, prefix: str = "") -> dict:
    """FluxTransformer2DModel → BFL layout (`double_blocks.*`, `single_blocks.*`), as the FLUX.1
    transformer-only files ship (no `model.diffusion_model.` prefix)."""
    sd = transformer.state_dict()
    n, n_single = transformer.config.num_layers, transformer.config.num_single_layers
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    o = entries_to_original(transformer_table(n, n_single, guidance), sd)
    o |= {theirs: sd[ours] for ours, theirs in norm_table(n, n_single).items()}
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def transformer_from_original(
    checkpoint: dict[str, torch.Tensor], num_layers: int, num_single_layers: int, inner_dim: int
) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.1 transformer weights → FluxTransformer2DModel names.

    The same mapping as diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, which
    cannot be used as is: diffusers 0.42 hard-codes `inner_dim = 3072` when splitting the single
    blocks' fused `linear1` ([q; k; v; mlp], rows inner, inner, inner, 4·inner), so it only reads
    full-size FLUX.1. Here `inner_dim` comes from the config. adaLN of the final layer is stored
    (shift, scale) in BFL files, (scale, shift) in diffusers. Raises KeyError on a missing weight.
    """
    ck = checkpoint
    if any(k.startswith("model.diffusion_model.") for k in ck):
        ck = {k.removeprefix("model.diffusion_model."): v for k, v in ck.items()}
    guidance = "guidance_in.in_layer.weight" in ck  # dev has a guidance embedding, schnell none
    table = transformer_table(num_layers, num_single_layers, guidance)
    for i in range(num_single_layers):
        for kind in ("weight", "bias"):
            rows, want = ck[f"single_blocks.{i}.linear1.{kind}"].shape[0], 7 * inner_dim
            if rows != want:
                raise KeyError(f"single_blocks.{i}.linear1.{kind} has {rows} rows, not {want}")
    out = entries_from_original(table, ck)
    out |= {ours: ck[theirs] for ours, theirs in norm_table(num_layers, num_single_layers).items()}
    return {k: v.contiguous() for k, v in out.items()}


OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.")
"""What a single file may hold besides the transformer (never read as transformer weights)."""


def read_transformer(checkpoint, num_layers: int, num_single_layers: int, inner_dim: int):
    """`transformer_from_original` over the transformer's keys (under `model.diffusion_model.`,
    or unprefixed: every key but `OTHER_PARTS`); a key the table does not map is an error."""
    prefixed = any(k.startswith("model.diffusion_model.") for k in checkpoint)
    return read_under(
        checkpoint,
        "model.diffusion_model." if prefixed else "",
        lambda part: transformer_from_original(part, num_layers, num_single_layers, inner_dim),
        skip=OTHER_PARTS,
    )


def to_single_file(components) -> dict[str, torch.Tensor]:
    """The transformer in the BFL layout plus the VAE (`first_stage_model.`); the text encoders
    are not written (the loader takes them from a diffusers folder, as for the files model
    sites ship)."""
    state = transformer_to_original(components.transformer)
    return state | detached(ldm_names.vae_to_ldm(components.vae))
