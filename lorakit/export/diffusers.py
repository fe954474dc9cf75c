"""diffusers / peft format: `unet.<path>.lora_A.weight`, `…lora_B.weight`, no alpha tensors.

Alpha and per-module ranks go into the `lora_adapter_metadata` header (JSON of LoraConfig kwargs
per component, keys prefixed `unet.`), which `load_lora_weights` reads. Without it a LoRA trained
with alpha ≠ rank reloads at the wrong strength.

FLUX and SD3 files are also what ComfyUI (and Forge, for FLUX) load, and they ignore the header:
a key without `.alpha` is applied at scale 1.0 (comfy/weight_adapter/lora.py). So for those
families the scale is FOLDED: lora_B holds up·alpha/rank and alpha = rank (header included), and
every loader applies the trained strength. `.alpha` tensors are not an option: diffusers' SD3
loader rejects any key without "lora" in it (SD3LoraLoaderMixin.load_lora_weights, "Invalid LoRA
checkpoint"; its FLUX loader would accept them), and one rule for both keeps the files alike.
SD1.5/SDXL files keep the trained tensors (alpha in the header): only diffusers/peft read them.
"""

from __future__ import annotations

import json

import torch

from lorakit.errors import LorakitError
from lorakit.export import metadata as md
from lorakit.lora import Adapter, LoraWeights
from lorakit.models.base import Family

METADATA_KEY = "lora_adapter_metadata"
FILENAME = "pytorch_lora_weights.safetensors"


def strength(family: Family) -> str:
    """`folded` (families whose diffusers-format files ComfyUI/Forge load too: the scale is
    folded into lora_B) or `header` (see metadata.PER_FILE): `family.diffusers_strength`."""
    return family.diffusers_strength


def stored(adapter: Adapter, family: Family) -> Adapter:
    """The adapter as this format stores it: plain LoRA only; folded families with
    up·alpha/rank and alpha = rank (the same ΔW)."""
    for (component, path), w in sorted(adapter.modules.items()):
        if not isinstance(w, LoraWeights) or getattr(w, "magnitude", None) is not None:
            raise LorakitError(
                f"Module '{component}.{path}' is not a plain LoRA; the diffusers LoRA layout "
                "cannot hold it. Export it with the LyCORIS exporter (--format lycoris)."
            )
    if strength(family) != "folded":
        return adapter
    modules = {
        cp: LoraWeights(w.down, w.up * (w.alpha / w.rank), float(w.rank))
        if w.alpha != w.rank
        else w
        for cp, w in adapter.modules.items()
    }
    return Adapter(adapter.family, modules, adapter.metadata)


def to_state_dict(adapter: Adapter, family: Family, **_: object) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for (component, path), w in sorted(stored(adapter, family).modules.items()):
        out[f"{component}.{path}.lora_A.weight"] = w.down.contiguous()
        out[f"{component}.{path}.lora_B.weight"] = w.up.contiguous()
    return out


def _peft_name(path: str, prefix: str) -> str:
    """Module name for the peft config. The tensor keys keep the canonical `text_model.` level,
    but diffusers strips it from the keys (not from this config) when the installed
    CLIPTextModel lacks it (transformers 5); peft matches names by suffix, so the name without
    the prefix fits both layouts."""
    return path.removeprefix(prefix) if prefix else path


def peft_metadata(adapter: Adapter, family: Family | None = None) -> dict:
    packed: dict = {}
    prefixes = {t.component: t.canonical_prefix for t in family.targets} if family else {}
    for component in adapter.components():
        rank, alpha, rank_pattern, alpha_pattern = adapter.rank_alpha(component)
        pre = prefixes.get(component, "")
        paths = sorted(_peft_name(p, pre) for c, p in adapter.modules if c == component)
        rank_pattern = {_peft_name(p, pre): r for p, r in rank_pattern.items()}
        alpha_pattern = {_peft_name(p, pre): a for p, a in alpha_pattern.items()}
        kwargs = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": paths,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "use_rslora": False,
        }
        packed.update({f"{component}.{k}": v for k, v in kwargs.items()})
    return packed


def detect(keys: list[str]) -> bool:
    return bool(keys) and all(".lora_A." in k or ".lora_B." in k for k in keys)


def from_state_dict(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], family: Family
) -> Adapter:
    components = {t.component for t in family.targets}
    packed = json.loads(meta[METADATA_KEY]) if meta.get(METADATA_KEY) else {}
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, t in tensors.items():
        component, _, rest = key.partition(".")
        path, _, kind = rest.rpartition(".lora_")
        if component not in components or path not in family.known_modules(component):
            unmapped.append(key)
            continue
        pairs.setdefault((component, path), {})[kind.split(".")[0]] = t
    if unmapped:
        raise LorakitError(
            f"{len(unmapped)} diffusers keys do not name a module of {family.name}: "
            f"{', '.join(unmapped[:8])}{' …' if len(unmapped) > 8 else ''}. Nothing was written."
        )
    modules = {}
    for (component, path), parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise LorakitError(f"diffusers module '{component}.{path}' lacks lora_A or lora_B.")
        down = parts["A"].float()
        pattern = packed.get(f"{component}.alpha_pattern", {})
        pre = next(t.canonical_prefix for t in family.targets if t.component == component)
        alpha = pattern.get(path, pattern.get(_peft_name(path, pre)))
        if alpha is None:
            alpha = packed.get(f"{component}.lora_alpha", down.shape[0])
        modules[(component, path)] = LoraWeights(down, parts["B"].float(), float(alpha))
    return Adapter(family.name, modules, dict(meta))


def write_metadata(adapter: Adapter, family: Family, tensors, **_: object) -> dict[str, str]:
    adapter = stored(adapter, family)
    rank, alpha, _, _ = adapter.rank_alpha(_main_component(adapter, family))
    kohya_only = ("lorakit.kohya_names", "lorakit.fused", "lorakit.split_fused", *md.PER_FILE)
    meta = {k: v for k, v in adapter.metadata.items() if k not in kohya_only}
    meta["lorakit.strength"] = strength(family)
    meta = md.finalize(meta, family, tensors, rank, alpha)
    meta[METADATA_KEY] = json.dumps(peft_metadata(adapter, family), indent=2, sort_keys=True)
    meta["format"] = "pt"
    return meta


def _main_component(adapter: Adapter, family: Family) -> str:
    """The denoiser's (rank, alpha) is what `ss_network_dim`/`ss_network_alpha` describe."""
    comps = adapter.components()
    return family.denoiser_name if family.denoiser_name in comps else comps[0]
