"""kohya / A1111 / ComfyUI format: `lora_unet_<path_with_underscores>.lora_down.weight`.

Keys come from the family's fixed module tables: `known_modules()` gives the real architecture's
dotted paths; the underscore form is built from them, and read back through the same table
(underscores are ambiguous, so the inverse needs the table).
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.export import metadata as md
from lorakit.lora import Adapter, LoraWeights
from lorakit.models.base import Family

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def key_table(family: Family) -> dict[str, tuple[str, str]]:
    """kohya module key → (component, dotted module path) for the family's real architecture."""
    table = {}
    for target in family.targets:
        for path in family.known_modules(target.component):
            table[target.kohya_prefix + path.replace(".", "_")] = (target.component, path)
    return table


def to_state_dict(adapter: Adapter, family: Family) -> dict[str, torch.Tensor]:
    prefixes = {t.component: t.kohya_prefix for t in family.targets}
    out: dict[str, torch.Tensor] = {}
    for (component, path), w in sorted(adapter.modules.items()):
        key = prefixes[component] + path.replace(".", "_")
        out[f"{key}.lora_down.weight"] = w.down.contiguous()
        out[f"{key}.lora_up.weight"] = w.up.contiguous()
        # Always written: stacks that miss it assume alpha = rank (wrong strength).
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def detect(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith("lora_") and k.endswith(SUFFIXES) for k in keys)


def from_state_dict(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], family: Family
) -> Adapter:
    table = key_table(family)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, suffix = next(((key[: -len(s)], s) for s in SUFFIXES if key.endswith(s)), (key, ""))
        groups.setdefault(base, {})[suffix] = t
    unmapped = sorted(b for b in groups if b not in table)
    if unmapped:
        raise LorakitError(
            f"{len(unmapped)} kohya keys do not name a module of {family.name}: "
            f"{', '.join(unmapped[:8])}{' …' if len(unmapped) > 8 else ''}. The file was made for "
            "another model family or architecture; nothing was written."
        )
    modules = {}
    for base, parts in groups.items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise LorakitError(f"kohya module '{base}' lacks lora_down or lora_up weights.")
        down = parts[".lora_down.weight"].float()
        alpha = parts.get(".alpha")
        modules[table[base]] = LoraWeights(
            down=down,
            up=parts[".lora_up.weight"].float(),
            alpha=float(alpha) if alpha is not None else float(down.shape[0]),
        )
    return Adapter(family.name, modules, dict(meta))


def write_metadata(adapter: Adapter, family: Family, tensors) -> dict[str, str]:
    rank, alpha, _, _ = adapter.rank_alpha(_main_component(adapter, family))
    meta = {k: v for k, v in adapter.metadata.items() if k != "lora_adapter_metadata"}
    return md.finalize(meta, family, tensors, rank, alpha)


def _main_component(adapter: Adapter, family: Family) -> str:
    """The denoiser's (rank, alpha) is what `ss_network_dim`/`ss_network_alpha` describe."""
    comps = adapter.components()
    return family.denoiser_name if family.denoiser_name in comps else comps[0]
