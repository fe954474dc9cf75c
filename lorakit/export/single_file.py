"""Write a family's diffusers components as an ORIGINAL-layout single-file checkpoint
(`lorakit merge --single-file`): the layout model sites ship and ComfyUI/A1111/Forge load.

The inverse of diffusers' single-file converters (diffusers has original→diffusers only), written
from the ldm/SGM layout (as diffusers' scripts/convert_diffusers_to_original_{stable_diffusion,
sdxl}.py) for any `layers_per_block` / block list, and from the SD3 (`joint_blocks.*`) and BFL
(`double_blocks.*` / `single_blocks.*`) layouts. Loading the file back with lorakit's single-file
loader (= diffusers' forward converters) gives identical weights (tests/test_merge_single_file.py).

- SD1.5: `model.diffusion_model.` + `first_stage_model.` + `cond_stage_model.transformer.`;
- SDXL: the same UNet/VAE + `conditioner.embedders.0.transformer.` (CLIP-L) and
  `conditioner.embedders.1.model.` (OpenCLIP bigG: fused in_proj, transposed text_projection);
- SD3/3.5: `model.diffusion_model.joint_blocks.*` + `first_stage_model.` VAE;
- FLUX.1: BFL transformer keys (no prefix) + `first_stage_model.` VAE.
Text encoders of SD3/FLUX are not written (the loader takes them from a diffusers folder,
as for the files model sites ship).
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.fileio import save_safetensors

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_prefix_map(config) -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) pairs, most specific first."""
    n = config["layers_per_block"]
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
    levels = len(config["block_out_channels"])
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
        has_attn = "CrossAttn" in config["up_block_types"][i]
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


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        for hf, sd in pairs:
            if key.startswith(hf):
                rest = key[len(hf) :]
                if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                    for a, b in _RESNET:
                        rest = rest.replace(a, b)
                out["model.diffusion_model." + sd + rest] = value
                break
        else:
            raise KeyError(f"no ldm name for unet key {key}")
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
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
    attn = (
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    )
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for hf, sd in pairs:
            if key.startswith(hf):
                new = sd + key[len(hf) :]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            for a, b in attn:
                new = new.replace(f".attn_1.{a}", f".attn_1.{b}")
            if value.dim() == 2:  # ldm stores the attention projections as 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP keys with the `text_model.` level (transformers 5 drops it from CLIPTextModel)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key
        out[prefix + key] = value
    return out


def openclip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection → OpenCLIP keys (fused in_proj, text_projection transposed)."""
    sd = text_encoder.state_dict()
    out = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        hf = f"text_model.encoder.layers.{i}."
        oc = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            out[oc + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # present in real files, unused
    return out


def to_original(family: str, comps) -> dict[str, torch.Tensor]:
    """All weights of `comps` under original key names, as one checkpoint dict."""
    state = {**unet_to_ldm(comps.unet), **vae_to_ldm(comps.vae)}
    if family == "sd15":
        state |= clip_to_ldm(comps.text_encoder, "cond_stage_model.transformer.")
    elif family == "sdxl":
        state |= clip_to_ldm(comps.text_encoder, "conditioner.embedders.0.transformer.")
        state |= openclip_to_ldm(comps.text_encoder_2, "conditioner.embedders.1.model.")
    else:
        raise LorakitError(f"no ldm/SGM layout for the {family} family")
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# -- SD3 / FLUX transformers (inverse of diffusers' convert_{sd3,flux}_transformer_checkpoint…) ----


def _shift_scale(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift); original files store (shift, scale)."""
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _qkv(sd, prefix: str, names=("to_q", "to_k", "to_v")) -> dict[str, torch.Tensor]:
    return {
        kind: torch.cat([sd[f"{prefix}{n}.{kind}"] for n in names]) for kind in ("weight", "bias")
    }


def sd3_transformer_to_original(transformer, prefix: str = "model.diffusion_model.") -> dict:
    """SD3Transformer2DModel → `joint_blocks.*` (SD3/SD3.5 single-file layout)."""
    sd = transformer.state_dict()
    n = transformer.config.num_layers
    dual = set(transformer.config.dual_attention_layers or ())
    o = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": _shift_scale(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _shift_scale(sd["norm_out.linear.bias"]),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for lin, idx in (("linear_1", 0), ("linear_2", 2)):
            for kind in ("weight", "bias"):
                o[f"{theirs}.mlp.{idx}.{kind}"] = sd[f"time_text_embed.{ours}.{lin}.{kind}"]
    for i in range(n):
        b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == n - 1
        for kind, t in _qkv(sd, b + "attn.").items():
            o[f"{j}x_block.attn.qkv.{kind}"] = t
        add = ("add_q_proj", "add_k_proj", "add_v_proj")
        for kind, t in _qkv(sd, b + "attn.", add).items():
            o[f"{j}context_block.attn.qkv.{kind}"] = t
        pairs = [
            ("attn.to_out.0.", "x_block.attn.proj."),
            ("norm1.linear.", "x_block.adaLN_modulation.1."),
            ("ff.net.0.proj.", "x_block.mlp.fc1."),
            ("ff.net.2.", "x_block.mlp.fc2."),
        ]
        if not last:
            pairs += [
                ("attn.to_add_out.", "context_block.attn.proj."),
                ("norm1_context.linear.", "context_block.adaLN_modulation.1."),
                ("ff_context.net.0.proj.", "context_block.mlp.fc1."),
                ("ff_context.net.2.", "context_block.mlp.fc2."),
            ]
        if i in dual:
            for kind, t in _qkv(sd, b + "attn2.").items():
                o[f"{j}x_block.attn2.qkv.{kind}"] = t
            pairs.append(("attn2.to_out.0.", "x_block.attn2.proj."))
        for ours, theirs in pairs:
            for kind in ("weight", "bias"):
                o[j + theirs + kind] = sd[b + ours + kind]
        if last:  # the context stream's last modulation is (shift, scale) only
            for kind in ("weight", "bias"):
                w = sd[f"{b}norm1_context.linear.{kind}"]
                o[f"{j}context_block.adaLN_modulation.1.{kind}"] = _shift_scale(w)
        norms = [("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
                 ("attn.norm_added_q.", "context_block.attn.ln_q."),
                 ("attn.norm_added_k.", "context_block.attn.ln_k.")]  # fmt: skip
        if i in dual:
            norms += [
                ("attn2.norm_q.", "x_block.attn2.ln_q."),
                ("attn2.norm_k.", "x_block.attn2.ln_k."),
            ]
        for ours, theirs in norms:
            if b + ours + "weight" in sd:
                o[j + theirs + "weight"] = sd[b + ours + "weight"]
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def flux_transformer_to_original(transformer, prefix: str = "") -> dict:
    """FluxTransformer2DModel → BFL layout (`double_blocks.*`, `single_blocks.*`), as the FLUX.1
    transformer-only files ship (no `model.diffusion_model.` prefix)."""
    sd = transformer.state_dict()
    o = {
        "txt_in.weight": sd["context_embedder.weight"],
        "txt_in.bias": sd["context_embedder.bias"],
        "img_in.weight": sd["x_embedder.weight"],
        "img_in.bias": sd["x_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": _shift_scale(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": _shift_scale(sd["norm_out.linear.bias"]),
    }
    embedders = [("timestep_embedder", "time_in"), ("text_embedder", "vector_in")]
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        embedders.append(("guidance_embedder", "guidance_in"))
    for ours, theirs in embedders:
        for lin, layer in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
            for kind in ("weight", "bias"):
                o[f"{theirs}.{layer}.{kind}"] = sd[f"time_text_embed.{ours}.{lin}.{kind}"]
    for i in range(transformer.config.num_layers):
        b, j = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind, t in _qkv(sd, b + "attn.").items():
            o[f"{j}img_attn.qkv.{kind}"] = t
        add = ("add_q_proj", "add_k_proj", "add_v_proj")
        for kind, t in _qkv(sd, b + "attn.", add).items():
            o[f"{j}txt_attn.qkv.{kind}"] = t
        for ours, theirs in (
            ("norm1.linear.", "img_mod.lin."), ("norm1_context.linear.", "txt_mod.lin."),
            ("ff.net.0.proj.", "img_mlp.0."), ("ff.net.2.", "img_mlp.2."),
            ("ff_context.net.0.proj.", "txt_mlp.0."), ("ff_context.net.2.", "txt_mlp.2."),
            ("attn.to_out.0.", "img_attn.proj."), ("attn.to_add_out.", "txt_attn.proj."),
        ):  # fmt: skip
            for kind in ("weight", "bias"):
                o[j + theirs + kind] = sd[b + ours + kind]
        for ours, theirs in (
            ("attn.norm_q.", "img_attn.norm.query_norm."),
            ("attn.norm_k.", "img_attn.norm.key_norm."),
            ("attn.norm_added_q.", "txt_attn.norm.query_norm."),
            ("attn.norm_added_k.", "txt_attn.norm.key_norm."),
        ):  # fmt: skip
            o[j + theirs + "scale"] = sd[b + ours + "weight"]
    for i in range(transformer.config.num_single_layers):
        b, j = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            o[f"{j}linear1.{kind}"] = torch.cat(
                [sd[f"{b}{n}.{kind}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
            )
            o[f"{j}modulation.lin.{kind}"] = sd[f"{b}norm.linear.{kind}"]
            o[f"{j}linear2.{kind}"] = sd[f"{b}proj_out.{kind}"]
        o[f"{j}norm.query_norm.scale"] = sd[f"{b}attn.norm_q.weight"]
        o[f"{j}norm.key_norm.scale"] = sd[f"{b}attn.norm_k.weight"]
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def to_single_file(family: str, comps) -> dict[str, torch.Tensor]:
    """Every weight of `comps` under its original key name (contiguous CPU copies)."""
    if family in ("sd15", "sdxl"):
        return to_original(family, comps)
    if family == "sd3":
        state = sd3_transformer_to_original(comps.transformer)
    elif family == "flux":
        state = flux_transformer_to_original(comps.transformer)
    else:
        raise LorakitError(
            f"lorakit cannot write a single-file checkpoint for the {family} family; merge "
            "still writes the diffusers folder. Leave out --single-file."
        )
    vae = {k: v.detach().clone().contiguous() for k, v in vae_to_ldm(comps.vae).items()}
    return state | vae


def write_single_file(family: str, comps, path) -> None:
    """Atomically write `to_single_file(...)` as safetensors to `path`."""
    state = {k: v.detach().cpu().contiguous() for k, v in to_single_file(family, comps).items()}
    save_safetensors(path, state, {"format": "pt", "lorakit.family": family})
