"""`lorakit inspect FILE`: what a LoRA file is and whether every key lands on a module.

Works on files lorakit did not write: the format is detected from the keys (kohya, diffusers,
LyCORIS and the `export.importers` layouts). The file goes through the same reading as `export`,
`resize` and `merge` (`export.read_tensors`, `export.adapter_from`): a damaged file — a module
without its up weight, ranks that disagree, a 1-D factor, an alpha that is not one number, for
LoRA, DoRA, LoHa and LoKr alike — fails here with the very paragraph `export` prints. The family
is the one whose fixed tables place the most modules (ties: the one the metadata names).

What is shown comes from the file as stored (fused qkv modules keep their fused rank), per
component; components lorakit reads but never trains (FLUX's T5) are marked as kept.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path


def _components(family, modules, diffusers: bool) -> dict[str, object]:
    """Module key → the family target it belongs to (absent: none). kohya keys are looked up
    in the kohya tables (every naming: FLUX/SD3 split names use their own prefix), else by the
    target's key prefix."""
    targets = {t.component: t for t in family.targets}
    if diffusers:
        return {k: targets[c] for k in modules if (c := k.partition(".")[0]) in targets}
    from lorakit.export import kohya

    table = {}
    for naming in kohya.NAMINGS:
        table |= {k: e.component for k, e in kohya.key_table(family, naming).items()}
    out = {}
    for key in modules:
        fits = [t for t in family.targets if key.startswith(t.kohya_prefix)]
        target = targets.get(table.get(key)) or max(
            fits, key=lambda t: len(t.kohya_prefix), default=None
        )
        if target is not None:
            out[key] = target
    return out


def _group_name(key: str, target, diffusers: bool) -> str:
    """`transformer: attn.to_q`, `unet: attn1_to_k`: the component and the module's leaf after
    its last block index."""
    if diffusers:
        head, _, rest = key.partition(".")
    else:
        prefix = re.match(r"lora_[a-z0-9]+_", key)
        rest = key[prefix.end() :] if prefix else key
        head = prefix.group(0).rstrip("_") if prefix else key
    if target is not None:
        head = target.component
    sep = r"[.]" if diffusers else r"[._]"
    leaf = re.split(rf"(?:^|{sep})\d+{sep}", rest)[-1]
    return f"{head}: {leaf}"


def inspect_file(path: str | Path, allow_pickle: bool = False) -> dict:
    from lorakit.export import read_as, read_tensors, validate
    from lorakit.models import FAMILIES

    path = Path(path)
    tensors, meta, source, fmt = read_tensors(path, allow_pickle)  # damaged → one paragraph
    modules = validate.split_modules(tensors, fmt.name)
    ranking = validate.rank_families(fmt.name, modules, meta)
    family, unmapped = ranking[0]
    also: list[str] = []
    if not unmapped:
        # the reader `export` uses, so a file inspect passes is one export can convert (and
        # the family it picks, shapes included, is the one shown)
        clean = {k: v for k, v in meta.items() if k != "format"}
        adapter, also = read_as(tensors, clean, fmt, path)
        family = adapter.family
    hint = validate.family_hint(meta)
    also = also if hint != family else []
    fam = FAMILIES[family]
    diffusers = validate.layout(fmt.name) == "diffusers"
    packed = json.loads(meta.get("lora_adapter_metadata") or "{}")
    groups: dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set()})
    components: dict[str, dict] = {}
    kinds = set()
    owners = _components(fam, modules, diffusers)
    for key, m in modules.items():
        target = owners.get(key)
        alpha = m.alpha
        if diffusers:  # no alpha tensors: the peft header (or alpha = rank)
            comp, _, module_path = key.partition(".")
            alpha = packed.get(f"{comp}.alpha_pattern", {}).get(module_path)
            alpha = float(alpha if alpha is not None else packed.get(f"{comp}.lora_alpha", m.rank))
        g = groups[_group_name(key, target, diffusers)]
        g["modules"] += 1
        g["ranks"].add(m.rank)
        g["alphas"].add(alpha)
        kinds.add(m.kind)
        if target is not None and key not in unmapped:
            c = components.setdefault(
                target.component,
                {"modules": 0, "label": target.label, "trained": target.trained},
            )
            c["modules"] += 1
    shown = {
        k: v if len(v) <= 300 else v[:300] + f"… ({len(v)} chars)"
        for k, v in sorted(meta.items())
        if k != "lora_adapter_metadata"
    }
    return {
        "file": str(path),
        "format": source or fmt.name,
        "family": family,
        "family_also_fits": also,
        "kind": "/".join(sorted(kinds)),
        "components": components,
        "groups": {
            k: {
                "modules": g["modules"],
                "rank": sorted(g["ranks"]),  # 0: a LoKr whose factors are both full
                "alpha": sorted(g["alphas"]),
            }
            for k, g in sorted(groups.items())
        },
        "modules": len(modules),
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


def component_line(name: str, c: dict) -> str:
    label = f"{c['label']} ({name})" if c["label"] else name
    n = c["modules"]
    line = f"  {label}: {n} module{'' if n == 1 else 's'}"
    if not c["trained"]:
        # lorakit has no trainer for it, but must not lose it: say what happens to it
        line += (
            f", kept; lorakit does not train {c['label'] or name} (applied when that encoder "
            "is loaded, carried through export)"
        )
    return line


def render(info: dict) -> str:
    family = info["family"]
    if info["family_also_fits"]:
        family += f" (the keys fit {', '.join(info['family_also_fits'])} too; no metadata says)"
    lines = [
        f"file:        {info['file']}",
        f"format:      {info['format']}",
        f"family:      {family}",
        f"kind:        {info['kind']}",
        f"modules:     {info['modules']}",
        f"parameters:  {info['parameters']:,}",
        f"trigger:     {info['trigger_phrase'] or '(none)'}",
    ]
    if info["components"]:
        lines.append("components:")
        lines += [component_line(n, c) for n, c in sorted(info["components"].items())]
    lines.append("groups (modules, rank, alpha):")
    for name, g in info["groups"].items():
        r = "/".join("full" if x == 0 else str(x) for x in g["rank"])
        a = "/".join(f"{x:g}" for x in g["alpha"])
        lines.append(f"  {name:<48} {g['modules']:>4}  r={r:<6} alpha={a}")
    if info["metadata"]:
        lines.append("metadata:")
        width = max(len(k) for k in info["metadata"])
        lines += [f"  {k:<{width}}  {v}" for k, v in info["metadata"].items()]
    lines.append(check_line(info))
    return "\n".join(lines)
