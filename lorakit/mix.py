"""Mixing adapters of one family: `ΔW = Σᵢ wᵢ·ΔWᵢ` per module, as one plain LoRA.

Two commands use it:

- `lorakit merge-loras A.safetensors:0.7 B.safetensors:0.5 --rank R --out C.safetensors`: the
  weighted sum re-factorised by truncated SVD to rank R (`lorakit/resize.py`, the best rank-R
  approximation in Frobenius norm), written in the family's default export format (or
  `--format`), with the sources (file names, sha256, weights) and the retained energy in the
  header. Without `--rank` every module keeps the full rank of the sum (exact).
- `lorakit sample --adapter A.safetensors:0.8 --adapter B.safetensors:1`: the exact sum applied
  to the base model (`combine`), one grid titled with the adapters and their weights.

Conventions. A module's ΔW is `[out, in]` (Linear) or `[out, in, kh, kw]` (Conv2d); as a matrix
it is `[out, in·kh·kw]`. Every input kind is first written as exact LoRA factors
`up [out, k] @ down [k, in·kh·kw]` (`as_lora`): LoRA as it is (k = r, scale alpha/r); LoHa
`(A₁B₁) ⊙ (A₂B₂)` as the row-wise Kronecker (Khatri–Rao) product of its factors (k = r₁·r₂);
LoKr `kron(W₁, W₂)` as `kron(U₁, U₂) @ kron(V₁, V₂)` with `Wᵢ = UᵢVᵢ` (its `_a/_b` pair, or the
full matrix against an identity on its smaller side; conv `lokr_w2 [b, d, kh, kw]` is read as
`[b, d·kh·kw]`, as peft's `make_kron` lays it out). The sum of several modules is then one LoRA
whose factors are the concatenation `up = [w₁s₁up₁ | w₂s₂up₂ | …]`, `down = [down₁; down₂; …]`
with alpha = rank (scale 1): exact, and no dense ΔW is ever formed. DoRA is refused: it rescales
each row of `W + ΔW` to a trained norm, so its update depends on the base weight and is no ΔW
that adds up with another adapter's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.lora import Adapter, AdapterWeights, LoraWeights, canonical_name

SOURCE_KEYS = (
    "modelspec.title",
    "modelspec.trigger_phrase",
    "modelspec.architecture",
    "ss_base_model_version",
    "ss_output_name",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_steps",
    "sshs_model_hash",
    "lorakit.base_model",
    "lorakit.version",
)
"""Header keys of each source recorded in the merged file's `lorakit.merged_from`."""

SHARED_KEYS = (
    "lorakit.base_model",
    "ss_sd_model_name",
    "ss_base_model_version",
    "modelspec.architecture",
    "modelspec.resolution",
    "ss_resolution",
    "lorakit.text_length",
)
"""Header keys the merged file keeps when every source has the same value."""


@dataclass(frozen=True)
class Source:
    """One adapter of a mix: its file, weight, what was read and the file's sha256."""

    path: Path
    weight: float
    adapter: Adapter
    fmt: str
    sha256: str
    name: str = ""
    """How labels call the file: its name, or `folder/name` where two sources share a name
    (two runs' `lorakit.safetensors`)."""

    @property
    def label(self) -> str:
        """`style.safetensors:0.8`, the command line's own spelling (ASCII: grid fonts)."""
        return f"{self.name or self.path.name}:{self.weight:g}"


def display_names(paths: list[Path]) -> list[str]:
    """File names, with their folder where two of them share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def parse_spec(spec: str, option: str) -> tuple[Path, float]:
    """`FILE` or `FILE:WEIGHT` → (path, weight); weight 1 when none is given. A colon whose tail
    is a path (`C:\\…`) or that belongs to an existing file name is part of the path."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or tail.startswith(("\\", "/")) or Path(spec).exists():
        return Path(spec), 1.0
    try:
        weight = float(tail)
    except ValueError:
        raise LorakitError(
            f"{option} '{spec}': the weight '{tail}' after the last ':' is not a number. Write "
            f"FILE:WEIGHT with a number, e.g. {option} {head}:0.8 (or FILE alone for weight 1)."
        ) from None
    if not math.isfinite(weight):
        raise LorakitError(
            f"{option} '{spec}': the weight must be a finite number, got '{tail}'. Write "
            f"FILE:WEIGHT, e.g. {option} {head}:0.8."
        )
    return Path(head), weight


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sources(
    specs: list[tuple[Path, float]], option: str, allow_pickle: bool = False
) -> list[Source]:
    """Read every adapter of a mix (any format lorakit reads); one paragraph when they are not
    of one family, when a module they share has different shapes (another variant or size of
    the family), or when one holds DoRA modules."""
    from lorakit.export import read_adapter

    if not specs:
        raise LorakitError(f"Give at least one adapter ({option} FILE:WEIGHT).")
    sources = []
    names = display_names([p for p, _ in specs])
    for (path, weight), name in zip(specs, names, strict=True):
        adapter, fmt = read_adapter(path, allow_pickle=allow_pickle)
        sources.append(Source(path, weight, adapter, fmt, file_sha256(path), name))
    families = {s.adapter.family for s in sources}
    if len(families) > 1:
        listed = "; ".join(f"'{s.path}' is {s.adapter.family}" for s in sources)
        raise LorakitError(
            f"These adapters are for different model families ({listed}). A LoRA changes the "
            "weights of one architecture, so only adapters of one family can be mixed: give "
            f"{option} adapters of one family (`lorakit inspect FILE` shows a file's family)."
        )
    shapes: dict[tuple[str, str], tuple[tuple[int, int], Source]] = {}
    for s in sources:
        dora = [f"{c}.{p}" for (c, p), w in s.adapter.modules.items() if _is_dora(w)]
        if dora:
            raise LorakitError(
                f"'{s.path}' is a DoRA adapter ({len(dora)} modules, e.g. {dora[0]}). DoRA "
                "rescales every row of W + ΔW to a trained norm, so its update depends on the "
                "base weights and cannot be added to another adapter's ΔW. Sample it on its own "
                "(`lorakit sample FILE`), or mix plain LoRA, LoHa or LoKr adapters."
            )
        for key, w in s.adapter.modules.items():
            shape = _matrix_shape(w)
            seen = shapes.setdefault(key, (shape, s))
            if seen[0] != shape:
                raise LorakitError(
                    f"'{seen[1].path}' and '{s.path}' are both {s.adapter.family} adapters, but "
                    f"their module {key[0]}.{key[1]} updates a {_fmt_shape(seen[0])} weight in "
                    f"one and a {_fmt_shape(shape)} weight in the other: they were trained on "
                    "different variants or sizes of the model, whose weights do not add up. "
                    f"Mix adapters trained on the same base model (`lorakit inspect FILE` shows "
                    "each file's modules and metadata)."
                )
    return sources


def _is_dora(w: AdapterWeights) -> bool:
    return isinstance(w, LoraWeights) and w.magnitude is not None


def _fmt_shape(shape: tuple[int, int]) -> str:
    return f"[{shape[0]} out, {shape[1]} in]"


def _matrix_shape(w: AdapterWeights) -> tuple[int, int]:
    """(out, in·kh·kw) of the weight a module updates."""
    if isinstance(w, LoraWeights):
        return int(w.up.shape[0]), int(w.down[0].numel())
    t = w.tensors
    if w.kind == "loha":
        return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1])
    (a, c), (b, d) = _lokr_shape(t, 1), _lokr_shape(t, 2)
    return a * b, c * d


def _lokr_shape(t: dict[str, torch.Tensor], i: int) -> tuple[int, int]:
    if f"lokr_w{i}" in t:
        w = t[f"lokr_w{i}"]
        return int(w.shape[0]), int(w[0].numel())
    return int(t[f"lokr_w{i}_a"].shape[0]), int(t[f"lokr_w{i}_b"][0].numel())


def _factors(t: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr factor i as (U [m, k], V [k, n]) with U @ V = Wᵢ (conv layouts flattened)."""
    if f"lokr_w{i}" not in t:
        return t[f"lokr_w{i}_a"].double(), t[f"lokr_w{i}_b"].double().flatten(1)
    w = t[f"lokr_w{i}"].double().flatten(1)
    m, n = w.shape
    eye = torch.eye(min(m, n), dtype=w.dtype)
    # the identity goes on the smaller side, so k = min(m, n) (the most W can need)
    return (w, eye) if n <= m else (eye, w)


def as_lora(w: AdapterWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors (up `[out, k]`, down `[k, in·kh·kw]`, float64) with `up @ down` = the
    module's ΔW as a matrix, scale included. DoRA is refused by `read_sources` first."""
    if isinstance(w, LoraWeights):
        up = w.up.double().flatten(1) * (w.alpha / w.rank)
        return up, w.down.double().flatten(1)
    t, scale = w.tensors, w.alpha / w.rank
    if w.kind == "loha":
        a1, a2 = t["hada_w1_a"].double(), t["hada_w2_a"].double()
        b1, b2 = t["hada_w1_b"].double(), t["hada_w2_b"].double()
        # Σ_ij a1[o,i]·a2[o,j]·b1[i,n]·b2[j,n] = (a1 b1)[o,n]·(a2 b2)[o,n]
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up * scale, down
    u1, v1 = _factors(t, 1)
    u2, v2 = _factors(t, 2)
    return torch.kron(u1, u2) * scale, torch.kron(v1, v2)


def _kernels(family_name: str) -> dict[tuple[str, str], tuple[int, ...]]:
    """(component, path with block indices as `#`) → conv kernel size (`()` for Linear), from
    the family's tiny model: a kernel is fixed by the architecture, not by its width or depth.
    Needed for LoHa/LoKr modules only, whose factors store a conv's `in·kh·kw` flattened."""
    cached = _KERNELS.get(family_name)
    if cached is None:
        from lorakit.export import tiny_modules

        cached = {}
        for target, name, m in tiny_modules(family_name):
            path = _generic(canonical_name(target, name))
            if isinstance(m, torch.nn.Conv2d):
                cached[(target.component, path)] = tuple(m.kernel_size)
            elif isinstance(m, torch.nn.Linear):
                cached[(target.component, path)] = ()
        _KERNELS[family_name] = cached
    return cached


_KERNELS: dict[str, dict[tuple[str, str], tuple[int, ...]]] = {}


def _generic(path: str) -> str:
    return ".".join("#" if part.isdigit() else part for part in path.split("."))


def _module_kernel(family: str, key: tuple[str, str], weights: list[AdapterWeights]):
    """The conv kernel of a module (`()` for Linear): from a LoRA's down `[r, in, kh, kw]` when
    one of the sources has one, else from the architecture."""
    for w in weights:
        if isinstance(w, LoraWeights):
            return tuple(w.down.shape[2:])
    kernel = _kernels(family).get((key[0], _generic(key[1])))
    if kernel is None:
        raise LorakitError(
            f"Module {key[0]}.{key[1]} is not a module of the {family} architecture lorakit "
            "knows, so the layout of its LoHa/LoKr factors (Linear or conv) cannot be told. "
            "Mix adapters whose modules `lorakit inspect FILE` reports as all mapped."
        )
    return kernel


def _to_weights(up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...]) -> LoraWeights:
    """float64 factors (scale folded into up) → a LoRA with alpha = rank, conv-shaped."""
    k = up.shape[1]
    if kernel:
        up = up[:, :, None, None]
        down = down.reshape(k, -1, *kernel)
    return LoraWeights(down.float().contiguous(), up.float().contiguous(), float(k))


def combine(sources: list[Source]) -> Adapter:
    """The mix as one plain LoRA adapter, exact: every module's factors concatenated with their
    weights folded in (`up @ down = Σᵢ wᵢ·ΔWᵢ`), alpha = rank. Modules only some sources have
    get only theirs. Metadata: `mix_metadata`."""
    if all(s.weight == 0 for s in sources):
        raise LorakitError(
            "Every adapter of the mix has weight 0, so it changes nothing (that is the base "
            "model). Give at least one adapter a non-zero weight (FILE:WEIGHT)."
        )
    family = sources[0].adapter.family
    keys = sorted({k for s in sources for k in s.adapter.modules})
    modules = {}
    for key in keys:
        parts = [(s.weight, s.adapter.modules[key]) for s in sources if key in s.adapter.modules]
        ups, downs = [], []
        for weight, w in parts:
            if weight == 0:
                continue  # adds only zero columns
            up, down = as_lora(w)
            ups.append(up * weight)
            downs.append(down)
        if not ups:
            continue
        kernel = _module_kernel(family, key, [w for _, w in parts])
        modules[key] = _to_weights(torch.cat(ups, 1), torch.cat(downs, 0), kernel)
    return Adapter(family, modules, mix_metadata(sources))


def mix_label(sources: list[Source]) -> str:
    """`style.safetensors:0.8 + product.safetensors:1` (messages and metadata)."""
    return " + ".join(s.label for s in sources)


CAPTION_LINE_H = 12


def caption_lines(sources: list[Source]) -> list[str]:
    """The caption above a mix's grid: one line per adapter with its weight and sha256 prefix."""
    lines = [f"{len(sources)} adapters mixed (weight x file):"]
    lines += [f"  {s.weight:g} x {s.name}  (sha256 {s.sha256[:12]})" for s in sources]
    return lines


def captioned(image, sources: list[Source]):
    """`image` (a PIL grid) under a band listing the mix's adapters and weights, wrapped to its
    width, so the grid file says what it shows wherever it is copied to."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    chars = max(24, image.width // 6)  # the default font is about 6 px a character
    lines = [w for line in caption_lines(sources) for w in textwrap.wrap(line, chars)]
    band = CAPTION_LINE_H * len(lines) + 8
    out = Image.new("RGB", (image.width, image.height + band), (250, 250, 250))
    ImageDraw.Draw(out).multiline_text(
        (4, 4), "\n".join(lines), fill=(20, 20, 20), font=font, spacing=2
    )
    out.paste(image, (0, band))
    return out


def mix_metadata(sources: list[Source]) -> dict[str, str]:
    """Header of a mix: the sources (`lorakit.merged_from`: file, sha256, weight, format and
    their identifying keys), the keys every source agrees on, every source's trigger phrase."""
    metas = [s.adapter.metadata for s in sources]
    meta = {"lorakit.family": sources[0].adapter.family}
    for key in SHARED_KEYS:
        values = {m.get(key) for m in metas}
        if len(values) == 1 and None not in values:
            meta[key] = values.pop()
    if "lorakit.base_model" not in meta:  # sampling needs one: the first source that says
        base = next((m["lorakit.base_model"] for m in metas if m.get("lorakit.base_model")), "")
        if base:
            meta["lorakit.base_model"] = base
    triggers = []
    for m in metas:
        for t in m.get("modelspec.trigger_phrase", "").split(","):
            if t.strip() and t.strip() not in triggers:
                triggers.append(t.strip())
    meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    resolution = next((m["modelspec.resolution"] for m in metas if "modelspec.resolution" in m), "")
    if resolution:
        meta.setdefault("modelspec.resolution", resolution)
    meta["modelspec.description"] = f"Mix of {mix_label(sources)} (lorakit merge-loras)"
    meta["lorakit.merged_from"] = json.dumps(
        [
            {
                "file": s.name,
                "sha256": s.sha256,
                "weight": s.weight,
                "format": s.fmt,
                "metadata": {k: v for k, v in s.adapter.metadata.items() if k in SOURCE_KEYS},
            }
            for s in sources
        ],
        ensure_ascii=False,
    )
    return meta


@dataclass
class MergeResult:
    path: Path
    fmt: str
    adapter: Adapter
    """The merged adapter as written (plain LoRA, alpha = rank)."""
    energy: float
    """Retained Frobenius energy over all modules: Σ kept s² / Σ s²."""
    modules: dict[str, tuple[int, float]] = field(default_factory=dict)
    """`component.path` → (rank written, retained energy of that module)."""
    sources: list[Source] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def merge_loras(
    specs: list[tuple[Path, float]],
    out: Path,
    *,
    rank: int | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> MergeResult:
    """Weighted sum of the adapters' ΔW, re-factorised by SVD to `rank` per module (None: the
    full rank of the sum, exact), written atomically as `fmt` (default: the family's) to `out`
    and checked by re-reading the tensors it writes. Nothing is written when any check
    refuses: the output path, the sources, the rank, the format."""
    from lorakit.export import EXPORTERS, prepare, write_prepared
    from lorakit.models import get_family
    from lorakit.resize import resize_module

    out = Path(out)
    if out.suffix != ".safetensors":
        raise LorakitError(
            f"--out '{out}' must be a .safetensors file (the merged adapter), e.g. "
            "--out merged.safetensors."
        )
    for path, _ in specs:
        if path.exists() and out.exists() and out.resolve() == path.resolve():
            raise LorakitError(
                f"--out '{out}' is one of the adapters being merged; lorakit never overwrites a "
                "source. Choose another --out."
            )
    if out.exists() and not overwrite:
        raise LorakitError(
            f"--out '{out}' already exists. Choose another path, or pass --overwrite to replace it."
        )
    if out.exists() and not out.is_file():
        raise LorakitError(f"--out '{out}' exists and is not a file; choose another path.")
    if rank is not None and rank < 1:
        raise LorakitError(f"--rank must be 1 or more (got {rank}).")
    if fmt is not None and fmt not in EXPORTERS:
        raise LorakitError(f"--format '{fmt}' is unknown; choose {', '.join(EXPORTERS)}.")
    sources = read_sources(specs, "merge-loras", allow_pickle)
    family = get_family(sources[0].adapter.family)
    fmt = fmt or family.default_export_format
    summed = combine(sources)
    caps = {key: min(*_matrix_shape_lora(w), w.rank) for key, w in summed.modules.items()}
    most = max(caps.values())
    if rank is not None and rank > most:
        widest = max(caps, key=caps.get)
        raise LorakitError(
            f"--rank {rank} is more than the mix can have: the largest rank of any module's sum "
            f"is {most} ({widest[0]}.{widest[1]}: at most the sources' ranks added up, and at "
            f"most its smaller weight dimension). Pass --rank {most} or less (leave --rank out "
            "for the exact sum at full rank)."
        )
    modules, per, num, den = {}, {}, 0.0, 0.0
    for key, w in summed.modules.items():
        new, kept, total = resize_module(w, rank=min(rank or caps[key], caps[key]))
        modules[key] = new
        per[f"{key[0]}.{key[1]}"] = (new.rank, kept)
        num, den = num + kept * total, den + total
    energy = num / den if den else 1.0
    meta = dict(summed.metadata)
    meta["lorakit.merge_rank"] = str(rank) if rank is not None else "full"
    meta["lorakit.retained_energy"] = repr(energy)
    meta["lorakit.retained_energy_min"] = repr(min(e for _, e in per.values()))
    meta["ss_output_name"] = out.name.removesuffix(".safetensors")
    meta["modelspec.title"] = meta["ss_output_name"]
    merged = Adapter(family.name, modules, meta)
    prepared = prepare(merged, fmt)  # refusals (a format that cannot name a module) write nothing
    _check_readback(prepared, merged, family, out)
    notes = _notes(sources)
    write_prepared(prepared, out)
    return MergeResult(out, fmt, merged, energy, per, sources, notes)


def _matrix_shape_lora(w: LoraWeights) -> tuple[int, int]:
    return int(w.up.shape[0]), int(w.down[0].numel())


def _check_readback(prepared, merged: Adapter, family, out: Path) -> None:
    """Read the tensors about to be written back with the format's own reader and compare every
    module's ΔW with the merged adapter's (a fused or renamed module caught before writing)."""
    from lorakit.export import EXPORTERS

    back = EXPORTERS[prepared.fmt].from_state_dict(prepared.tensors, prepared.metadata, family)
    for key, w in merged.modules.items():
        got = back.modules.get(key)
        want = w.delta()
        if got is None or (got.delta().reshape(want.shape) - want).abs().max() > 1e-4 * (
            1 + want.abs().max()
        ):
            raise LorakitError(
                f"Export check failed for '{out}' ({prepared.fmt}): module {key[0]}.{key[1]} does "
                "not read back as written; nothing was written. Try another --format and report "
                "this as a lorakit bug."
            )


def _notes(sources: list[Source]) -> list[str]:
    """Differences worth a line (not a refusal): sources made for other variants' metadata."""
    notes = []
    archs = {s.adapter.metadata.get("modelspec.architecture") for s in sources} - {None}
    if len(archs) > 1:
        notes.append(
            f"the sources name different base models ({', '.join(sorted(archs))}); their "
            "module shapes agree, so they were mixed"
        )
    return notes
