"""One check of an adapter file's tensors, shared by `inspect`, `export`, `resize` and `merge`.

Every reader goes through `read_tensors` (lorakit/export/__init__.py), which runs `check_file`
before any family is tried, so a damaged file gets the same one paragraph from every command —
naming the file and the module — instead of a family-by-family list of unrelated errors (or a
traceback). What is checked, per module (kohya/LyCORIS keys `K.<suffix>`, diffusers keys
`<component>.<path>.lora_A/B.weight`):

- LoRA / DoRA: down and up present together; down `[r, in]` or `[r, in, kh, kw]`, up
  `[out, r]` or `[out, r, 1, 1]` (same number of dims), the same r, r ≥ 1; `alpha` one number;
  `dora_scale` one value per output (or per input: the reader explains that layout) row.
- LoHa: all of `hada_w1_a [out, r]`, `hada_w1_b [r, in]`, `hada_w2_a`, `hada_w2_b`, 2-D, each
  pair agreeing on its rank and both products on `[out, in]`.
- LoKr: a first and a second factor, each full (`lokr_w1`) or as an agreeing pair
  (`lokr_w1_a [a, r]`, `lokr_w1_b [r, c]`), no 1-D tensor.

`check_adapter` applies the same rules to an in-memory `Adapter` (after fused modules are split,
and for adapters handed to resize/merge by code), with the same message.

The family of a file is the one whose fixed tables name the most of its modules; ties go to the
family its metadata names (`lorakit.family`, `modelspec.architecture`, `ss_base_model_version`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
FIX = (
    "lorakit reads nothing from a damaged file: download it again, or write it again from its "
    "training run (`lorakit export RUN_FOLDER`)."
)


def layout(fmt: str) -> str:
    """`kohya` (kohya and LyCORIS files: `K.<suffix>`) or `diffusers` (`…lora_A.weight`)."""
    return "diffusers" if fmt == "diffusers" else "kohya"


@dataclass
class FileModule:
    """The tensors of one module of a file, by suffix (`lora_down.weight`, `alpha`,
    `hada_w1_a`, …; diffusers `lora_A.weight`, `lora_B.weight`)."""

    key: str
    """kohya module key (`lora_unet_…`) or diffusers `component.path`."""
    parts: dict[str, torch.Tensor]
    diffusers: bool = False

    @property
    def names(self) -> tuple[str, str]:
        """(down, up) suffixes in this file's layout."""
        if self.diffusers:
            return "lora_A.weight", "lora_B.weight"
        return "lora_down.weight", "lora_up.weight"

    @property
    def kind(self) -> str:
        if any(s in self.parts for s in LOHA):
            return "loha"
        if any(s in self.parts for s in LOKR):
            return "lokr"
        return "dora" if "dora_scale" in self.parts else "lora"

    @property
    def rank(self) -> int:
        """The rank alpha divides by (0: a LoKr whose factors are both full, scale 1)."""
        p = self.parts
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            for k in ("lokr_w2_b", "lokr_w1_b"):
                if k in p:
                    return int(p[k].shape[0])
            return 0
        return int(p[self.names[0]].shape[0])

    @property
    def alpha(self) -> float:
        a = self.parts.get("alpha")
        return float(a) if a is not None else float(self.rank or 1)


def split_modules(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, FileModule]:
    """File keys grouped by module (sorted), in the layout of `fmt`."""
    diffusers = layout(fmt) == "diffusers"
    out: dict[str, FileModule] = {}
    for key in sorted(tensors):
        if diffusers:
            base, sep, rest = key.rpartition(".lora_")
            base, suffix = (base, "lora_" + rest) if sep else (key, "")
        else:
            base, _, suffix = key.partition(".")
        out.setdefault(base, FileModule(base, {}, diffusers)).parts[suffix] = tensors[key]
    return out


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def lora_problem(
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    names: tuple[str, str] = ("lora_down", "lora_up"),
    alpha: torch.Tensor | None = None,
) -> str | None:
    dn, un = (n.removesuffix(".weight") for n in names)
    if down is None or up is None:
        have, lack = (dn, un) if up is None else (un, dn)
        return f"it has {have} but no {lack} (a LoRA needs both)"
    if down.dim() not in (2, 4):
        return f"{dn} has shape {_shape(down)}; it must be [r, in] or [r, in, kh, kw]"
    if up.dim() != down.dim():
        want = "[out, r]" if down.dim() == 2 else "[out, r, 1, 1]"
        return f"{un} has shape {_shape(up)} where {dn} is {_shape(down)}; {un} must be {want}"
    if up.shape[1] != down.shape[0]:
        return (
            f"{dn} {_shape(down)} and {un} {_shape(up)} disagree on the rank "
            f"({down.shape[0]} vs {up.shape[1]})"
        )
    if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"{un} has shape {_shape(up)}; a conv LoRA's up weight is [out, r, 1, 1]"
    if down.shape[0] == 0:
        return f"it has rank 0 ({dn} {_shape(down)})"
    if alpha is not None and alpha.numel() != 1:
        return f"alpha has shape {_shape(alpha)}; it must be one number"
    return None


def _magnitude_problem(mag: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> str | None:
    if mag.numel() not in (up.shape[0], down.shape[1]):
        return (
            f"dora_scale has shape {_shape(mag)}, which fits neither the {up.shape[0]} outputs "
            f"nor the {down.shape[1]} inputs of its LoRA"
        )
    return None


def loha_problem(p: dict[str, torch.Tensor], alpha: torch.Tensor | None = None) -> str | None:
    missing = [s for s in LOHA if s not in p]
    if missing:
        return f"it is a LoHa without {', '.join(missing)} (it needs {', '.join(LOHA)})"
    bad = [s for s in LOHA if p[s].dim() != 2]
    if bad:
        return f"{bad[0]} has shape {_shape(p[bad[0]])}; LoHa factors are 2-D"
    for i in ("1", "2"):
        a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
        if a.shape[1] != b.shape[0]:
            return (
                f"hada_w{i}_a {_shape(a)} and hada_w{i}_b {_shape(b)} disagree on the rank "
                f"({a.shape[1]} vs {b.shape[0]})"
            )
    w1 = (p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1])
    w2 = (p["hada_w2_a"].shape[0], p["hada_w2_b"].shape[1])
    if w1 != w2:
        return f"its two Hadamard factors have different shapes ({w1} vs {w2})"
    if alpha is not None and alpha.numel() != 1:
        return f"alpha has shape {_shape(alpha)}; it must be one number"
    return None


def lokr_problem(p: dict[str, torch.Tensor], alpha: torch.Tensor | None = None) -> str | None:
    flat = [s for s in LOKR if s in p and p[s].dim() < 2]
    if flat:
        return f"{flat[0]} has shape {_shape(p[flat[0]])}; LoKr factors are at least 2-D"
    for i in ("1", "2"):
        a, b = p.get(f"lokr_w{i}_a"), p.get(f"lokr_w{i}_b")
        if f"lokr_w{i}" not in p and (a is None or b is None):
            have = [s for s in (f"lokr_w{i}_a", f"lokr_w{i}_b") if s in p]
            return (
                f"it is a LoKr without its {'first' if i == '1' else 'second'} factor (has "
                f"{', '.join(have) or 'neither'} of lokr_w{i} or lokr_w{i}_a + lokr_w{i}_b)"
            )
        if a is not None and b is not None and a.shape[1] != b.shape[0]:
            return (
                f"lokr_w{i}_a {_shape(a)} and lokr_w{i}_b {_shape(b)} disagree on the rank "
                f"({a.shape[1]} vs {b.shape[0]})"
            )
    if alpha is not None and alpha.numel() != 1:
        return f"alpha has shape {_shape(alpha)}; it must be one number"
    return None


def module_problem(m: FileModule) -> str | None:
    """What is wrong with one module of a file, or None."""
    alpha = m.parts.get("alpha")
    if m.kind == "loha":
        return loha_problem({k: v for k, v in m.parts.items() if k != "alpha"}, alpha)
    if m.kind == "lokr":
        return lokr_problem({k: v for k, v in m.parts.items() if k != "alpha"}, alpha)
    dn, un = m.names
    down, up = m.parts.get(dn), m.parts.get(un)
    problem = lora_problem(down, up, m.names, alpha)
    if problem is None and "dora_scale" in m.parts:
        problem = _magnitude_problem(m.parts["dora_scale"], down, up)
    return problem


def damaged(path, key: str, problem: str, more: int = 0) -> LorakitError:
    also = f" ({more} more module{'s' if more > 1 else ''} too)" if more else ""
    return LorakitError(f"'{path}' is damaged: module '{key}': {problem}{also}. {FIX}")


def check_file(tensors: dict[str, torch.Tensor], fmt: str, path) -> dict[str, FileModule]:
    """Raise one paragraph for the first damaged module (and how many more there are); →
    the file's modules."""
    modules = split_modules(tensors, fmt)
    problems = [(k, p) for k, m in modules.items() if (p := module_problem(m)) is not None]
    if problems:
        key, problem = problems[0]
        raise damaged(path, key, problem, len(problems) - 1)
    return modules


def weights_problem(w) -> str | None:
    """`module_problem` for in-memory weights (`LoraWeights` / `LycorisWeights`)."""
    from lorakit.lora import LycorisWeights

    if isinstance(w, LycorisWeights):
        check = loha_problem if w.kind == "loha" else lokr_problem
        return check(w.tensors)
    problem = lora_problem(w.down, w.up, ("down", "up"))
    if problem is None and w.magnitude is not None and w.magnitude.numel() != w.up.shape[0]:
        return f"it has a DoRA magnitude of shape {_shape(w.magnitude)} for {w.up.shape[0]} outputs"
    return problem


def check_adapter(adapter, path=None) -> None:
    """The same rules on an `Adapter` (module named `component.path`)."""
    problems = [
        (f"{c}.{p}", problem)
        for (c, p), w in sorted(adapter.modules.items())
        if (problem := weights_problem(w)) is not None
    ]
    if problems:
        key, problem = problems[0]
        raise damaged(path or "the adapter", key, problem, len(problems) - 1)


# --- which family ------------------------------------------------------------------------------


def family_hint(meta: dict[str, str]) -> str | None:
    """The family a file's metadata names, if any: lorakit's own key, else the first family
    whose `named_by` accepts the SAI model spec / kohya's `ss_base_model_version`, the later
    registered first (as for `name_hints`: a later family's names may extend an earlier one's)."""
    from lorakit.models import FAMILIES

    name = meta.get("lorakit.family", "")
    if name in FAMILIES:
        return name
    arch = meta.get("modelspec.architecture", "")
    version = meta.get("ss_base_model_version", "")
    later_first = reversed(list(FAMILIES.items()))
    return next(
        (n for n, f in later_first if (arch or version) and f.named_by(arch, version)), None
    )


def unmapped(fmt: str, modules, family) -> list[str]:
    """Module keys of a file that name no module of `family` (kohya: in any naming)."""
    if layout(fmt) == "kohya":
        from lorakit.export.kohya import unmapped_keys

        # LyCORIS files use kohya's module keys too; the kohya tables know every naming
        return unmapped_keys(list(modules), family)
    comps = {t.component for t in family.targets}
    out = []
    for key in modules:
        comp, _, path = key.partition(".")
        if comp not in comps or path not in family.known_modules(comp):
            out.append(key)
    return sorted(out)


def rank_families(
    fmt: str, modules, meta: dict[str, str], forced: str | None = None
) -> list[tuple[str, list[str]]]:
    """[(family, its unmapped module keys)], best first: fewest unmapped, then the family the
    metadata names, then registry order. `forced` = only that family."""
    from lorakit.models import FAMILIES, get_family

    if forced:
        return [(forced, unmapped(fmt, modules, get_family(forced)))]
    hint = family_hint(meta)
    order = list(FAMILIES)
    scored = [(name, unmapped(fmt, modules, fam)) for name, fam in FAMILIES.items()]
    return sorted(scored, key=lambda s: (len(s[1]), s[0] != hint, order.index(s[0])))


def unmapped_error(path, fmt: str, family: str, missing: list[str], total: int, meta) -> str:
    """One paragraph for a file whose closest family still leaves modules unplaced."""
    hint = family_hint(meta)
    if hint == family:
        said = f"its metadata says {family}, but {family} has"
    else:
        said = f"{f'its metadata says {hint}; ' if hint else ''}the closest family, {family}, has"
    shown = ", ".join(missing[:8]) + (" …" if len(missing) > 8 else "")
    return (
        f"'{path}' ({fmt} format): {said} no module for {len(missing)} of its {total} modules "
        f"({shown}). The file was made for another architecture, or by a trainer whose key "
        f"names lorakit does not read; `lorakit inspect {path}` lists every key that does not "
        "fit. Nothing was written."
    )
