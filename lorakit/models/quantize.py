"""Quantized frozen base (QLoRA) for the SD3/FLUX transformers: `model.quantize = nf4 | int8`.

The transformer's Linear weights are stored by bitsandbytes as 4-bit NF4 (double-quantized, bf16
compute) or LLM.int8 through diffusers' `BitsAndBytesConfig` at `from_pretrained` time; peft then
puts trainable fp32 LoRA layers on top of the quantized Linear modules. diffusers quantizes only
while loading, so an in-process model (the tiny build) is first saved to a temp folder and
re-loaded from there (`quantize_loaded`). CUDA only: `check_quantize` fails up front elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.models.base import Family


def check_quantize(mode: str, family: Family) -> None:
    """Raise a ConfigError before anything is loaded when `model.quantize` cannot work here
    (a family whose `quantizable` is false, or no CUDA)."""
    if mode == "none":
        return
    if not family.quantizable:
        raise ConfigError(
            f"model.quantize = '{mode}' is available for the SD3 and FLUX transformers only; the "
            f"'{family.name}' family trains on an unquantized base. Set model.quantize = 'none'."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantize = '{mode}' needs a CUDA GPU: bitsandbytes' 4-bit/8-bit layers are "
            "only supported on CUDA here, and no CUDA device is visible to torch. Set "
            "model.quantize = 'none' (needs more memory), or run on a machine with an NVIDIA GPU "
            "and a CUDA build of torch."
        )


def bnb_config(mode: str):
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"model.quantize must be 'none', 'nf4' or 'int8', got {mode!r}.")


def quantized_kwargs(mode: str) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for the transformer (empty when not quantizing)."""
    if mode == "none":
        return {}
    return {"quantization_config": bnb_config(mode), "torch_dtype": torch.bfloat16}


def quantize_loaded(module, mode: str):
    """Re-load an in-process diffusers model quantized (via a temp folder)."""
    import shutil

    from lorakit.models.loading import freeze, save_for_quantization

    folder = save_for_quantization(module)
    try:
        quantized = type(module).from_pretrained(folder, **quantized_kwargs(mode))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    freeze(quantized)
    return quantized


def is_quantized(module) -> bool:
    return bool(getattr(module, "is_quantized", False))
