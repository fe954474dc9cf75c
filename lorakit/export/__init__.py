"""Adapter file formats (a plain registry) and the read/write entry points.

Every write is atomic, and every file is re-read after writing and compared with what was meant
to be written, so a format bug can never silently ship a smaller or different adapter.
"""

from __future__ import annotations

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
from lorakit.lora import Adapter, LoraWeights


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
        "ComfyUI, Automatic1111/Forge, InvokeAI, diffusers",
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
    # LoHa / LoKr / DoRA (and plain LoRA) in kohya key names; same file name as kohya, so the
    # config refuses both at once (lorakit/export/lycoris.py)
    "lycoris": Format(
        "lycoris",
        "ComfyUI, Automatic1111/Forge, LyCORIS",
        lambda out, name: out / f"{name}.safetensors",
        lycoris_format.to_state_dict,
        lycoris_format.write_metadata,
        lycoris_format.detect,
        lycoris_format.from_state_dict,
    ),
}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_adapter(
    adapter: Adapter, fmt: str, path: Path, *, naming: str = "original", dtype: str = "fp32"
) -> Path:
    """Write `adapter` as `fmt` to `path` (atomic, re-read and compared).

    `naming` (kohya only): `original` (SGM/BFL/SD3 names, fused projections) or `diffusers`.
    `dtype`: storage dtype of the LoRA weights (`.alpha` stays fp32)."""
    from lorakit.models import get_family

    family = get_family(adapter.family)
    exporter = EXPORTERS[fmt]
    if dtype not in DTYPES:
        raise LorakitError(f"Export dtype '{dtype}' is unknown; choose {', '.join(DTYPES)}.")
    tensors = exporter.to_state_dict(adapter, family, naming=naming)
    tensors = {
        k: v if k.endswith(".alpha") else v.to(DTYPES[dtype]).contiguous()
        for k, v in tensors.items()
    }
    meta = exporter.write_metadata(adapter, family, tensors, naming=naming)
    save_safetensors(path, tensors, meta)
    _verify_written(path, tensors)
    return path


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


def check_ranks(adapter: Adapter, path: Path) -> None:
    """down `[r, in…]` and up `[out, r…]` must agree on r (else the file is damaged)."""
    for (comp, mod), w in adapter.modules.items():
        if isinstance(w, LoraWeights) and (
            w.down.dim() not in (2, 4) or w.up.dim() != w.down.dim() or w.up.shape[1] != w.rank
        ):
            raise LorakitError(
                f"'{path}': the LoRA of {comp}.{mod} has mismatched shapes (down "
                f"{tuple(w.down.shape)}, up {tuple(w.up.shape)}); the file is damaged."
            )


def read_adapter(
    path: str | Path, family: str | None = None, allow_pickle: bool = False
) -> tuple[Adapter, str]:
    """Read an adapter file in any registered format or third-party layout (`importers`) →
    (Adapter, format or source name)."""
    from lorakit.models import FAMILIES, get_family

    path = Path(path)
    from lorakit.export import importers

    tensors, meta = read_safetensors(path, allow_pickle)
    meta.pop("format", None)
    check_tensors(tensors, path)
    tensors, meta, source = importers.normalize(tensors, meta)
    keys = list(tensors)
    fmt = next((f for f in EXPORTERS.values() if f.detect(keys)), None)
    if fmt is None:
        raise LorakitError(
            f"'{path}' is not a LoRA file lorakit recognises: its keys ({', '.join(keys[:3])} …) "
            f"match none of the formats {', '.join(EXPORTERS)}."
        )
    family_name = family or meta.get("lorakit.family")
    candidates = [get_family(family_name)] if family_name else list(FAMILIES.values())
    # the kohya base-model version, when present, says which family to try first
    version = meta.get("ss_base_model_version", "")
    candidates.sort(key=lambda f: f.base_model_version != version)
    errors = []
    for fam in candidates:
        try:
            adapter = fmt.from_state_dict(tensors, meta, fam)
        except LorakitError as e:
            errors.append(str(e))
            continue
        check_ranks(adapter, path)
        return adapter, source or fmt.name
    raise LorakitError(f"'{path}' ({fmt.name} format) could not be read: {' '.join(errors)}")
