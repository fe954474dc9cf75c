"""How ComfyUI and Forge load a LoRA file, re-implemented from their code for the export tests.

Neither program can run here, so the rules that decide which keys a loader consumes and at what
strength it applies them are written down from their source (read, not copied):

ComfyUI (comfyanonymous/ComfyUI)
- `comfy/lora.py::model_lora_keys_unet`: every model weight `diffusion_model.X.weight` is
  reachable as `lora_unet_<X with _>` (and `lora_prior_unet_…`, and the bare `diffusion_model.X`);
  UNet models also by their diffusers names through `comfy/utils.py::unet_to_diffusers`
  (`lora_unet_<diffusers _>`, `lycoris_<diffusers _>`, `unet.…processor.to_q`); SD3 by
  `transformer.<path>`, `base_model.model.<path>`, `lora_transformer_<path _>`,
  `lycoris_<path _>` through `mmdit_to_diffusers`; FLUX by `transformer.<path>`,
  `lycoris_<path _>`, `lora_transformer_<path _>` through `flux_to_diffusers`. Split q/k/v
  (and FLUX's proj_mlp) land on row slices of the fused original weight ("offset"); FLUX/SD3's
  final adaLN (and SD3's last context adaLN) get `swap_scale_shift` applied to the update.
- `model_lora_keys_clip`: `lora_te_`/`lora_te1_`/`lora_te2_text_model_encoder_layers_{b}_{leaf}`,
  `text_encoder(_2).text_model.encoder.layers.{b}.{leaf}`, `text_encoders.<key>`; leaves from
  `LORA_CLIP_MAP` (q/k/v/out_proj, fc1, fc2).
- `comfy/lora.py::load_lora` + `comfy/weight_adapter/{lora,loha,lokr}.py`: per mapped key `x`,
  `x.alpha` and `x.dora_scale` are read, then the first adapter whose tensors are present:
  LoRA (`x.lora_up/lora_down.weight`, `x.lora_B/lora_A.weight`, …) with scale `alpha / rank`
  (rank = lora_down rows), LoHa (`hada_*`, scale `alpha / hada_w1_b rows`), LoKr (`lokr_*`,
  scale `alpha / rank of the decomposed factor` — w2_b's when present, else w1_b's — and 1.0
  when both factors are full). No alpha → scale 1.0. Keys never read log "lora key not loaded".
- `comfy/weight_adapter/base.py::weight_decompose` (DoRA, `dora_scale` on the output axis):
  `W' = (W + s·ΔW) · dora_scale / (‖W‖_row + eps)` — the norm of the ORIGINAL weight, where
  peft (and lorakit's training) divide by ‖W + s·ΔW‖_row.

Forge (lllyasviel/stable-diffusion-webui-forge)
- `packages_3rdparty/comfyui_lora_collection/lora.py`: the same key maps, except no
  `lora_prior_unet_`/`text_encoders.` keys and NO SD3 diffusers map (that block is commented
  out): SD3.5 LoRAs load only under their original `joint_blocks` names. FLUX maps
  `transformer.`, `lycoris_`, `lora_transformer_`.
- `backend/patcher/lora.py::merge_lora_to_weight`: the same per-kind scales and DoRA rule.
- `extensions-builtin/sd_forge_lora/networks.py::load_lora_for_models`: keys left after the UNet
  and CLIP maps are "unmatched"; more than 12 → the whole LoRA is skipped ("LoRA version
  mismatch").

What is modelled: the key maps, which tensors are read per key, the strength rule, slices and
swaps. What is not: the model detection itself — maps are built from the diffusers config of the
same architecture. ComfyUI's SD3 slice size is `depth · 64` with depth = hidden / 64, i.e. the
hidden size for every real SD3 model; here it is the hidden size, so tiny models work too.
The attn2 (SD3.5 medium MMDiT-X) entries are those of current ComfyUI; Forge's copy has none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

CLIP_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")  # fmt: skip
"""comfy/lora.py LORA_CLIP_MAP: the only CLIP modules either loader maps."""


@dataclass(frozen=True)
class Target:
    """Where a LoRA key lands in the loader's model: an original weight key, optionally a row
    slice of it (ComfyUI's "offset": start, size) and the scale/shift swap of the update."""

    key: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def _u(path: str) -> str:
    return path.replace(".", "_")


# -- original ↔ diffusers module maps (the loaders' own tables, by their rules) -----------------

_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
          "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # fmt: skip
_UNET_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "class_embedding.linear_1": "label_emb.0.0",
               "class_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def unet_config(config) -> dict:
    """ComfyUI's description of a UNet (num_res_blocks, transformer depth per input block, per
    output block in input order, middle) from the diffusers config of the same model."""
    levels = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    tl = config.get("transformer_layers_per_block") or 1
    tl = [tl] * levels if isinstance(tl, int) else list(tl)
    down = [("CrossAttn" in t) * tl[i] for i, t in enumerate(config["down_block_types"])]
    up = [("CrossAttn" in t) * tl[levels - 1 - i] for i, t in enumerate(config["up_block_types"])]
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    return {
        "num_res_blocks": [lpb] * levels,
        "transformer_depth": [d for d in down for _ in range(lpb)],
        # output blocks listed from the shallowest level; the map pops from the end (deepest)
        "transformer_depth_output": [d for d in reversed(up) for _ in range(lpb + 1)],
        "transformer_depth_middle": tl[-1] if "CrossAttn" in mid else -1,
    }


def unet_map(cfg: dict) -> dict[str, str]:
    """diffusers UNet module → ldm/SGM module (comfy/utils.py `unet_to_diffusers` rules)."""
    out: dict[str, str] = {}
    nrb = cfg["num_res_blocks"]
    depth, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])

    def attention(src: str, dst: str, blocks: int) -> None:
        for leaf in ("proj_in", "proj_out"):
            out[f"{src}.{leaf}"] = f"{dst}.{leaf}"
        for t in range(blocks):
            for leaf in _BLOCK:
                out[f"{src}.transformer_blocks.{t}.{leaf}"] = f"{dst}.transformer_blocks.{t}.{leaf}"

    for x in range(len(nrb)):
        n = 1 + (nrb[x] + 1) * x
        for i in range(nrb[x]):
            for d, o in _RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{o}"
            d = depth.pop(0)
            if d > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", d)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", max(cfg["transformer_depth_middle"], 0))
    for i, n in enumerate((0, 2)):
        for d, o in _RESNET.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{o}"
    rev = list(reversed(nrb))
    for x in range(len(rev)):
        n, count = (rev[x] + 1) * x, rev[x] + 1
        for i in range(count):
            for d, o in _RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{o}"
            c = 1
            d = depth_out.pop()
            if d > 0:
                c = 2
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
            if i == count - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update(_UNET_BASIC)
    return out


def flux_map(double: int, single: int, hidden: int) -> dict[str, Target]:
    """diffusers FLUX transformer module → original module (comfy/utils.py `flux_to_diffusers`)."""
    out: dict[str, Target] = {}
    h = hidden
    for i in range(double):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{b}.attn.to_{p}"] = Target(f"{d}.img_attn.qkv", (j * h, h))
            out[f"{b}.attn.add_{p}_proj"] = Target(f"{d}.txt_attn.qkv", (j * h, h))
        for src, dst in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                         "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                         "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                         "ff_context.net.0.proj": "txt_mlp.0",
                         "ff_context.net.2": "txt_mlp.2"}.items():  # fmt: skip
            out[f"{b}.{src}"] = Target(f"{d}.{dst}")
    for i in range(single):
        b, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{b}.attn.to_{p}"] = Target(f"{s}.linear1", (j * h, h))
        out[f"{b}.proj_mlp"] = Target(f"{s}.linear1", (3 * h, 4 * h))
        out[f"{b}.norm.linear"] = Target(f"{s}.modulation.lin")
        out[f"{b}.proj_out"] = Target(f"{s}.linear2")
    for src, dst in {"proj_out": "final_layer.linear", "x_embedder": "img_in",
                     "context_embedder": "txt_in",
                     "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                     "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                     "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                     "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                     "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                     "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                     }.items():  # fmt: skip
        out[src] = Target(dst)
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1", swap=True)
    return out


def mmdit_map(blocks: int, hidden: int, attn2: bool = True) -> dict[str, Target]:
    """diffusers SD3 transformer module → original module (comfy/utils.py `mmdit_to_diffusers`;
    `attn2` = the SD3.5-medium entries of current ComfyUI)."""
    out: dict[str, Target] = {}
    h = hidden
    for i in range(blocks):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for n, p in enumerate("qkv"):
            out[f"{b}.attn.to_{p}"] = Target(f"{j}.x_block.attn.qkv", (n * h, h))
            out[f"{b}.attn.add_{p}_proj"] = Target(f"{j}.context_block.attn.qkv", (n * h, h))
            if attn2:
                out[f"{b}.attn2.to_{p}"] = Target(f"{j}.x_block.attn2.qkv", (n * h, h))
        for src, dst in {"norm1_context.linear": "context_block.adaLN_modulation.1",
                         "attn.to_add_out": "context_block.attn.proj",
                         "ff_context.net.0.proj": "context_block.mlp.fc1",
                         "ff_context.net.2": "context_block.mlp.fc2",
                         "norm1.linear": "x_block.adaLN_modulation.1",
                         "attn.to_out.0": "x_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                         "ff.net.2": "x_block.mlp.fc2"}.items():  # fmt: skip
            out[f"{b}.{src}"] = Target(f"{j}.{dst}")
        if attn2:
            out[f"{b}.attn2.to_out.0"] = Target(f"{j}.x_block.attn2.proj")
    for src, dst in {"context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
                     "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                     "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                     "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                     "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                     "proj_out": "final_layer.linear"}.items():  # fmt: skip
        out[src] = Target(dst)
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1", swap=True)
    last = blocks - 1  # ComfyUI: depth - 1, the same block for every real SD3 model
    out[f"transformer_blocks.{last}.norm1_context.linear"] = Target(
        f"joint_blocks.{last}.context_block.adaLN_modulation.1", swap=True
    )
    return out


def z_image_map(n_layers: int, n_refiner: int, dim: int) -> dict[str, Target]:
    """diffusers Z-Image transformer module → original module (comfy/utils.py
    `z_image_to_diffusers`: fused `attention.qkv` sliced dim rows per q/k/v, `attention.out`,
    `x_embedder` / `final_layer.*` for diffusers' `all_x_embedder.2-1` / `all_final_layer.2-1.*`;
    no scale/shift swap anywhere)."""
    out: dict[str, Target] = {}
    blocks = [f"layers.{i}" for i in range(n_layers)]
    blocks += [f"{k}.{i}" for k in ("noise_refiner", "context_refiner") for i in range(n_refiner)]
    for b in blocks:
        for j, p in enumerate("qkv"):
            out[f"{b}.attention.to_{p}"] = Target(f"{b}.attention.qkv", (j * dim, dim))
        out[f"{b}.attention.to_out.0"] = Target(f"{b}.attention.out")
        for leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
            if not (b.startswith("context_refiner") and leaf.startswith("adaLN")):
                out[f"{b}.{leaf}"] = Target(f"{b}.{leaf}")
    for src, dst in {"all_x_embedder.2-1": "x_embedder",
                     "all_final_layer.2-1.linear": "final_layer.linear",
                     "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
                     "cap_embedder.1": "cap_embedder.1", "t_embedder.mlp.0": "t_embedder.mlp.0",
                     "t_embedder.mlp.2": "t_embedder.mlp.2"}.items():  # fmt: skip
        out[src] = Target(dst)
    return out


def flux2_map(double: int, single: int, hidden: int) -> dict[str, Target]:
    """diffusers FLUX.2 transformer module → ComfyUI's weight (comfy/ldm/flux/model.py with
    FLUX.2's params: BFL names, as diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`
    reads them). Reached only through the generic `lora_unet_<X>` / `diffusion_model.<X>` keys:
    ComfyUI's `flux_to_diffusers` is FLUX.1's and has no FLUX.2 entries."""
    out: dict[str, Target] = {}
    h = hidden
    for i in range(double):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{b}.attn.to_{p}"] = Target(f"{d}.img_attn.qkv", (j * h, h))
            out[f"{b}.attn.add_{p}_proj"] = Target(f"{d}.txt_attn.qkv", (j * h, h))
        for src, dst in {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                         "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                         "ff_context.linear_in": "txt_mlp.0",
                         "ff_context.linear_out": "txt_mlp.2"}.items():  # fmt: skip
            out[f"{b}.{src}"] = Target(f"{d}.{dst}")
    for i in range(single):
        b, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{b}.attn.to_qkv_mlp_proj"] = Target(f"{s}.linear1")
        out[f"{b}.attn.to_out"] = Target(f"{s}.linear2")
    for src, dst in {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out":
                     "final_layer.linear",
                     "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
                     "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
                     "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
                     "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
                     "single_stream_modulation.linear": "single_stream_modulation.lin",
                     }.items():  # fmt: skip
        out[src] = Target(dst)
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1", swap=True)
    return out


CLIP_NAMES = {
    "flux2-klein": {},
    "z-image": {},
    "qwen-image": {},
    "sd15": {"text_encoder": "clip_l"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "flux": {"text_encoder": "clip_l"},
}
"""Which ComfyUI/Forge CLIP tower each diffusers text encoder is."""


# -- the loader-side model --------------------------------------------------------------------


@dataclass
class LoaderModel:
    """What a loader has in memory: original-layout weights, and for the test the map back from
    each diffusers module (component, path) to where it lives among them."""

    family: str
    weights: dict[str, torch.Tensor]
    where: dict[tuple[str, str], Target]
    diffusers_paths: dict[str, Target] = field(default_factory=dict)
    """Denoiser diffusers module → Target (everything the family's diffusers map names)."""
    clips: dict[str, str] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    """Every weight key of the model (the generic `lora_unet_<key>` map); `weights` may hold
    only those a test patches (real widths)."""


def _denoiser_map(family: str, config: dict) -> dict[str, Target]:
    if family in ("sd15", "sdxl"):
        return {d: Target(f"diffusion_model.{o}") for d, o in unet_map(unet_config(config)).items()}
    if family == "z-image":
        m = z_image_map(config["n_layers"], config["n_refiner_layers"], config["dim"])
        return {d: Target(f"diffusion_model.{t.key}", t.rows, t.swap) for d, t in m.items()}
    if family == "qwen-image":  # comfy/ldm/qwen_image: the weights have diffusers' names
        from lorakit.models.qwen_image.names import qwen_image_modules

        modules = qwen_image_modules(config["num_layers"])
        return {d: Target(f"diffusion_model.{d}") for d in modules}
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if family == "flux":
        m = flux_map(config["num_layers"], config["num_single_layers"], hidden)
    elif family == "flux2-klein":
        m = flux2_map(config["num_layers"], config["num_single_layers"], hidden)
    else:
        m = mmdit_map(config["num_layers"], hidden)
    return {d: Target(f"diffusion_model.{t.key}", t.rows, t.swap) for d, t in m.items()}


def build_model(
    family: str,
    modules: dict[tuple[str, str], torch.Tensor],
    config: dict,
    other_keys: set[str] = frozenset(),
):
    """The loader's model holding `modules` ((component, diffusers path) → base weight), laid out
    in original names; fused weights get their parts' rows, swapped ones swapped halves.
    `other_keys`: weight keys the model also has but no test patches (not allocated)."""
    denoiser = "unet" if family in ("sd15", "sdxl") else "transformer"
    dmap = _denoiser_map(family, config)
    clips = CLIP_NAMES[family]
    where: dict[tuple[str, str], Target] = {}
    for comp, path in modules:
        if comp == denoiser:
            if path not in dmap:
                continue  # no loader map reaches this module (e.g. SD3 attention norms)
            where[(comp, path)] = dmap[path]
        else:
            where[(comp, path)] = Target(f"{clips[comp]}.transformer.{path}")
    sizes: dict[str, tuple[int, tuple[int, ...]]] = {}
    for cp, t in where.items():
        w = modules[cp]
        end = t.rows[0] + t.rows[1] if t.rows else w.shape[0]
        rows, rest = sizes.get(t.key, (0, tuple(w.shape[1:])))
        sizes[t.key] = (max(rows, end), rest)
    weights = {f"{k}.weight": torch.zeros(r, *rest) for k, (r, rest) in sizes.items()}
    for cp, t in where.items():
        _view(weights, t).copy_(_swap(modules[cp].float()) if t.swap else modules[cp].float())
    return LoaderModel(family, weights, where, dmap, clips, set(weights) | set(other_keys))


def _swap(w: torch.Tensor) -> torch.Tensor:
    """comfy/utils.py swap_scale_shift: exchange the two output halves (its own inverse)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _view(weights: dict[str, torch.Tensor], t: Target) -> torch.Tensor:
    w = weights[f"{t.key}.weight"]
    return w.narrow(0, t.rows[0], t.rows[1]) if t.rows else w


def read_back(model: LoaderModel, cp: tuple[str, str]) -> torch.Tensor:
    """The (patched) weight of diffusers module `cp` as the loader's model holds it."""
    t = model.where[cp]
    v = _view(model.weights, t)
    return _swap(v) if t.swap else v.clone()


# -- key maps ---------------------------------------------------------------------------------


def _clip_keys(model: LoaderModel, comfy: bool) -> dict[str, Target]:
    out: dict[str, Target] = {}
    towers = set(model.clips.values())
    weights = {k.removesuffix(".weight") for k in model.keys}
    for b in range(32):
        for leaf in CLIP_LEAVES:
            kohya_leaf = _u(leaf)
            for tower in ("clip_l", "clip_g"):
                k = f"{tower}.transformer.text_model.encoder.layers.{b}.{leaf}"
                if tower not in towers or k not in weights:
                    continue
                t = Target(k)
                if tower == "clip_l":
                    out[f"lora_te_text_model_encoder_layers_{b}_{kohya_leaf}"] = t
                    out[f"lora_te1_text_model_encoder_layers_{b}_{kohya_leaf}"] = t
                    out[f"text_encoder.text_model.encoder.layers.{b}.{leaf}"] = t
                elif "clip_l" in towers:
                    out[f"lora_te2_text_model_encoder_layers_{b}_{kohya_leaf}"] = t
                    out[f"text_encoder_2.text_model.encoder.layers.{b}.{leaf}"] = t
                else:
                    out[f"lora_te_text_model_encoder_layers_{b}_{kohya_leaf}"] = t
                    out[f"text_encoder.text_model.encoder.layers.{b}.{leaf}"] = t
    if comfy:
        for k in weights:
            if not k.startswith("diffusion_model."):
                out[f"text_encoders.{k}"] = Target(k)
    return out


def key_map(model: LoaderModel, loader: str) -> dict[str, Target]:
    """LoRA key (without suffix) → Target for `loader` ∈ {"comfyui", "forge"}."""
    comfy = loader == "comfyui"
    out: dict[str, Target] = {}
    for k in model.keys:
        if k.startswith("diffusion_model."):
            orig = k.removeprefix("diffusion_model.").removesuffix(".weight")
            out[f"lora_unet_{_u(orig)}"] = Target(k.removesuffix(".weight"))
            out[f"diffusion_model.{orig}"] = Target(k.removesuffix(".weight"))
            if comfy:
                out[f"lora_prior_unet_{_u(orig)}"] = Target(k.removesuffix(".weight"))
    for path, t in model.diffusers_paths.items():
        if model.family in ("sd15", "sdxl"):
            out[f"lora_unet_{_u(path)}"] = t
            out[f"lycoris_{_u(path)}"] = t
            legacy = path.replace(".to_", ".processor.to_")
            legacy = legacy[:-2] if legacy.endswith(".to_out.0") else legacy
            out[legacy] = out[f"unet.{legacy}"] = t
        elif model.family == "z-image" and comfy:  # comfy/lora.py, the Lumina2 branch
            for key in ("diffusion_model.", "transformer.", "lycoris_", ""):
                out[key + (_u(path) if key == "lycoris_" else path)] = t
        elif model.family == "qwen-image" and comfy:  # comfy/lora.py, the QwenImage branch
            for key in ("transformer.", "lycoris_", ""):
                out[key + (_u(path) if key == "lycoris_" else path)] = t
        elif model.family == "flux" or (model.family == "sd3" and comfy):
            out[f"transformer.{path}"] = t
            out[f"lycoris_{_u(path)}"] = t
            out[f"lora_transformer_{_u(path)}"] = t
            if model.family == "sd3":
                out[f"base_model.model.{path}"] = t
    return out | _clip_keys(model, comfy)


# -- load_lora: which tensors each mapped key reads -------------------------------------------

_LORA_NAMES = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
               ("lora.up.weight", "lora.down.weight"),
               ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"))  # fmt: skip
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


@dataclass
class Patch:
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    dora_scale: torch.Tensor | None


def load_lora(tensors: dict[str, torch.Tensor], kmap: dict[str, Target]):
    """→ ([(Target, Patch)], keys read). Follows comfy/lora.py load_lora: alpha and dora_scale
    first, then LoRA (first matching name pair; `_lora.up` old form omitted), LoHa, LoKr."""
    patches, read = [], set()
    for x, target in kmap.items():
        alpha = tensors.get(f"{x}.alpha")
        if alpha is not None:
            read.add(f"{x}.alpha")
            alpha = float(alpha)
        dora = tensors.get(f"{x}.dora_scale")
        if dora is not None:
            read.add(f"{x}.dora_scale")
        for up, down in _LORA_NAMES:
            if f"{x}.{up}" in tensors:
                t = {"up": tensors[f"{x}.{up}"], "down": tensors[f"{x}.{down}"]}
                read |= {f"{x}.{up}", f"{x}.{down}"}
                patches.append((target, Patch("lora", t, alpha, dora)))
                break
        else:
            if f"{x}.hada_w1_a" in tensors:
                t = {n: tensors[f"{x}.{n}"] for n in _LOHA}
                read |= {f"{x}.{n}" for n in _LOHA}
                patches.append((target, Patch("loha", t, alpha, dora)))
            elif any(f"{x}.{n}" in tensors for n in _LOKR):
                t = {n: tensors[f"{x}.{n}"] for n in _LOKR if f"{x}.{n}" in tensors}
                read |= {f"{x}.{n}" for n in t}
                patches.append((target, Patch("lokr", t, alpha, dora)))
    return patches, read


def _diff(p: Patch, shape: torch.Size) -> tuple[torch.Tensor, float]:
    """(update before scaling, scale) — the weight adapters' calculate_weight."""
    t = {k: v.float() for k, v in p.tensors.items()}
    if p.kind == "lora":
        scale = p.alpha / t["down"].shape[0] if p.alpha is not None else 1.0
        diff = t["up"].flatten(1) @ t["down"].flatten(1)
    elif p.kind == "loha":
        scale = p.alpha / t["hada_w1_b"].shape[0] if p.alpha is not None else 1.0
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = p.alpha / dim if p.alpha is not None and dim is not None else 1.0
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2)
    return diff.reshape(shape), scale


def apply(model: LoaderModel, patches) -> list[str]:
    """Patch the model's weights in place at strength 1; → targets that are not in the model
    (ComfyUI/Forge skip those patches)."""
    missing = []
    for target, p in patches:
        key = f"{target.key}.weight"
        if key not in model.keys:
            missing.append(target.key)
            continue
        if key not in model.weights:
            continue  # a weight the test did not allocate (key coverage only)
        w = _view(model.weights, target)
        diff, scale = _diff(p, w.shape)
        update = scale * diff
        if target.swap:
            update = _swap(update)
        if p.dora_scale is None:
            w += update
            continue
        # weight_decompose: dora_scale on the output axis → norm of the ORIGINAL rows
        calc = w + update
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        norm = norm + torch.finfo(w.dtype).eps
        w.copy_(calc * (p.dora_scale.float() / norm))
    return missing


@dataclass
class Result:
    model: LoaderModel
    unread: list[str]
    """File keys the loader never read (ComfyUI: "lora key not loaded"; Forge: unmatched)."""
    not_applied: list[str]
    rejected: bool = False
    """Forge: more than 12 unmatched keys, the LoRA was skipped."""


def load(loader: str, model: LoaderModel, tensors: dict[str, torch.Tensor]) -> Result:
    """Load `tensors` into a copy of `model` the way `loader` does (weights no patch touches
    are shared with `model`, not copied)."""
    patches, read = load_lora(tensors, key_map(model, loader))
    unread = sorted(set(tensors) - read)
    if loader == "forge" and len(unread) > 12:
        return Result(model, unread, [], rejected=True)
    hit = {f"{t.key}.weight" for t, _ in patches} & set(model.weights)
    weights = {k: v.clone() if k in hit else v for k, v in model.weights.items()}
    model = dataclasses.replace(model, weights=weights)
    return Result(model, unread, apply(model, patches))


def comfy_dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """ComfyUI/Forge's DoRA weight for base `w`, scaled update `delta`, output-axis magnitude."""
    norm = w.reshape(w.shape[0], -1).norm(dim=1) + torch.finfo(w.dtype).eps
    return (w + delta) * (magnitude / norm).reshape(-1, *[1] * (w.dim() - 1))


def peft_dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft's (and lorakit's training) DoRA weight: rows of W + ΔW rescaled to the magnitude."""
    calc = w + delta
    norm = calc.reshape(calc.shape[0], -1).norm(dim=1)
    return calc * (magnitude / norm).reshape(-1, *[1] * (w.dim() - 1))
