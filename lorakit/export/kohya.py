"""kohya / A1111 / ComfyUI format: `<prefix><original module path with '_'>.lora_down.weight`,
`.lora_up.weight` and `.alpha` (always written: stacks that miss it assume alpha = rank).

Module names come from fixed tables (`models.naming.Entry`), never from `named_modules()`:
- `original` naming (default): what kohya's own trainers write and every stack reads — the
  family's ORIGINAL names (`family.kohya_original_table()`, from `models/<family>/names.py`:
  diffusers names where kohya trains on the diffusers model, else the original checkpoint's
  names, with fused projections such as q|k|v);
- `diffusers` naming: diffusers paths, one key per diffusers module: the component's own kohya
  prefix + path for the UNet families (read by ComfyUI, A1111/Forge, diffusers); for the
  transformer families `family.kohya_split_prefix` + path, because there `lora_unet_` means an
  ORIGINAL name to every loader.

Fusing split LoRAs (q, k, v[, mlp]) into one original module is exact: the fused LoRA is
block-diagonal in rank (down = concat of downs, up = block-diagonal of ups, rank = Σ ranks), so
its ΔW is the concatenation of the parts' ΔWs; missing parts are zero rows. Reading splits the
fused up by output rows and keeps, per part, only the rank columns that are non-zero in its rows,
so a lorakit-fused file splits back into the very same tensors (and any other into the same ΔW).
"""

from __future__ import annotations

import json
from functools import cache

import torch

from lorakit.errors import LorakitError
from lorakit.export import metadata as md
from lorakit.lora import Adapter, LoraWeights
from lorakit.models.base import Family
from lorakit.models.naming import Entry, identity_table

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
NAMINGS = ("original", "diffusers")
# What `original` means is the family's (`family.kohya_names`, recorded as
# `lorakit.kohya_names`). For the transformer families the `diffusers` naming has a denoiser
# prefix of its own (`family.kohya_split_prefix`, OneTrainer's `lora_transformer_`, which ComfyUI
# maps to diffusers names): their `lora_unet_` keys are built from
# the ORIGINAL model's weight names, so `lora_unet_` + a diffusers path matched nothing (issue
# #17); such files written by older lorakit versions are still read (the `legacy` table).


def _original_table(family: Family) -> dict:
    table = family.kohya_original_table()
    return table if table is not None else identity_table(family)


def prefixes(family: Family, naming: str = "original") -> dict[str, str]:
    """Component → kohya key prefix under `naming` (`legacy`: lora_unet_ + diffusers paths)."""
    out = {t.component: t.kohya_prefix for t in family.targets}
    if naming == "diffusers" and family.kohya_split_prefix:
        out[family.denoiser_name] = family.kohya_split_prefix
    return out


@cache
def _tables(family: Family) -> dict[str, dict[str, tuple[str, Entry]]]:
    """naming → {kohya module key → (component, Entry)}; reading tries them in this order."""
    builds = [("original", _original_table), ("diffusers", identity_table)]
    if family.kohya_split_prefix:
        builds.append(("legacy", identity_table))
    out = {}
    for naming, build in builds:
        pre = prefixes(family, naming)
        out[naming] = {
            pre[comp] + orig.replace(".", "_"): (comp, entry)
            for (comp, orig), entry in build(family).items()
        }
    return out


def lookup(family: Family, base: str) -> tuple[str, Entry] | None:
    """(component, Entry) of a kohya module key under any naming lorakit writes or wrote."""
    return next((t[base] for t in _tables(family).values() if base in t), None)


def key_table(family: Family, naming: str = "original") -> dict[str, Entry]:
    """kohya module key → Entry (which diffusers modules it stands for)."""
    return {k: e for k, (_, e) in _tables(family)[naming].items()}


def _swaps(entry: Entry, up: torch.Tensor, down: torch.Tensor) -> bool:
    return entry.swaps(up.shape[0], down.shape[1])


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    a, b = up.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _plain(w, where: str) -> LoraWeights:
    if not isinstance(w, LoraWeights) or getattr(w, "magnitude", None) is not None:
        kind = "DoRA" if isinstance(w, LoraWeights) else type(w).__name__
        raise LorakitError(
            f"Module '{where}' is a {kind} adapter, which the plain kohya LoRA layout cannot "
            "hold. Export it with the LyCORIS exporter (--format lycoris) instead."
        )
    return w


def fuse(entry: Entry, parts: list[LoraWeights | None], where: str = "") -> LoraWeights:
    """Combine the LoRAs of `entry.parts` (None = part has no LoRA) into one exact LoRA of the
    fused module. Equal scales keep the tensors and set alpha = scale × Σ rank; unequal scales
    are baked into `up` with alpha = Σ rank."""
    present = [(i, w) for i, w in enumerate(parts) if w is not None]
    if len(parts) == 1:
        w = parts[0]
        if not _swaps(entry, w.up, w.down):
            return w
        return LoraWeights(w.down, _swap_halves(w.up), w.alpha)
    i0, w0 = present[0]
    base = w0.up.shape[0] // entry.mults[i0]
    widths = [m * base for m in entry.mults]
    for i, w in present:
        if w.up.shape[0] != widths[i] or w.down.shape[1] != w0.down.shape[1]:
            raise LorakitError(
                f"The LoRAs fused into '{where}' have inconsistent shapes "
                f"({entry.parts[i]}: up {tuple(w.up.shape)}, expected {widths[i]} rows)."
            )
    scales = {w.alpha / w.rank for _, w in present}
    rank = sum(w.rank for _, w in present)
    down = torch.cat([w.down for _, w in present], dim=0)
    up = torch.zeros(sum(widths), rank, dtype=w0.up.dtype)
    row, col = [0, *torch.tensor(widths).cumsum(0).tolist()], 0
    for i, w in present:
        u = w.up if len(scales) == 1 else w.up * (w.alpha / w.rank)
        up[row[i] : row[i + 1], col : col + w.rank] = u
        col += w.rank
    alpha = scales.pop() * rank if len(scales) == 1 else float(rank)
    return LoraWeights(down, up, float(alpha))


def split(entry: Entry, w: LoraWeights, where: str = "") -> dict[str, LoraWeights]:
    """Inverse of `fuse`: exact ΔW per part; parts whose rows are all zero are left out."""
    if len(entry.parts) == 1:
        if _swaps(entry, w.up, w.down):
            w = LoraWeights(w.down, _swap_halves(w.up), w.alpha)
        return {entry.parts[0]: w}
    total = w.up.shape[0]
    if total % sum(entry.mults):
        raise LorakitError(
            f"'{where}' has {total} output rows, which do not split into "
            f"{'/'.join(p.rsplit('.', 1)[-1] for p in entry.parts)} in the ratio "
            f"{':'.join(map(str, entry.mults))}; the file was made for another architecture."
        )
    base = total // sum(entry.mults)
    row_spans, row = [], 0
    for m in entry.mults:
        row_spans.append((row, row + m * base))
        row += m * base
    blocks = _equal_blocks(w, row_spans)
    out = {}
    for i, (path, (r0, r1)) in enumerate(zip(entry.parts, row_spans, strict=False)):
        rows = w.up[r0:r1]
        cols = blocks[i] if blocks is not None else (rows != 0).any(dim=0)
        n = int(cols.sum())
        if n == 0:
            continue
        out[path] = LoraWeights(w.down[cols].clone(), rows[:, cols].clone(), w.alpha * n / w.rank)
    return out


def _equal_blocks(w: LoraWeights, row_spans: list[tuple[int, int]]) -> list | None:
    """Column masks when the fused LoRA is block-diagonal with equal ranks per part — the layout
    `fuse` writes for parts trained with one rank. Then every part comes back with its own
    columns, also a part whose update is still exactly zero (e.g. before the first lr step)."""
    n = len(row_spans)
    if w.rank % n:
        return None
    size = w.rank // n
    masks = []
    for i, (r0, r1) in enumerate(row_spans):
        mask = torch.zeros(w.rank, dtype=torch.bool)
        mask[i * size : (i + 1) * size] = True
        if (w.up[r0:r1][:, ~mask] != 0).any():
            return None  # not this layout: fall back to the non-zero columns
        masks.append(mask)
    return masks


def to_state_dict(
    adapter: Adapter, family: Family, naming: str = "original", **_: object
) -> dict[str, torch.Tensor]:
    if naming not in NAMINGS:
        raise LorakitError(f"kohya naming '{naming}' is unknown; choose {', '.join(NAMINGS)}.")
    covered: set[tuple[str, str]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, (comp, entry) in sorted(_tables(family)[naming].items()):
        parts = [adapter.modules.get((comp, p)) for p in entry.parts]
        if all(w is None for w in parts):
            continue
        parts = [
            None if w is None else _plain(w, f"{comp}.{p}")
            for w, p in zip(parts, entry.parts, strict=False)
        ]
        covered |= {(comp, p) for p, w in zip(entry.parts, parts, strict=False) if w is not None}
        w = fuse(entry, parts, key)
        out[f"{key}.lora_down.weight"] = w.down.contiguous()
        out[f"{key}.lora_up.weight"] = w.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    left = sorted(f"{c}.{p}" for c, p in set(adapter.modules) - covered)
    if left:
        raise LorakitError(
            f"{len(left)} adapter modules have no kohya name for {family.name}: "
            f"{', '.join(left[:8])}. Nothing was written."
        )
    return out


def detect(keys: list[str]) -> bool:
    # `lycoris_`: a family's diffusers-name prefix where ComfyUI maps no `lora_…` one (Z-Image)
    prefixes = ("lora_", "lycoris_")
    return bool(keys) and all(k.startswith(prefixes) and k.endswith(SUFFIXES) for k in keys)


def group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        base, suffix = next(((key[: -len(s)], s) for s in SUFFIXES if key.endswith(s)), (key, ""))
        groups.setdefault(base, {})[suffix] = t
    return groups


def unmapped_keys(keys: list[str], family: Family) -> list[str]:
    """Module keys (without suffix) of a kohya file that name no module of `family`."""
    tables = _tables(family)
    return sorted(
        {b for b in group(dict.fromkeys(keys)) if not any(b in t for t in tables.values())}
    )


def from_state_dict(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], family: Family
) -> Adapter:
    tables = _tables(family)
    groups = group(tensors)
    unmapped = sorted(b for b in groups if not any(b in t for t in tables.values()))
    if unmapped:
        raise LorakitError(
            f"{len(unmapped)} kohya keys do not name a module of {family.name}: "
            f"{', '.join(unmapped[:8])}{' …' if len(unmapped) > 8 else ''}. The file was made for "
            "another model family or architecture; nothing was written."
        )
    modules: dict[tuple[str, str], LoraWeights] = {}
    fused = 0
    for base, parts in sorted(groups.items()):
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise LorakitError(f"kohya module '{base}' lacks lora_down or lora_up weights.")
        comp, entry = lookup(family, base)
        down, up = parts[".lora_down.weight"].float(), parts[".lora_up.weight"].float()
        if down.shape[0] != up.shape[1]:
            raise LorakitError(
                f"kohya module '{base}': lora_down {tuple(down.shape)} and lora_up "
                f"{tuple(up.shape)} disagree on the rank; the file is damaged."
            )
        alpha = parts.get(".alpha")
        w = LoraWeights(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
        fused += entry.fused
        for path, pw in split(entry, w, base).items():
            if (comp, path) in modules:
                raise LorakitError(
                    f"'{comp}.{path}' is named twice in the file (fused and split keys); "
                    "the file is inconsistent."
                )
            modules[(comp, path)] = pw
    meta = {k: v for k, v in meta.items() if k not in ("lorakit.kohya_names", "lorakit.fused")}
    if fused:
        meta["lorakit.split_fused"] = str(fused)
    return Adapter(family.name, modules, meta)


def fused_note(family: Family, tensors: dict[str, torch.Tensor], naming: str) -> dict[str, str]:
    """Metadata recording the names used and how fusing changed ranks (`ss_network_dim` keeps
    the per-projection rank)."""
    if naming == "diffusers":
        return {"lorakit.kohya_names": "diffusers"}
    note = {"lorakit.kohya_names": family.kohya_names}
    table = _tables(family)["original"]
    ranks = {
        k.removesuffix(".lora_down.weight"): int(t.shape[0])
        for k, t in tensors.items()
        if k.endswith(".lora_down.weight") and table[k.removesuffix(".lora_down.weight")][1].fused
    }
    if ranks:
        note["lorakit.fused"] = json.dumps(
            {
                "note": "split q/k/v(/mlp) LoRAs fused block-diagonally into the original fused "
                "modules; rank = sum of the parts' ranks; ΔW is exact",
                "ranks": ranks,
            },
            sort_keys=True,
        )
    return note


def write_metadata(
    adapter: Adapter, family: Family, tensors, naming: str = "original", **_: object
) -> dict[str, str]:
    rank, alpha, _, _ = adapter.rank_alpha(_main_component(adapter, family))
    drop = ("lora_adapter_metadata", "lorakit.split_fused", *md.PER_FILE)
    meta = {k: v for k, v in adapter.metadata.items() if k not in drop}
    meta |= fused_note(family, tensors, naming)
    meta["lorakit.strength"] = "alpha"  # every module has its .alpha tensor
    return md.finalize(meta, family, tensors, rank, alpha)


def _main_component(adapter: Adapter, family: Family) -> str:
    """The denoiser's (rank, alpha) is what `ss_network_dim`/`ss_network_alpha` describe."""
    comps = adapter.components()
    return family.denoiser_name if family.denoiser_name in comps else comps[0]
