"""`lorakit inspect FILE`: what a LoRA file is and whether every key lands on a module.

Works on files lorakit did not write: the format is detected from the keys (kohya, diffusers and
the `export.importers` layouts), the family is the one whose fixed tables place the most keys.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from lorakit.errors import LorakitError


def _unmapped(fmt: str, keys: list[str], family) -> list[str]:
    from lorakit.export import kohya

    if fmt == "kohya":
        return kohya.unmapped_keys(keys, family)
    comps = {t.component for t in family.targets}
    bad = set()
    for key in keys:
        comp, _, rest = key.partition(".")
        path = rest.rpartition(".lora_")[0]
        if comp not in comps or path not in family.known_modules(comp):
            bad.add(f"{comp}.{path}" if path else key)
    return sorted(bad)


def _group_name(module_key: str) -> str:
    """`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` → `lora_unet … attn1_to_q`:
    the component prefix and the leaf after the last block index."""
    head = module_key.split(".")[0] if "." in module_key and "lora_" not in module_key[:5] else ""
    leaf = re.split(r"[._]\d+[._]", module_key)[-1]
    prefix = head or module_key.split("_")[0] + "_" + module_key.split("_")[1]
    return f"{prefix}: {leaf}"


def inspect_file(path: str | Path, allow_pickle: bool = False) -> dict:
    from lorakit.export import EXPORTERS, check_tensors, importers, read_safetensors
    from lorakit.export.kohya import group
    from lorakit.models import FAMILIES

    path = Path(path)
    tensors, meta = read_safetensors(path, allow_pickle)
    check_tensors(tensors, path)
    tensors, meta, source = importers.normalize(tensors, {k: v for k, v in meta.items()})
    keys = list(tensors)
    fmt = next((f.name for f in EXPORTERS.values() if f.detect(keys)), None)
    if fmt is None:
        raise LorakitError(
            f"'{path}' is not a LoRA file lorakit recognises: its keys "
            f"({', '.join(keys[:3])} …) match none of the formats {', '.join(EXPORTERS)}."
        )
    scores = {n: _unmapped(fmt, keys, f) for n, f in FAMILIES.items()}
    version = meta.get("ss_base_model_version", "")
    family = min(
        scores,
        key=lambda n: (len(scores[n]), FAMILIES[n].base_model_version != version),
    )
    unmapped = scores[family]
    # module groups: rank/alpha of each module, grouped by leaf
    packed = json.loads(meta.get("lora_adapter_metadata") or "{}")
    groups: dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set()})
    if fmt == "kohya":
        for base, parts in group(tensors).items():
            down = parts.get(".lora_down.weight")
            if down is None:
                continue
            alpha = parts.get(".alpha")
            g = groups[_group_name(base)]
            g["modules"] += 1
            g["ranks"].add(int(down.shape[0]))
            g["alphas"].add(float(alpha) if alpha is not None else float(down.shape[0]))
    else:
        for key, t in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.rpartition(".lora_A.")[0]
            comp = module.split(".")[0]
            alpha = packed.get(f"{comp}.alpha_pattern", {}).get(module.partition(".")[2])
            if alpha is None:
                alpha = packed.get(f"{comp}.lora_alpha", int(t.shape[0]))
            leaf = re.split(r"[.]\d+[.]", module)[-1]
            g = groups[f"{comp}: {leaf}"]
            g["modules"] += 1
            g["ranks"].add(int(t.shape[0]))
            g["alphas"].add(float(alpha))
    shown = {
        k: v if len(v) <= 300 else v[:300] + f"… ({len(v)} chars)"
        for k, v in sorted(meta.items())
        if k != "lora_adapter_metadata"
    }
    return {
        "file": str(path),
        "format": source or fmt,
        "family": family,
        "groups": {
            k: {
                "modules": g["modules"],
                "rank": sorted(g["ranks"]),
                "alpha": sorted(g["alphas"]),
            }
            for k, g in sorted(groups.items())
        },
        "modules": sum(g["modules"] for g in groups.values()),
        "parameters": int(sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))),
        "trigger_phrase": meta.get("modelspec.trigger_phrase", ""),
        "metadata": shown,
        "all_keys_mapped": not unmapped,
        "unmapped": unmapped,
    }


def check_line(info: dict) -> str:
    n = len(info["unmapped"])
    if not n:
        return f"every key maps to a module of {info['family']}: yes"
    more = " …" if n > 5 else ""
    return (
        f"every key maps to a module of {info['family']}: no ({n} unmapped: "
        f"{', '.join(info['unmapped'][:5])}{more})"
    )


def render(info: dict) -> str:
    lines = [
        f"file:        {info['file']}",
        f"format:      {info['format']}",
        f"family:      {info['family']}",
        f"modules:     {info['modules']}",
        f"parameters:  {info['parameters']:,}",
        f"trigger:     {info['trigger_phrase'] or '(none)'}",
        "groups (modules, rank, alpha):",
    ]
    for name, g in info["groups"].items():
        r = "/".join(map(str, g["rank"]))
        a = "/".join(f"{x:g}" for x in g["alpha"])
        lines.append(f"  {name:<48} {g['modules']:>4}  r={r:<6} alpha={a}")
    if info["metadata"]:
        lines.append("metadata:")
        width = max(len(k) for k in info["metadata"])
        lines += [f"  {k:<{width}}  {v}" for k, v in info["metadata"].items()]
    lines.append(check_line(info))
    return "\n".join(lines)
