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
}


def write_adapter(adapter: Adapter, fmt: str, path: Path) -> Path:
    from lorakit.models import get_family

    family = get_family(adapter.family)
    exporter = EXPORTERS[fmt]
    tensors = exporter.to_state_dict(adapter, family)
    meta = exporter.write_metadata(adapter, family, tensors)
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise LorakitError(f"Adapter file '{path}' does not exist.")
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
        raise LorakitError(f"'{path}' is not a readable safetensors file ({e}).") from None
    return tensors, meta


def read_adapter(path: str | Path, family: str | None = None) -> tuple[Adapter, str]:
    """Read an adapter file in any registered format → (Adapter, format name)."""
    from lorakit.models import FAMILIES, get_family

    path = Path(path)
    tensors, meta = read_safetensors(path)
    meta.pop("format", None)
    keys = list(tensors)
    fmt = next((f for f in EXPORTERS.values() if f.detect(keys)), None)
    if fmt is None:
        raise LorakitError(
            f"'{path}' is not a LoRA file lorakit recognises: its keys ({', '.join(keys[:3])} …) "
            f"match none of the formats {', '.join(EXPORTERS)}."
        )
    family_name = family or meta.get("lorakit.family")
    candidates = [get_family(family_name)] if family_name else list(FAMILIES.values())
    errors = []
    for fam in candidates:
        try:
            return fmt.from_state_dict(tensors, meta, fam), fmt.name
        except LorakitError as e:
            errors.append(str(e))
    raise LorakitError(f"'{path}' ({fmt.name} format) could not be read: {' '.join(errors)}")
