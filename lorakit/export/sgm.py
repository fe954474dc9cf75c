"""SDXL UNet: diffusers module paths ↔ original SGM (`generative-models`) paths.

SGM numbers the UNet as `input_blocks.{n}.{k}` / `middle_block.{k}` / `output_blocks.{n}.{k}`
with `k` = 0 for the resnet and 1 for the transformer, `layers_per_block` = 2 (the real SDXL
base layout; the SGM mapping depends on it, so tiny models must use 2 to be read by name),
3 levels, attention on levels 1 and 2. Resnet leaves are renamed (`conv1` → `in_layers.2`, …).
kohya's SDXL LoRAs and `lora_unet_input_blocks_4_1_…` keys use these names.
"""

from __future__ import annotations

import re

from lorakit.export.names import Entry, identity_table

LAYERS_PER_BLOCK = 2
UP_HAS_ATTENTION = (True, True, False)
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_name(path: str, up_has_attention: tuple[bool, ...] = UP_HAS_ATTENTION) -> str:
    """diffusers UNet module path → SGM path (SDXL base layout). The LDM layout of SD1.5 is
    the same numbering with `up_has_attention=(False, True, True, True)`."""
    n = LAYERS_PER_BLOCK
    if path in _TOP:
        return _TOP[path]
    m = re.fullmatch(r"(down|up)_blocks\.(\d)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, b, sub, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{(n + 1) * b + i + 1}" if kind == "down" else (
            f"output_blocks.{(n + 1) * b + i}")  # fmt: skip
        if sub == "resnets":
            return f"{block}.0.{_RESNET[rest]}"
        return f"{block}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op"
    m = re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv", path)
    if m:
        b = int(m[1])
        return f"output_blocks.{(n + 1) * b + n}.{2 if up_has_attention[b] else 1}.conv"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", path)
    if m:
        k = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        rest = _RESNET[m[3]] if m[1] == "resnets" else m[3]
        return f"middle_block.{k}.{rest}"
    raise KeyError(f"no SGM name for SDXL UNet module '{path}'")


def table(family) -> dict:
    """(component, original path) → Entry for SDXL: UNet in SGM names, text encoders as is."""
    out = identity_table(family, ("text_encoder", "text_encoder_2"))
    for path in family.known_modules("unet"):
        out[("unet", sgm_name(path))] = Entry("unet", (path,))
    return out
