"""FLUX.2 names: diffusers ↔ the original Black Forest Labs (BFL) FLUX.2 layout.

The original layout is what BFL's `flux-2-klein-*.safetensors` and ComfyUI's
`diffusion_models/flux-2-klein-*.safetensors` hold (verified against diffusers 0.42
`convert_flux2_transformer_checkpoint_to_diffusers`, loaders/single_file_utils.py, and
`scripts/convert_flux2_to_diffusers.py`):

- top level: `img_in` (x_embedder), `txt_in` (context_embedder), `time_in.{in,out}_layer`
  (time_guidance_embed.timestep_embedder.linear_{1,2}), `guidance_in.*` (FLUX.2 [dev] only),
  the three shared modulations `double_stream_modulation_{img,txt}.lin` /
  `single_stream_modulation.lin` (diffusers `.linear`), `final_layer.linear` (proj_out) and
  `final_layer.adaLN_modulation.1` (norm_out.linear, halves stored (shift, scale) where diffusers
  has (scale, shift));
- `double_blocks.{i}`: `img_attn.qkv` = to_q|to_k|to_v and `txt_attn.qkv` =
  add_q_proj|add_k_proj|add_v_proj (fused along the output dim), `img_attn.proj` (to_out.0),
  `txt_attn.proj` (to_add_out), `img_mlp.0` / `img_mlp.2` (ff.linear_in / ff.linear_out; the
  SwiGLU's gate and value halves stay fused in both layouts), `txt_mlp.*` (ff_context.*);
- `single_blocks.{i}`: `linear1` (attn.to_qkv_mlp_proj, fused in diffusers too) and `linear2`
  (attn.to_out);
- q/k RMSNorm weights: BFL `….norm.query_norm.scale` / `key_norm.scale`.
No FLUX.2 Linear has a bias.

ONE table, `transformer_table(...)`, gives the kohya LoRA names (`kohya_table`: musubi-tuner
writes `lora_unet_double_blocks_0_img_attn_qkv`, ComfyUI maps `lora_unet_<X>` and
`diffusion_model.<X>` for every weight X of its BFL-named model) and full weights both ways
(`transformer_to_original` for `lorakit merge --single-file`, `transformer_from_original` for a
BFL single file), plus the norm renames (`norm_table`).
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

PREFIX = "model.diffusion_model."
SINGLE_FILE_MARKERS = (
    "double_stream_modulation_img.",
    PREFIX + "double_stream_modulation_img.",
)
"""Key prefixes only a FLUX.2 transformer file has (FLUX.1 modulates per block: `img_mod.lin`).
The diffusers layout (`….linear`) shares them; `read_transformer` reads both."""

KINDS = ("weight",)
"""FLUX.2 Linears carry no bias."""

_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}


def transformer_table(num_double: int = 8, num_single: int = 24, guidance: bool = False) -> dict:
    """(component, original path) → Entry for the FLUX.2 transformer (klein 9B: 8 double, 24
    single blocks; klein 4B: 5 / 20; no guidance embedding — FLUX.2 [dev] has one)."""
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
        out |= {(t, f"{s}.{k}"): Entry(t, (f"{b}.{v}",)) for k, v in _SINGLE.items()}
    return out


def kohya_table(family) -> dict:
    """(component, original path) → Entry for the largest klein (9B: 8 double, 24 single
    blocks; 4B's names are a subset). Only the transformer carries a LoRA."""
    return transformer_table()


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


def _guidance(config) -> bool:
    return bool(config.get("guidance_embeds", False))


def transformer_to_original(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flux2Transformer2DModel → BFL layout (`double_blocks.*`, `single_blocks.*`, …), as BFL's
    transformer-only files ship (no `model.diffusion_model.` prefix)."""
    sd = transformer.state_dict()
    c = transformer.config
    n, n_single = c.num_layers, c.num_single_layers
    o = entries_to_original(transformer_table(n, n_single, _guidance(c)), sd, KINDS)
    o |= {theirs: sd[ours] for ours, theirs in norm_table(n, n_single).items()}
    return {prefix + k: v.detach().clone().contiguous() for k, v in o.items()}


def transformer_from_original(
    checkpoint: dict[str, torch.Tensor], num_layers: int, num_single_layers: int, guidance: bool
) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.2 transformer weights (prefix removed) → Flux2Transformer2DModel names.
    Raises KeyError on a missing weight."""
    table = transformer_table(num_layers, num_single_layers, guidance)
    out = entries_from_original(table, checkpoint, KINDS)
    norms = norm_table(num_layers, num_single_layers)
    out |= {ours: checkpoint[theirs] for ours, theirs in norms.items()}
    return {k: v.contiguous() for k, v in out.items()}


OTHER_PARTS = ("vae.", "first_stage_model.", "text_encoders.")
"""What a single file may hold besides the transformer (never read as transformer weights)."""


def is_diffusers_layout(checkpoint) -> bool:
    """A `diffusion_pytorch_model.safetensors` of a diffusers folder rather than a BFL file."""
    return any(k.endswith("double_stream_modulation_img.linear.weight") for k in checkpoint)


def read_transformer(checkpoint, config) -> dict[str, torch.Tensor]:
    """The transformer's weights under diffusers names from a single file, BFL layout (bare or
    under `model.diffusion_model.`) or diffusers layout; a key no table maps is an error."""
    prefixed = any(k.startswith(PREFIX) for k in checkpoint)
    under = PREFIX if prefixed else ""
    n, n_single = config["num_layers"], config["num_single_layers"]

    def convert(part):
        if is_diffusers_layout(part):
            table = transformer_table(n, n_single, _guidance(config))
            names = {p for entry in table.values() for p in entry.parts}
            keys = {f"{p}.weight" for p in names} | set(norm_table(n, n_single))
            return {k: part[k] for k in sorted(keys)}
        return transformer_from_original(part, n, n_single, _guidance(config))

    return read_under(checkpoint, under, convert, skip=OTHER_PARTS)


def infer_config(checkpoint) -> dict:
    """The transformer config a FLUX.2 file implies, read off its shapes: block counts, hidden
    and head width (q-norm length), text width, timestep channels, MLP ratio, guidance
    embedding; rope axes are a quarter of the head each and θ = 2000 as in every FLUX.2."""
    ck = {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}
    if is_diffusers_layout(ck):
        ck = {k.removeprefix(PREFIX): v for k, v in transformer_to_original_state(ck).items()}
    img_in, txt_in = ck["img_in.weight"], ck["txt_in.weight"]
    n = 1 + max((int(k.split(".")[1]) for k in ck if k.startswith("double_blocks.")), default=-1)
    n_single = 1 + max(
        (int(k.split(".")[1]) for k in ck if k.startswith("single_blocks.")), default=-1
    )
    hidden = img_in.shape[0]
    head = ck["single_blocks.0.norm.query_norm.scale"].shape[0]
    mlp_in = ck["single_blocks.0.linear2.weight"].shape[1] - hidden
    return dict(
        patch_size=1,
        in_channels=img_in.shape[1],
        num_layers=n,
        num_single_layers=n_single,
        attention_head_dim=head,
        num_attention_heads=hidden // head,
        joint_attention_dim=txt_in.shape[1],
        timestep_guidance_channels=ck["time_in.in_layer.weight"].shape[1],
        mlp_ratio=mlp_in / hidden,
        axes_dims_rope=(head // 4,) * 4,
        rope_theta=2000,
        guidance_embeds=any(k.startswith("guidance_in.") for k in ck),
    )


def transformer_to_original_state(state: dict) -> dict:
    """A diffusers-named FLUX.2 state dict → BFL names (`infer_config` reads one layout)."""
    n = 1 + max(
        (int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")), default=-1
    )
    n_single = 1 + max(
        (int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")),
        default=-1,
    )
    guidance = any(".guidance_embedder." in k for k in state)
    o = entries_to_original(transformer_table(n, n_single, guidance), state, KINDS)
    return o | {theirs: state[ours] for ours, theirs in norm_table(n, n_single).items()}


def to_single_file(components) -> dict[str, torch.Tensor]:
    """The transformer in the BFL layout, as BFL's `flux-2-klein-*.safetensors` (the VAE and the
    Qwen3 encoder ship as separate files; `lorakit merge --single-file` writes the transformer,
    and the loader takes the rest from model.single_file_config)."""
    return detached(transformer_to_original(components.transformer))


# --- the VAE and the text encoder of ComfyUI's split files --------------------------------------


def vae_names(keys, levels: int) -> dict[str, str]:
    """AutoencoderKLFlux2 weight → its name in BFL's / ComfyUI's FLUX.2 VAE file
    (`flux2-vae.safetensors`): the ldm autoencoder layout (`encoder.down.{i}.block.{j}`,
    `mid.attn_1` as 1×1 convs, `norm_out`) with the quant convs inside the encoder/decoder
    (`encoder.quant_conv`, `decoder.post_quant_conv`) and the latent batch norm `bn.*` as is
    (diffusers scripts/convert_flux2_to_diffusers.py `DIFFUSERS_VAE_TO_FLUX2_MAPPING`)."""
    from lorakit.models import ldm_names

    out = {}
    for key, new in ldm_names.vae_names(keys, levels).items():
        if new.startswith("quant_conv."):
            new = "encoder." + new
        elif new.startswith("post_quant_conv."):
            new = "decoder." + new
        out[key] = new
    return out


VAE_MARKERS = ("bn.running_mean", "encoder.down.0.block.0.conv1.weight")
"""Keys every FLUX.2 VAE file has (the latent batch norm marks FLUX.2's)."""


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """The VAE as a FLUX.2 VAE file (attention projections as 1×1 convs)."""
    sd = vae.state_dict()
    out = {}
    for key, new in vae_names(sd, len(vae.config.block_out_channels)).items():
        value = sd[key]
        if ".attn_1." in new and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value.detach().clone().contiguous()
    return out


def vae_from_original(vae, checkpoint) -> dict[str, torch.Tensor]:
    """Inverse of `vae_to_original`; a file without BatchNorm's step counter gets 0."""
    out = {}
    for key, new in vae_names(vae.state_dict(), len(vae.config.block_out_channels)).items():
        if new.endswith("num_batches_tracked") and new not in checkpoint:
            out[key] = torch.tensor(0, dtype=torch.long)
            continue
        value = checkpoint[new]
        out[key] = value[:, :, 0, 0] if ".attn_1." in new and value.dim() == 4 else value
    return out


TEXT_ENCODER_MARKERS = ("model.layers.0.self_attn.q_norm.weight",)
"""A Qwen3 file (ComfyUI's `text_encoders/qwen_3_4b.safetensors`): transformers' own names;
`q_norm` (per-head query RMSNorm) is Qwen3's, not Qwen2's."""


def qwen3_config(checkpoint) -> dict:
    """The Qwen3 config a text-encoder file implies, read off its shapes (Qwen3's fixed
    choices: θ 1e6, RMSNorm ε 1e-6, SiLU, no attention bias)."""
    embed = checkpoint["model.embed_tokens.weight"]
    head = checkpoint["model.layers.0.self_attn.q_norm.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in checkpoint if k.startswith("model.layers."))
    return dict(
        vocab_size=embed.shape[0],
        hidden_size=embed.shape[1],
        intermediate_size=checkpoint["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=checkpoint["model.layers.0.self_attn.q_proj.weight"].shape[0] // head,
        num_key_value_heads=checkpoint["model.layers.0.self_attn.k_proj.weight"].shape[0] // head,
        head_dim=head,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings="lm_head.weight" not in checkpoint,
    )
