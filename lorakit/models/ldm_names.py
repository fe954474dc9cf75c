"""The ldm / SGM checkpoint layout shared by the UNet families (CompVis `ldm`, Stability
`generative-models`): diffusers names ↔ original names for the UNet, the VAE (`first_stage_model.`,
also used by the transformer families' files) and the CLIP / OpenCLIP text encoders.

The UNet is numbered `input_blocks.{n}.{k}` / `middle_block.{k}` / `output_blocks.{n}.{k}` with
`k` = 0 for the resnet and 1 for the transformer; resnet leaves are renamed (`conv1` →
`in_layers.2`, …). ONE table, `unet_prefix_map(layers_per_block, up_has_attention)` — (diffusers
prefix, ldm prefix) pairs — gives both the LoRA module names (`to_ldm(path)`, kohya's SGM names)
and the full weights (`unet_to_ldm`, `lorakit merge --single-file`); each family passes its own
block list (the real model's for module names, the loaded config's for weights). The VAE and
the text encoders have one rename table each too (`vae_names`, `clip_names`, `openclip_names`).
Every `*_to_ldm` (writing, `merge --single-file`) has its `*_from_ldm` (loading a single file)
derived from the same table: the inverse renames, OpenCLIP's fused `in_proj` split back into
q/k/v, its transposed `text_projection` transposed back, the VAE's 1x1-conv attention squeezed.
The `*_from_ldm` functions read a checkpoint whose component prefix is already removed
(`naming.read_under`) and take the empty (meta) model the weights are for.
"""

from __future__ import annotations

import torch

from lorakit.models.naming import KINDS, Entry, identity_table

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def unet_layout(config) -> tuple[int, tuple[bool, ...]]:
    """(layers_per_block, up_has_attention) of a diffusers `UNet2DConditionModel` config."""
    return config["layers_per_block"], tuple("CrossAttn" in t for t in config["up_block_types"])


def unet_prefix_map(layers_per_block: int, up_has_attention: tuple[bool, ...]) -> list:
    """(diffusers prefix, ldm prefix) pairs, most specific first. `up_has_attention[i]`: whether
    up block `i` has attentions (one entry per level)."""
    n = layers_per_block
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    levels = len(up_has_attention)
    for i in range(levels):
        for j in range(n):
            pairs.append(
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.0.")
            )
            pairs.append(
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(n + 1) * i + j + 1}.1.")
            )
        if i < levels - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n + 1) * (i + 1)}.0.op.")
            )
        has_attn = up_has_attention[i]
        for j in range(n + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(n + 1) * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(n + 1) * i + j}.1."))
        if i < levels - 1:
            pairs.append(
                (
                    f"up_blocks.{i}.upsamplers.0.",
                    f"output_blocks.{(n + 1) * i + n}.{2 if has_attn else 1}.",
                )
            )
    return pairs


def to_ldm(path: str, pairs: list) -> str:
    """A diffusers UNet module or parameter path → its ldm/SGM path (KeyError when none)."""
    dotted = path + "."
    for hf, sd in pairs:
        if dotted.startswith(hf):
            rest = dotted[len(hf) :]
            if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                for a, b in _RESNET:
                    rest = rest.replace(a, b)
            return (sd + rest)[:-1]
    raise KeyError(f"no ldm name for unet key {path}")


def unet_table(family, pairs: list, components: tuple[str, ...]) -> dict:
    """(component, original path) → Entry: the UNet's LoRA modules under ldm/SGM names,
    `components` (text encoders) under their own names."""
    out = identity_table(family, components)
    for path in family.known_modules("unet"):
        out[("unet", to_ldm(path, pairs))] = Entry("unet", (path,))
    return out


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def unet_names(keys, config) -> dict[str, str]:
    """diffusers UNet parameter name → its ldm name (no prefix), for the blocks of `config`."""
    pairs = unet_prefix_map(*unet_layout(config))
    return {k: to_ldm(k, pairs) for k in keys}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Every UNet weight under `model.diffusion_model.` + its ldm name (the unet's own layout)."""
    sd = unet.state_dict()
    return {UNET_PREFIX + ldm: sd[k] for k, ldm in unet_names(sd, unet.config).items()}


def unet_from_ldm(unet, checkpoint) -> dict[str, torch.Tensor]:
    """Inverse of `unet_to_ldm`: the unet's weights from ldm names (prefix removed)."""
    return {k: checkpoint[ldm] for k, ldm in unet_names(unet.state_dict(), unet.config).items()}


_VAE_ATTN = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def vae_names(keys, levels: int) -> dict[str, str]:
    """diffusers AutoencoderKL parameter name → its ldm name (no prefix); `levels`: the number
    of resolution levels (`len(block_out_channels)`)."""
    pairs = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
        ("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
        ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1."),
    ]
    for part in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}."))
    for i in range(levels):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = levels - 1 - i
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    out = {}
    for key in keys:
        new = key
        for hf, sd in pairs:
            if key.startswith(hf):
                new = sd + key[len(hf) :]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            for a, b in _VAE_ATTN:
                new = new.replace(f".attn_1.{a}", f".attn_1.{b}")
        out[key] = new
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """Every VAE weight under `first_stage_model.` + its ldm name; ldm stores the mid-block
    attention projections as 1x1 convs."""
    sd = vae.state_dict()
    out = {}
    for key, new in vae_names(sd, len(vae.config.block_out_channels)).items():
        value = sd[key]
        if ".attn_1." in new and value.dim() == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def vae_from_ldm(vae, checkpoint) -> dict[str, torch.Tensor]:
    """Inverse of `vae_to_ldm` (prefix removed; 1x1-conv attention weights squeezed)."""
    out = {}
    for key, new in vae_names(vae.state_dict(), len(vae.config.block_out_channels)).items():
        value = checkpoint[new]
        out[key] = value[:, :, 0, 0] if ".attn_1." in new and value.dim() == 4 else value
    return out


CLIP_IGNORED = ("position_ids", "logit_scale")
"""Checkpoint keys of the text encoders that hold no weight (a buffer, OpenCLIP's unused logit
scale): read by no table and not refused."""


def clip_names(keys) -> dict[str, str]:
    """HF CLIP parameter name → its checkpoint name: with the `text_model.` level (transformers 5
    drops it from CLIPTextModel)."""
    return {
        k: k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
        for k in keys
    }


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    sd = text_encoder.state_dict()
    return {prefix + ldm: sd[k] for k, ldm in clip_names(sd).items()}


def clip_from_ldm(text_encoder, checkpoint) -> dict[str, torch.Tensor]:
    return {k: checkpoint[ldm] for k, ldm in clip_names(text_encoder.state_dict()).items()}


_OPENCLIP_LAYER = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def openclip_names(layers: int) -> dict[str, str]:
    """CLIPTextModelWithProjection parameter → OpenCLIP name, for the one-to-one renames; the
    rest is `in_proj_{weight,bias}` (q|k|v fused by rows) and `text_projection` (transposed)."""
    out = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in _OPENCLIP_LAYER:
            out |= {f"{hf}{a}.{kind}": f"{oc}{b}.{kind}" for kind in KINDS}
    return out


def openclip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection → OpenCLIP keys (fused in_proj, text_projection transposed)."""
    sd = text_encoder.state_dict()
    layers = text_encoder.config.num_hidden_layers
    out = {prefix + oc: sd[hf] for hf, oc in openclip_names(layers).items()}
    out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.self_attn.", f"{prefix}transformer.resblocks.{i}."
        for kind in KINDS:
            parts = [sd[f"{hf}{p}_proj.{kind}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(parts)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # present in real files, unused
    return out


def openclip_from_ldm(text_encoder, checkpoint) -> dict[str, torch.Tensor]:
    """Inverse of `openclip_to_ldm` (prefix removed): in_proj split into q, k, v."""
    layers = text_encoder.config.num_hidden_layers
    out = {hf: checkpoint[oc] for hf, oc in openclip_names(layers).items()}
    out["text_projection.weight"] = checkpoint["text_projection"].T.contiguous()
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.self_attn.", f"transformer.resblocks.{i}."
        for kind in KINDS:
            q, k, v = checkpoint[f"{oc}attn.in_proj_{kind}"].chunk(3)
            out |= {f"{hf}q_proj.{kind}": q, f"{hf}k_proj.{kind}": k, f"{hf}v_proj.{kind}": v}
    return out
