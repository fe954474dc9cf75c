"""LyCORIS format: kohya-style keys carrying LyCORIS tensors — what ComfyUI and A1111/Forge load
for LoHa, LoKr and DoRA. Written to `OUT/<name>.lycoris.safetensors` (its own file, next to the
kohya `OUT/<name>.safetensors`).

Per module key `K` (one diffusers/transformers module, 1:1 — names from the kohya exporter's
`diffusers` naming table; LyCORIS tensors are never fused into BFL/SD3 qkv modules): SD1.5/SDXL
`lora_unet_<diffusers path _>` (ComfyUI/Forge map UNet diffusers names), FLUX/SD3
`lora_transformer_<diffusers path _>` (ComfyUI maps these for FLUX and SD3, Forge for FLUX;
`lora_unet_` + a diffusers path is read by neither), text encoders `lora_te…`:

    LoRA   K.lora_down.weight [r, in(,kh,kw)], K.lora_up.weight [out, r(,1,1)], K.alpha
    DoRA   the LoRA tensors + K.dora_scale [out, 1(,1,1)] (peft's lora_magnitude_vector,
           reshaped to the output-axis layout that ComfyUI/LyCORIS test with
           `dora_scale.shape[0] == out`)
    LoHa   K.hada_w1_a [out, r], K.hada_w1_b [r, in], K.hada_w2_a, K.hada_w2_b, K.alpha
    LoKr   K.lokr_w1 (or K.lokr_w1_a/_b), K.lokr_w2 (or K.lokr_w2_a [b, r], K.lokr_w2_b [r, d]),
           K.alpha; when both factors are full, alpha = rank and the scale is baked into w2

ΔW scale is always `alpha / rank` (rank = the inner dim of the decomposed factor), as in
ComfyUI's weight adapters. rsLoRA files already carry alpha' = alpha·√r (lorakit/lora.py).

DoRA caveat (`DORA_NOTE`): peft normalises each output row of W + ΔW; ComfyUI/Forge's
output-axis DoRA (comfy/weight_adapter/base.py `weight_decompose`, Forge's copy in
backend/patcher/lora.py) divides by the norm of the ORIGINAL W instead, so there a DoRA file
applies a slightly different weight (exact in lorakit and peft). They also swap the (scale,
shift) halves of FLUX/SD3's final adaLN update but not its `dora_scale`, so DoRA on those modules
is refused (`_check_dora`).
"""

from __future__ import annotations

import json

import torch

from lorakit.errors import LorakitError
from lorakit.export import metadata as md
from lorakit.lora import Adapter, LoraWeights, LycorisWeights
from lorakit.models.base import Family

FILENAME_SUFFIX = ".lycoris.safetensors"
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "dora_scale")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
SUFFIXES = (*LORA_SUFFIXES, *LOHA_SUFFIXES, *LOKR_SUFFIXES, "alpha")
SPECIFIC = ("dora_scale", *LOHA_SUFFIXES, *LOKR_SUFFIXES)
DORA_NOTE = (
    "ComfyUI and Forge apply DoRA normalising each output row by the norm of the base weight ‖W‖, "
    "where training (peft, lorakit) normalises by ‖W + ΔW‖, so there the adapter acts slightly "
    "differently from how it trained (lorakit and peft apply it exactly)."
)


def _names(family: Family, naming: str = "diffusers") -> dict[tuple[str, str], str]:
    """(component, diffusers path) → kohya module key (1:1 modules only)."""
    from lorakit.export import kohya

    prefixes = kohya.prefixes(family, naming)
    out = {}
    for key, entry in kohya.key_table(family, naming).items():
        if len(entry.parts) == 1:
            out[(entry.component, entry.parts[0])] = key
    # the prefix decides the component when several share a path shape
    return {k: v for k, v in out.items() if v.startswith(prefixes[k[0]])}


def _swapped(family: Family, component: str, path: str, w: LoraWeights) -> bool:
    """Does the loaders' map swap the (scale, shift) halves of this module's update (FLUX/SD3
    final adaLN, SD3's last context adaLN)? Same rule as the kohya exporter's original names."""
    from lorakit.export import kohya

    for entry in kohya.key_table(family, "original").values():
        if entry.component == component and entry.parts == (path,) and entry.swap:
            return entry.swap is True or w.up.shape[0] == 2 * w.down.shape[1]
    return False


def _check_dora(adapter: Adapter, family: Family) -> None:
    bad = [
        (c, p)
        for (c, p), w in sorted(adapter.modules.items())
        if isinstance(w, LoraWeights) and w.magnitude is not None and _swapped(family, c, p, w)
    ]
    if bad:
        raise LorakitError(
            f"{', '.join(f'{c}.{p}' for c, p in bad)} carries DoRA, but ComfyUI and Forge swap the "
            "(scale, shift) halves of this adaLN's update and not its dora_scale, so they would "
            "rescale the wrong rows. Nothing was written. Train DoRA without "
            f"{' / '.join(p for _, p in bad)} in lora.target_modules, or use plain LoRA (or "
            "LoHa/LoKr) there."
        )


def to_state_dict(adapter: Adapter, family: Family, **_: object) -> dict[str, torch.Tensor]:
    _check_dora(adapter, family)
    names = _names(family)
    out: dict[str, torch.Tensor] = {}
    for (component, path), w in sorted(adapter.modules.items()):
        key = names.get((component, path))
        if key is None:
            raise LorakitError(
                f"Module '{component}.{path}' has no kohya name for {family.name}; nothing "
                "was written."
            )
        if isinstance(w, LycorisWeights):
            for name, t in sorted(w.tensors.items()):
                out[f"{key}.{name}"] = t.contiguous()
        else:
            out[f"{key}.lora_down.weight"] = w.down.contiguous()
            out[f"{key}.lora_up.weight"] = w.up.contiguous()
            if w.magnitude is not None:
                rest = [1] * (w.down.dim() - 1)
                out[f"{key}.dora_scale"] = w.magnitude.reshape(w.up.shape[0], *rest).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def detect(keys: list[str]) -> bool:
    """LyCORIS-specific tensors present, every key in the kohya `lora_…` layout."""
    prefixes = ("lora_", "lycoris_")  # `lycoris_`: see kohya.detect
    if not keys or not all(k.startswith(prefixes) and _suffix(k) in SUFFIXES for k in keys):
        return False
    return any(_suffix(k) in SPECIFIC for k in keys)


def _suffix(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else ""


def from_state_dict(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], family: Family
) -> Adapter:
    # names this exporter writes, and the `lora_unet_` + diffusers path of older FLUX/SD3 files
    table = {key: cp for cp, key in _names(family).items()}
    if family.kohya_split_prefix:
        table |= {key: cp for cp, key in _names(family, "legacy").items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, _, suffix = key.partition(".")
        groups.setdefault(base, {})[suffix] = t
    unmapped = sorted(b for b in groups if b not in table)
    if unmapped:
        raise LorakitError(
            f"{len(unmapped)} LyCORIS keys do not name a module of {family.name}: "
            f"{', '.join(unmapped[:8])}{' …' if len(unmapped) > 8 else ''}."
        )
    modules = {}
    for base, parts in groups.items():
        alpha_t = parts.pop("alpha", None)
        if set(parts) & set(LOHA_SUFFIXES):
            modules[table[base]] = _loha(base, parts, alpha_t)
        elif set(parts) & set(LOKR_SUFFIXES):
            modules[table[base]] = _lokr(base, parts, alpha_t)
        else:
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise LorakitError(f"Module '{base}' lacks lora_down or lora_up weights.")
            down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
            mag = parts.get("dora_scale")
            if mag is not None and mag.shape[0] != up.shape[0]:
                raise LorakitError(
                    f"Module '{base}' has an input-axis dora_scale {tuple(mag.shape)}; lorakit "
                    "(like peft) supports only output-axis DoRA."
                )
            alpha = float(alpha_t) if alpha_t is not None else float(down.shape[0])
            magnitude = None if mag is None else mag.float().reshape(up.shape[0])
            modules[table[base]] = LoraWeights(down, up, alpha, magnitude)
    return Adapter(family.name, modules, dict(meta))


def _loha(base: str, parts: dict[str, torch.Tensor], alpha_t) -> LycorisWeights:
    missing = [s for s in LOHA_SUFFIXES if s not in parts]
    if missing or set(parts) - set(LOHA_SUFFIXES):
        raise LorakitError(
            f"LoHa module '{base}' has tensors {sorted(parts)}; lorakit reads exactly "
            f"{', '.join(LOHA_SUFFIXES)} (no Tucker/CP decomposition)."
        )
    rank = int(parts["hada_w1_b"].shape[0])
    alpha = float(alpha_t) if alpha_t is not None else float(rank)
    return LycorisWeights("loha", {k: v.float() for k, v in parts.items()}, alpha, rank)


def _lokr(base: str, parts: dict[str, torch.Tensor], alpha_t) -> LycorisWeights:
    if set(parts) - set(LOKR_SUFFIXES):
        raise LorakitError(f"LoKr module '{base}' has unsupported tensors {sorted(parts)}.")
    has_w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)
    has_w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
    if not (has_w1 and has_w2):
        raise LorakitError(f"LoKr module '{base}' lacks a factor ({sorted(parts)}).")
    # ComfyUI: alpha / dim with dim = the decomposed factor's rank; both full → scale 1
    dim = next((int(parts[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)
    if dim is None:
        rank, alpha = 1, 1.0
    else:
        rank = dim
        alpha = float(alpha_t) if alpha_t is not None else float(dim)
    return LycorisWeights("lokr", {k: v.float() for k, v in parts.items()}, alpha, rank)


def write_metadata(adapter: Adapter, family: Family, tensors, **_: object) -> dict[str, str]:
    comps = adapter.components()
    main = family.denoiser_name if family.denoiser_name in comps else comps[0]
    rank, alpha, _, _ = adapter.rank_alpha(main)
    drop = ("lora_adapter_metadata", "lorakit.split_fused", "lorakit.kohya_names", "lorakit.fused")
    meta = {k: v for k, v in adapter.metadata.items() if k not in drop + md.PER_FILE}
    kind = adapter.kind()
    algo = {"lora": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr"}[kind]
    args = {"algo": algo}
    if kind == "dora":
        args["dora_wd"] = "True"
    meta["ss_network_module"] = "lycoris.kohya"
    meta["ss_network_args"] = json.dumps(args)
    meta["lorakit.adapter_kind"] = kind
    meta["lorakit.strength"] = "alpha"
    if kind == "dora":
        meta["lorakit.dora_note"] = DORA_NOTE
    return md.finalize(meta, family, tensors, rank, alpha)
