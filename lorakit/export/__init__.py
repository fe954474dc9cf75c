"""Adapter file formats (a plain registry) and the read/write entry points.

Every write is atomic, and every file is re-read after writing and compared with what was meant
to be written, so a format bug can never silently ship a smaller or different adapter.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.errors import LorakitError
from lorakit.export import diffusers as diffusers_format
from lorakit.export import kohya as kohya_format
from lorakit.export import lycoris as lycoris_format
from lorakit.fileio import save_safetensors
from lorakit.lora import Adapter


@dataclass(frozen=True)
class Format:
    name: str
    loads_in: str
    """Which inference stacks load this format (shown in help and logs)."""
    default_path: Callable[[Path, str], Path]
    """(output folder, export name) → file path."""
    to_state_dict: Callable
    write_metadata: Callable
    detect: Callable[[list[str]], bool]
    from_state_dict: Callable


EXPORTERS: dict[str, Format] = {
    "kohya": Format(
        "kohya",
        "ComfyUI, A1111/Forge",
        lambda out, name: out / f"{name}.safetensors",
        kohya_format.to_state_dict,
        kohya_format.write_metadata,
        kohya_format.detect,
        kohya_format.from_state_dict,
    ),
    "diffusers": Format(
        "diffusers",
        "diffusers (load_lora_weights), peft",
        lambda out, name: out / "diffusers" / diffusers_format.FILENAME,
        diffusers_format.to_state_dict,
        diffusers_format.write_metadata,
        diffusers_format.detect,
        diffusers_format.from_state_dict,
    ),
    # LoHa / LoKr / DoRA (and plain LoRA) in kohya-style keys, in a file of its own so that
    # `--format all` and export.formats never write two formats to one path
    "lycoris": Format(
        "lycoris",
        "ComfyUI, A1111/Forge",
        lambda out, name: out / f"{name}{lycoris_format.FILENAME_SUFFIX}",
        lycoris_format.to_state_dict,
        lycoris_format.write_metadata,
        lycoris_format.detect,
        lycoris_format.from_state_dict,
    ),
}

KINDS = {"kohya": ("lora",), "diffusers": ("lora",), "lycoris": ("lora", "dora", "loha", "lokr")}
"""Adapter kinds each format can hold."""


def find_adapter(folder: Path, name: str, formats: list[str]) -> Path | None:
    """The first adapter file of `formats` in a run or checkpoint folder. Runs written before
    the LyCORIS file got its own name (`<name>.lycoris.safetensors`) hold it as
    `<name>.safetensors`; they are found too."""
    for fmt in formats:
        path = EXPORTERS[fmt].default_path(folder, name)
        if path.is_file():
            return path
    legacy = folder / f"{name}.safetensors"
    return legacy if "lycoris" in formats and legacy.is_file() else None


def kinds(adapter: Adapter) -> set[str]:
    """The adapter kinds of its modules (`lora`, `dora`, `loha`, `lokr`)."""
    from lorakit.lora import LycorisWeights

    return {
        w.kind if isinstance(w, LycorisWeights) else "lora" if w.magnitude is None else "dora"
        for w in adapter.modules.values()
    }


def holds(fmt: str, adapter: Adapter) -> bool:
    return kinds(adapter) <= set(KINDS[fmt]) and not (fmt == "diffusers" and _kept(adapter))


def _kept(adapter: Adapter) -> list[str]:
    """Components the adapter carries that lorakit keeps but does not train (kohya FLUX files'
    T5 modules, `lora_te3_`): the diffusers format has no key those loaders map for them."""
    from lorakit.models import get_family

    kept = {t.component: t for t in get_family(adapter.family).targets if not t.trained}
    return sorted({comp for comp, _ in adapter.modules if comp in kept})


def loads_in(fmt: str, family: str, naming: str = "original") -> str:
    """The loaders that read a file of `fmt` for `family` at the trained strength (for
    messages): the family's `loaders` where it says, else the format's `loads_in`.
    tests/test_export_matrix.py checks these with the loaders' rules, and the README's "Load the
    adapter" table says the same. diffusers also reads SD1.5/SDXL/FLUX kohya files, but its
    converters lose per-module alphas, so it is named for its own format only."""
    from lorakit.models import get_family

    table = get_family(family).loaders
    return table.get((fmt, naming)) or table.get((fmt,)) or EXPORTERS[fmt].loads_in


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Prepared:
    """An export ready to write: its tensors (in the stored dtype) and header."""

    fmt: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def prepare(
    adapter: Adapter, fmt: str, *, naming: str = "original", dtype: str = "fp32"
) -> Prepared:
    """Build the file `fmt` holds for `adapter` without writing anything: every refusal (a kind
    the format cannot hold, a module it cannot name) happens here, before any file exists.

    `naming` (kohya only): `original` (SGM/BFL/SD3 names, fused projections) or `diffusers`.
    `dtype`: storage dtype of the LoRA weights (`.alpha` stays fp32)."""
    from lorakit.models import get_family

    family = get_family(adapter.family)
    exporter = EXPORTERS[fmt]
    if dtype not in DTYPES:
        raise LorakitError(f"Export dtype '{dtype}' is unknown; choose {', '.join(DTYPES)}.")
    kept = _kept(adapter) if fmt == "diffusers" else []
    if kept:
        raise LorakitError(
            f"This adapter carries LoRA modules for {', '.join(kept)} (kept from a kohya file; "
            "lorakit does not train them), which the diffusers format cannot pass on: diffusers "
            "ignores those keys, ComfyUI drops them and Forge skips a file with that many "
            "unmatched keys. Write --format kohya (or lycoris), which carries them."
        )
    tensors = exporter.to_state_dict(adapter, family, naming=naming)
    tensors = {
        k: v if k.endswith(".alpha") else v.to(DTYPES[dtype]).contiguous()
        for k, v in tensors.items()
    }
    return Prepared(fmt, tensors, exporter.write_metadata(adapter, family, tensors, naming=naming))


def write_prepared(prepared: Prepared, path: Path) -> Path:
    """Write a `prepare`d export (atomic, re-read and compared)."""
    save_safetensors(path, prepared.tensors, prepared.metadata)
    _verify_written(path, prepared.tensors)
    return path


def write_adapter(
    adapter: Adapter, fmt: str, path: Path, *, naming: str = "original", dtype: str = "fp32"
) -> Path:
    """Write `adapter` as `fmt` to `path` (atomic, re-read and compared); see `prepare`."""
    return write_prepared(prepare(adapter, fmt, naming=naming, dtype=dtype), path)


def _verify_written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(tensors):
            raise LorakitError(f"Export check failed for {path}: keys differ from the adapter.")
        for k in keys:
            if not torch.equal(f.get_tensor(k), tensors[k]):
                raise LorakitError(f"Export check failed for {path}: tensor '{k}' differs.")


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A pickled LoRA, only with --allow-pickle, and even then through `weights_only=True`
    (tensors and plain containers only, no code)."""
    if not allow_pickle:
        raise LorakitError(
            f"'{path}' is a pickle file, which can run code when loaded; lorakit refuses it. "
            "Convert it to .safetensors, or pass --allow-pickle if you trust its source."
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own advice here is to re-run with weights_only=False: never what lorakit does
        raise LorakitError(
            f"'{path}' holds more than tensors (Python objects that only load by running code "
            "from the file); even with --allow-pickle lorakit reads only tensors from a pickle. "
            "Convert it to .safetensors with the tool that wrote it."
        ) from None
    except Exception as e:
        raise LorakitError(f"'{path}' is not a loadable tensor file ({_first(e)}).") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LorakitError(f"'{path}' does not hold a flat dict of tensors (a LoRA state dict).")
    return {str(k): v for k, v in obj.items()}, {}


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_safetensors(
    path: Path, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise LorakitError(f"Adapter file '{path}' does not exist.")
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle)
    if path.suffix != ".safetensors":
        raise LorakitError(
            f"'{path}' is not a .safetensors file. lorakit reads adapters only as safetensors "
            "(pickled .pt/.ckpt/.bin files can run code when loaded)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LorakitError(
            f"'{path}' is not a readable safetensors file ({_first(e)}); it is damaged or "
            "truncated, or not a safetensors file at all."
        ) from None
    return tensors, meta


def check_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse files whose LoRA weights are not finite (a diverged run, a damaged download)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LorakitError(
            f"'{path}' holds NaN or infinite values in {len(bad)} tensors "
            f"({', '.join(sorted(bad)[:4])}); the adapter is broken (diverged training?)."
        )


def check_ranks(adapter: Adapter, path: Path | None = None) -> None:
    """Every module's tensors agree (LoRA/DoRA down/up ranks and shapes, LoHa/LoKr factors):
    `validate.check_adapter`, the rules `read_tensors` applies to the file itself."""
    from lorakit.export import validate

    validate.check_adapter(adapter, path)


def read_tensors(
    path: Path, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None, Format]:
    """Read, normalise (`importers`), detect and check a file →
    (tensors, metadata, third-party source or None, format). Shared by `read_adapter` and
    `inspect`, so both refuse a damaged file with the same paragraph (`validate.check_file`)."""
    from lorakit.export import importers, validate

    tensors, meta = read_safetensors(path, allow_pickle)
    check_tensors(tensors, path)
    tensors, meta, source = importers.normalize(tensors, meta)
    keys = list(tensors)
    fmt = next((f for f in EXPORTERS.values() if f.detect(keys)), None)
    if fmt is None:
        raise LorakitError(
            f"'{path}' is not a LoRA file lorakit recognises: its keys ({', '.join(keys[:3])} …) "
            f"match none of the formats {', '.join(EXPORTERS)}."
        )
    validate.check_file(tensors, fmt.name, path)
    return tensors, meta, source, fmt


def _module_ratios(family_name: str) -> dict[tuple[str, str], float]:
    """out/in features of every Linear/Conv of the family's tiny model, by (component, path).

    Width-free: the tiny models keep their architecture's ratios (FLUX.1's MLP is 4× the width,
    FLUX.2's gated MLP 2 × 3×), so a file of any width can be compared with them."""
    cached = _RATIOS.get(family_name)
    if cached is None:
        cached = {}
        for target, name, m in tiny_modules(family_name):
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and w is not None:
                cached[(target.component, name)] = w.shape[0] / w.shape[1]
        _RATIOS[family_name] = cached
    return cached


def tiny_modules(family_name: str):
    """(adapter target, module path, module) of every module under each of the family's adapter
    targets in its tiny model: the architecture's module types, kernels and width ratios, which
    do not depend on the width, for facts about files of any size."""
    from lorakit.models import get_family

    fam = get_family(family_name)
    comps = fam.build_tiny(seed=0)
    for target in fam.targets:
        module = getattr(comps, target.component, None)
        if module is not None:
            for name, m in module.named_modules():
                yield target, name, m


_RATIOS: dict[str, dict[tuple[str, str], float]] = {}


def _shape_misfits(adapter: Adapter) -> int:
    """Modules whose out/in ratio is not the family architecture's (a same-named other family)."""
    ratios = _module_ratios(adapter.family)
    bad = 0
    for key, w in adapter.modules.items():
        want = ratios.get(key)
        got = w.up.shape[0] / w.down.shape[1] if w.down.dim() >= 2 else None
        bad += want is not None and got is not None and abs(want - got) > 1e-6
    return bad


def read_as(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fmt: Format,
    path: Path,
    family: str | None = None,
) -> tuple[Adapter, list[str]]:
    """(the Adapter, the other families that also read it): the family whose tables place every
    module (the fewest unplaced); among several that do (FLUX.1 and FLUX.2 share kohya's BFL
    names), the one whose architecture the module shapes fit, then the one the metadata names,
    then registry order. One paragraph when none fits."""
    from lorakit.export import validate
    from lorakit.models import get_family

    modules = validate.split_modules(tensors, fmt.name)
    ranking = validate.rank_families(fmt.name, modules, meta, forced=family)
    best, missing = ranking[0]
    if missing:
        raise LorakitError(
            validate.unmapped_error(path, fmt.name, best, missing, len(modules), meta)
        )
    first_error = None
    readable: list[tuple[int, Adapter]] = []
    for i, (name, left) in enumerate(ranking):
        if left:
            break
        try:
            adapter = fmt.from_state_dict(tensors, meta, get_family(name))
        except LorakitError as e:
            # another family whose tables also place every key may still read it (e.g.
            # fused widths that split only in one architecture); report the best one's error
            first_error = first_error or f"'{path}' ({fmt.name} format, {name}): {e}"
            continue
        readable.append((i, adapter))
    if not readable:
        raise LorakitError(first_error)
    if len(readable) > 1:
        hint = validate.family_hint(meta)
        readable.sort(
            key=lambda r: (r[1].family != hint if hint else False, _shape_misfits(r[1]), r[0])
        )
    adapter = readable[0][1]
    check_ranks(adapter, path)
    return adapter, [a.family for _, a in readable[1:]]


def adapter_from(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fmt: Format,
    path: Path,
    family: str | None = None,
) -> Adapter:
    """The Adapter of checked file tensors (`read_as`); one paragraph when no family fits."""
    return read_as(tensors, meta, fmt, path, family)[0]


def read_adapter(
    path: str | Path, family: str | None = None, allow_pickle: bool = False
) -> tuple[Adapter, str]:
    """Read an adapter file in any registered format or third-party layout (`importers`) →
    (Adapter, format or source name)."""
    path = Path(path)
    tensors, meta, source, fmt = read_tensors(path, allow_pickle)
    meta.pop("format", None)
    return adapter_from(tensors, meta, fmt, path, family), source or fmt.name
