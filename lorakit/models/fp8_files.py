"""float8 single files (ComfyUI's `*_fp8_e4m3fn` and `*_fp8_scaled` checkpoints), for any family.

`read_dequantized(path)` reads a `.safetensors` checkpoint whose header holds float8 tensors
(`F8_E4M3` / `F8_E5M2`) and returns it with every float8 tensor dequantized to the file's own
compute dtype, the scale tensors and markers removed: the family's key mapping then sees the
same keys and dtypes as in the model's bf16/fp32 file. It returns None for a file without float8
tensors (the caller reads it as before). `single_file.load_single_file` calls it for every
family; with `model.quantize = "fp8"` the frozen denoiser is stored back as float8 e4m3 later
(`quantize.enable_fp8_storage`): a plain e4m3 file round-trips bit for bit (every e4m3 value is
exact in bf16, fp16 and fp32, and casting it back rounds to itself).

Layouts (as ComfyUI reads them):

- plain: weights stored as float8, nothing else (`*_fp8_e4m3fn.safetensors`, `*_fp8_e5m2`).
  ComfyUI casts them to the compute dtype (comfy/ops.py, `cast_bias_weight`); so does lorakit.
- legacy scaled fp8 (`*_fp8_scaled.safetensors`): a `scaled_fp8` marker tensor (`scaled_fp8`,
  or under the model prefix, e.g. `model.diffusion_model.scaled_fp8`; its dtype is the fp8
  dtype, 2 elements mean "full precision matmul"), a float32 `<layer>.scale_weight` for each
  float8 `<layer>.weight`, sometimes a `<layer>.scale_input` (activation scale for fp8 matmuls;
  irrelevant to the weights). Real weight = weight.float() * scale_weight (comfy/ops.py,
  `scaled_fp8_ops` / `fp8_linear`; comfy/model_detection.py pops the marker;
  comfy/utils.py `convert_old_quants` maps this layout onto the newer one below).
- comfy_quant (newer ComfyUI, comfy/utils.py `convert_old_quants`, comfy/ops.py mixed
  precision ops, comfy/quant_ops.py): a float8 `<layer>.weight`, a float32 `<layer>.weight_scale`
  (scalar, or one per output row), an optional `<layer>.input_scale`, and the layer's format as
  `<layer>.comfy_quant` (uint8 bytes of JSON, e.g. `{"format": "float8_e4m3fn"}`) or in the
  header metadata `_quantization_metadata` (JSON `{"layers": {layer: {"format": ...}}}`).
  Real weight = weight.float() * weight_scale. Other formats of that layout (nvfp4, mxfp8, int8,
  block-wise fp8) are refused in one paragraph.

Generic code: no family is named here (tests/test_family_contract.py).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import torch

from lorakit.errors import ConfigError, LorakitError

FLOAT8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""safetensors dtype string → torch dtype name of the float8 dtypes lorakit dequantizes."""
WIDE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""safetensors dtype name → torch dtype of the wide floats lorakit reads (the one table: the
streamed reader and Qwen-Image's stored-dtype probe use it too)."""
MARKER = "scaled_fp8"
WEIGHT_SCALES = (".scale_weight", ".weight_scale")  # legacy, comfy_quant
INPUT_SCALES = (".scale_input", ".input_scale")
QUANT_CONF = ".comfy_quant"
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
"""comfy_quant formats that are one float8 weight times a scalar (or per-row) scale."""


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor name → {"dtype", "shape", ...}, `__metadata__`) from a safetensors header, without
    reading any tensor (and without needing torch to know the dtypes)."""
    header, metadata, _ = read_header_at(path)
    return header, metadata


def read_header_at(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """`read_header` and the file offset where the tensor data starts (a tensor's
    `data_offsets` count from there): for readers that seek to tensors themselves."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size


def float8_keys(header: dict[str, dict]) -> list[str]:
    return [k for k, v in header.items() if v.get("dtype") in FLOAT8_NAMES]


def compute_dtype(header: dict[str, dict], skip: set[str]) -> torch.dtype:
    """The dtype the file computes in: the most common floating dtype of its other tensors
    (bf16 when every weight is float8)."""
    counts = Counter(
        v["dtype"] for k, v in header.items() if k not in skip and v["dtype"] in WIDE_DTYPES
    )
    return WIDE_DTYPES[counts.most_common(1)[0][0]] if counts else torch.bfloat16


def _layer(key: str) -> str:
    return key.removesuffix(".weight")


def read_dequantized(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint at `path` with its float8 tensors dequantized (see module doc), or None if
    it has none. Tensor by tensor: the peak is the dequantized checkpoint plus one tensor."""
    path = Path(path)
    header, metadata = read_header(path)
    fp8 = float8_keys(header)
    if not fp8:
        return None
    if not hasattr(torch, "float8_e4m3fn"):
        names = sorted({FLOAT8_NAMES[header[k]["dtype"]] for k in fp8})
        raise ConfigError(
            f"model.name '{path}' stores {len(fp8)} weights as {' / '.join(names)} (a ComfyUI fp8 "
            f"file, e.g. '{fp8[0]}'), but this torch ({torch.__version__}) has no float8 dtypes "
            "and cannot read them. Upgrade torch (2.1 or newer has them), or use the model's "
            "bf16/fp16 file as model.name."
        )
    from safetensors import safe_open

    layers = {_layer(k) for k in fp8 if k.endswith(".weight")}
    markers = [k for k in header if k == MARKER or k.endswith("." + MARKER)]
    confs = _quant_confs(path, header, metadata)
    drop = set(markers) | {k for k in header if k.endswith(QUANT_CONF)}
    for layer in layers | set(confs):
        drop |= {layer + s for s in WEIGHT_SCALES + INPUT_SCALES if layer + s in header}
    target = compute_dtype(header, drop)
    fp8_set = set(fp8)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in header:
            if key in drop:
                continue
            tensor = f.get_tensor(key)
            if key in fp8_set:
                tensor = _dequantize(f, path, header, key, tensor, target, markers, confs)
            out[key] = tensor
    return out


def _quant_confs(path: Path, header: dict[str, dict], metadata: dict[str, str]) -> dict[str, dict]:
    """layer → its comfy_quant config (`<layer>.comfy_quant` tensors, else the header's
    `_quantization_metadata`); formats other than float8 are refused."""
    confs: dict[str, dict] = {}
    if "_quantization_metadata" in metadata:
        try:
            confs = dict(json.loads(metadata["_quantization_metadata"]).get("layers", {}))
        except (ValueError, AttributeError):
            confs = {}
    keys = [k for k in header if k.endswith(QUANT_CONF)]
    if keys:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                raw = bytes(f.get_tensor(k).to(torch.uint8).tolist())
                try:
                    confs[k.removesuffix(QUANT_CONF)] = json.loads(raw.decode("utf-8"))
                except ValueError:
                    confs[k.removesuffix(QUANT_CONF)] = {
                        "format": raw[:40].decode(errors="replace")
                    }
    for layer, conf in confs.items():
        fmt = str(conf.get("format", "")) if isinstance(conf, dict) else str(conf)
        if fmt not in FLOAT8_FORMATS:
            raise LorakitError(
                f"'{path}' stores layer '{layer}' in ComfyUI's '{fmt}' quantized format "
                "(comfy_quant). lorakit reads float8 checkpoints (plain *_fp8_e4m3fn and "
                "*_fp8_scaled files, one scale per tensor or per row) and widens them to bf16; "
                "it does not read nvfp4, mxfp8, int8 or block-wise files. Use the model's "
                "fp8 or bf16 file as model.name."
            )
    return confs


def _dequantize(f, path, header, key, tensor, target, markers, confs) -> torch.Tensor:
    """One float8 tensor → `target`: exact for a plain one; weight.float() * scale (rounded once,
    to `target`) for a scaled one."""
    layer = _layer(key)
    scale_key = next((layer + s for s in WEIGHT_SCALES if layer + s in header), None)
    if scale_key is None:
        if key.endswith(".weight") and (markers or layer in confs):
            where = f"the '{markers[0]}' marker" if markers else f"'{layer}{QUANT_CONF}'"
            wanted = " or ".join(f"'{layer}{s}'" for s in WEIGHT_SCALES)
            raise LorakitError(
                f"'{path}' is a scaled-fp8 checkpoint (it has {where}), but its float8 weight "
                f"'{key}' has no scale ({wanted} is missing), so the real weights of layer "
                f"'{layer}' cannot be recovered. The file is incomplete or was written by a "
                "converter lorakit does not know: download it again, or use the model's "
                "bf16 / plain fp8_e4m3fn file as model.name."
            )
        return tensor.to(target)  # plain float8: every value is exact in bf16 / fp16 / fp32
    scale = f.get_tensor(scale_key).to(torch.float32)
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif tensor.dim() >= 1 and scale.numel() == tensor.shape[0]:
        scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))  # one scale per output row
    else:
        raise LorakitError(
            f"'{path}': the scale '{scale_key}' has shape {tuple(scale.shape)}, which is neither "
            f"one value nor one per row of '{key}' {tuple(tensor.shape)} (a block-wise layout "
            "lorakit does not read). Use the model's bf16 or plain fp8_e4m3fn file as model.name."
        )
    return (tensor.to(torch.float32) * scale).to(target)


def float8_source(module) -> str:
    """The float8 file `module` was read from ('' if none): set by `mark_float8_source`."""
    return str(getattr(module, "_lorakit_float8_source", "") or "")


def mark_float8_source(module, path: str | Path) -> None:
    """Remember on a loaded denoiser that its weights came from a float8 file (for
    `quantize.quantize_loaded`, which refuses to quantize them again with bitsandbytes)."""
    if module is not None:
        module._lorakit_float8_source = str(path)
