"""SD3 / SD3.5 MMDiT: diffusers module paths ↔ original (SAI `sd3_impl` / sd-scripts) paths.

`joint_blocks.{i}.x_block` is the image stream, `context_block` the text stream; `attn.qkv` fuses
q|k|v. SD3.5 medium (MMDiT-X) blocks 0-12 have a second self-attention `x_block.attn2`. The last
block's context stream is `context_pre_only` (only qkv and its adaLN, whose two halves are
(shift, scale) where diffusers has (scale, shift)). kohya's `lora_sd3` writes these names;
diffusers cannot load them (ComfyUI can), so SD3 exports default to the diffusers format.
"""

from __future__ import annotations

from lorakit.export.names import Entry, identity_table

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


def table(family) -> dict:
    """(component, original path) → Entry for SD3/SD3.5; text encoders keep their names."""
    comps = tuple(t.component for t in family.targets if t.component != "transformer")
    return identity_table(family, comps) | transformer_table(family.known_modules("transformer"))
