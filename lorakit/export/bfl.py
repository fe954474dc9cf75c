"""FLUX.1 transformer: diffusers module paths ↔ original Black Forest Labs (BFL) paths.

BFL fuses projections that diffusers splits: `double_blocks.{i}.img_attn.qkv` = to_q|to_k|to_v,
`txt_attn.qkv` = add_q_proj|add_k_proj|add_v_proj, `single_blocks.{i}.linear1` =
to_q|to_k|to_v|proj_mlp (widths 1:1:1:4 of the hidden size), stacked along the output dim.
`final_layer.adaLN_modulation.1` orders (shift, scale) where diffusers' `norm_out.linear` has
(scale, shift). kohya (sd-scripts), ComfyUI and Forge use these names for FLUX LoRAs.
"""

from __future__ import annotations

from lorakit.export.names import Entry, identity_table

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


def transformer_table(num_double: int = 19, num_single: int = 38) -> dict:
    t = "transformer"
    out = {(t, k): Entry(t, (v,)) for k, v in _TOP.items()}
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


def table(family) -> dict:
    """(component, original path) → Entry for FLUX.1 dev/schnell (19 double, 38 single blocks);
    the text encoders (CLIP-L, and T5 from sd-scripts' train_t5xxl files) keep their
    transformers names."""
    return identity_table(family, ("text_encoder", "text_encoder_2")) | transformer_table()
