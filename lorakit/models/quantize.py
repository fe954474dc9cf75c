"""Quantized frozen base: `model.quantize = nf4 | int8` (bitsandbytes, CUDA; every family) or
`fp8` (every family, CPU too).

fp8 (every family, CPU too): the frozen denoiser's Linear/Conv layers are stored as float8 e4m3
and cast to the run's weight dtype layer by layer around each forward, by diffusers' layerwise
casting hooks (`enable_fp8_storage`, with the model's default skip patterns but for the AdaLN
modulation Linears, see `fp8_skip_patterns`: positional / patch embeddings, proj_in/proj_out, the
final norm_out stay in the weight dtype). It is applied when the denoiser is
placed for training, before the LoRA is injected; the LoRA layers keep their own dtype. With
`train.block_swap` the streamed blocks keep these weights in fp8 in host memory and in the device
slots; `lorakit.blockswap` replaces the hook's casts on those layers by ones that read the slot
(same values, bitwise the same gradients).

A float8 single file (ComfyUI's fp8 checkpoints, `fp8_files`) is widened when read; with fp8 the
denoiser goes back to e4m3 here, bit for bit for a plain e4m3 file. nf4/int8 refuse such a
file (`check_not_float8`): they would quantize the fp8-rounded weights a second time.

NF4/int8 (bitsandbytes):

The transformer's Linear weights are stored by bitsandbytes as 4-bit NF4 (double-quantized, bf16
compute) or LLM.int8 through diffusers' `BitsAndBytesConfig` at `from_pretrained` time; peft then
puts trainable fp32 LoRA layers on top of the quantized Linear modules. diffusers quantizes only
while loading, so an in-process model (the tiny build) is first saved to a temp folder and
re-loaded from there (`quantize_loaded`). CUDA only: `check_quantize` fails up front elsewhere.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.models.base import Family


BNB_MODES = ("nf4", "int8")
"""`model.quantize` values bitsandbytes applies at load time (`quantizable` families, CUDA)."""
FP8 = "fp8"


def check_quantize(mode: str, family: Family) -> None:
    """Raise a ConfigError before anything is loaded when `model.quantize` cannot work here
    (fp8: a torch without float8; nf4/int8: a family whose `quantizable` is false, or no CUDA)."""
    if mode == "none":
        return
    if mode == FP8:
        if not hasattr(torch, "float8_e4m3fn"):
            raise ConfigError(
                f"model.quantize = 'fp8' stores the frozen weights as torch.float8_e4m3fn, but "
                f"this torch ({torch.__version__}) has no float8 dtypes. Upgrade torch (2.1 or "
                "newer has them), or set model.quantize = 'none' (needs more memory); on a CUDA "
                "GPU, model.quantize = 'nf4' also shrinks the base."
            )
        return
    if not family.quantizable:
        raise ConfigError(
            f"model.quantize = '{mode}' is not offered for the '{family.name}' family "
            "(bitsandbytes cannot quantize its denoiser). Set model.quantize = 'fp8' (float8 "
            "storage, any GPU or the CPU) or 'none'."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.quantize = '{mode}' needs a CUDA GPU: bitsandbytes' 4-bit/8-bit layers are "
            "only supported on CUDA here, and no CUDA device is visible to torch. Set "
            "model.quantize = 'none' (needs more memory), or run on a machine with an NVIDIA GPU "
            "and a CUDA build of torch."
        )


def bnb_advice(mode: str, family: Family) -> str:
    """The start-up warning of `_bnb_advice` for `model.quantize = mode` ("" unless nf4/int8)."""
    return _bnb_advice(mode, family) if mode in BNB_MODES else ""


@functools.cache
def _bnb_advice(mode: str, family: Family) -> str:
    """A warning when `mode` (nf4/int8) keeps more of the frozen denoiser's bf16 bytes than fp8
    would: bitsandbytes quantizes Linear layers only, fp8 storage Linear and Conv (SD1.5's UNet
    is 69% convolutions: NF4 0.77 of bf16, fp8 0.50). Counted on the family's real denoiser on
    the meta device by the planner's byte rules; "" when bitsandbytes is the smaller."""
    from accelerate import init_empty_weights

    from lorakit.planner import weight_bytes

    with init_empty_weights():
        real = family.build_real_denoiser()
    bf16, bnb, fp8 = (weight_bytes(real, 2, m) for m in ("none", mode, FP8))
    if bnb <= fp8:
        return ""
    return (
        f"model.quantize = '{mode}' keeps {bnb / bf16:.2f} of the {family.real_label} denoiser's "
        f"bf16 bytes: bitsandbytes quantizes Linear layers only, and this denoiser is mostly "
        f"convolutions. model.quantize = 'fp8' stores both in float8: {fp8 / bf16:.2f}."
    )


def check_not_float8(module, mode: str) -> None:
    """Refuse a bitsandbytes mode on a denoiser read from a float8 file (`fp8_files`)."""
    from lorakit.models.fp8_files import float8_source

    check_file_not_float8(float8_source(module), mode)


def check_file_not_float8(source, mode: str) -> None:
    """Refuse a bitsandbytes mode on a float8 single file `source` (a path, or "" / None: no
    file), from its header alone: `load_quantizable` calls it before any weight is read."""
    from lorakit.models.fp8_files import float8_keys, read_header

    if source and mode in BNB_MODES and float8_keys(read_header(source)[0]):
        raise ConfigError(
            f"model.name '{source}' is a float8 checkpoint (a ComfyUI fp8 file), and "
            f"model.quantize = '{mode}' would quantize its already fp8-rounded weights a second "
            f"time. Set model.quantize = 'fp8' (keeps the frozen denoiser in float8, as the file "
            "stores it) or model.quantize = 'none' (trains on the weights widened to bf16/fp32); "
            f"for '{mode}', start from the model's bf16 file instead."
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
    """Extra `from_pretrained` kwargs for the transformer (empty unless bitsandbytes quantizes:
    fp8 storage is applied later, by `enable_fp8_storage`)."""
    if mode not in BNB_MODES:
        return {}
    return {"quantization_config": bnb_config(mode), "torch_dtype": torch.bfloat16}


def quantize_loaded(module, mode: str):
    """Re-load an in-process diffusers model quantized (via a temp folder); bitsandbytes modes
    only, anything else (fp8: applied at placement) returns `module` as is."""
    import shutil

    if mode not in BNB_MODES:
        return module
    check_not_float8(module, mode)

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


def enable_fp8_storage(denoiser, compute_dtype: torch.dtype) -> None:
    """Store `denoiser`'s Linear/Conv weights as float8 e4m3 and compute in `compute_dtype`
    (diffusers' layerwise casting, default skip patterns); in place, on its current device.

    Call it after the denoiser has been cast to `compute_dtype` (the skipped layers stay there)
    and before the LoRA is injected. peft gives a new adapter the dtype of its base layer, and
    takes a base layer's `compute_dtype` attribute over its weight's dtype (its bitsandbytes
    rule): it is set on each fp8-stored layer, so the LoRA starts exactly as on an unquantized
    base of `compute_dtype` (not rounded to fp8) and is then trained in its own fp32."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK, apply_layerwise_casting

    storage = torch.float8_e4m3fn
    # diffusers' own entry point (`enable_layerwise_casting`) always adds the model's "norm"
    # pattern; `apply_layerwise_casting` takes exactly `fp8_skip_patterns`
    apply_layerwise_casting(denoiser, storage, compute_dtype, fp8_skip_patterns(denoiser))
    for m in denoiser.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            m.compute_dtype = compute_dtype
            ref = hook.fn_ref  # what the hooked forward calls
            ref.pre_forward, ref.post_forward = _new_params(ref.pre_forward, ref.post_forward)


def _new_params(*casts):
    """The hook's casts with `module.to(dtype)` giving the layer NEW Parameter objects instead
    of swapping the dtype of the old ones in place (`param.data = ...`, torch's default): autograd
    keeps the compute-dtype weight a layer's forward saved for backward (a Conv's weight, a
    gradient-checkpointed block's) instead of seeing it turn fp8 after the forward (a
    CheckpointError; a dtype mismatch in a GPU conv backward)."""

    def replacing(cast):
        def run(*args, **kwargs):
            before = torch.__future__.get_overwrite_module_params_on_conversion()
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            try:
                return cast(*args, **kwargs)
            finally:
                torch.__future__.set_overwrite_module_params_on_conversion(before)

        return run

    return tuple(replacing(cast) for cast in casts)


def is_fp8_stored(module) -> bool:
    """Whether any of `module`'s weights are stored in fp8 (`enable_fp8_storage` ran)."""
    return any(p.dtype == getattr(torch, "float8_e4m3fn", None) for p in module.parameters())


def fp8_skip_patterns(denoiser) -> tuple[str, ...]:
    """Module-name regexes whose layers keep the compute dtype under fp8 storage: diffusers'
    layerwise-casting defaults and the model's own skip patterns, except that "norm" becomes
    `^norm_out`. The layer types cast are Linear/Conv/Embedding only, so "norm" never
    touches a normalisation layer itself: what it keeps out of fp8 are the AdaLN modulation
    Linears that diffusers names `norm1.linear` / `norm1_context.linear` / `norm.linear`, a
    quarter of FLUX.1's and SD3's block weights (FLUX.1-dev: 3.2 of 11.9 B). kohya's
    `--fp8_base` and musubi-tuner's fp8 (BFL names `img_mod.lin`, `modulation.lin`) store those in
    fp8; Qwen-Image, klein and Z-Image name them without "norm" and were stored so already. The
    final AdaLN (`norm_out.linear`, outside the blocks, as musubi keeps the final layer) stays in
    the compute dtype."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = [*DEFAULT_SKIP_MODULES_PATTERN]
    patterns += list(getattr(denoiser, "_keep_in_fp32_modules", None) or ())
    patterns += list(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ())
    out = ["^norm_out" if p == "norm" else p for p in patterns]
    return tuple(dict.fromkeys(out))


def fp8_layers(denoiser) -> list[torch.nn.Module]:
    """The layers `enable_fp8_storage` stores in fp8, chosen without touching the model (a meta
    model works): diffusers' `enable_layerwise_casting` selection (its default skip patterns, the
    model's `_keep_in_fp32_modules` / `_skip_layerwise_casting_patterns`, the layer types it
    hooks). For the planner, which counts their parameters at 1 byte."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    patterns = fp8_skip_patterns(denoiser)
    out: list[torch.nn.Module] = []

    def visit(module, prefix: str) -> None:
        if any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            out.append(module)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(denoiser, "")
    return out


# --- fp8 matmul (`model.fp8_matmul`) -------------------------------------------------------------

E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def check_fp8_matmul(device: torch.device) -> None:
    """Refuse `model.fp8_matmul` on a device without fp8 matmul, before anything is loaded."""
    if device.type != "cuda":
        return  # the CPU computes the same fp8 products widened (`scaled_mm`): for checking
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"model.fp8_matmul computes with fp8 tensor cores, which this GPU "
            f"({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) does not "
            "have (they start at 8.9: Ada, Hopper, Blackwell). Set model.fp8_matmul = false: "
            "model.quantize = 'fp8' alone still halves the frozen weights' memory."
        )


def enable_fp8_matmul(denoiser) -> int:
    """Make the fp8-stored Linear layers of `denoiser` multiply in fp8 with their stored e4m3
    weights (`torch._scaled_mm`) instead of widening them to the compute dtype first; returns how
    many. Call after `enable_fp8_storage`, before the LoRA is injected (peft then wraps these
    layers as it wraps any Linear; the LoRA product stays in its own dtype).

    Per call, the input is scaled by its absolute maximum into e4m3 (tensor-wise dynamic
    scaling, the recipe of torchao's `Float8Linear`); the stored weight is used as it is (scale
    1: `enable_fp8_storage` casts without a scale). Backward computes only the input's gradient,
    from the e5m2-scaled output gradient and the same stored weight: the base weights are
    frozen. (torchao's `Float8Linear` also computes the weight's gradient in its backward, a
    third matmul per layer that a frozen base never uses; so lorakit calls the kernel torchao
    calls, `torch._scaled_mm`, itself: `scaled_mm`.) Layers whose sizes are not multiples of 16
    (the kernel's requirement) keep the widening path."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    n = 0
    for m in denoiser.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if (
            hook is None
            or type(m) is not torch.nn.Linear
            or m.weight.dtype != torch.float8_e4m3fn
            or m.in_features % 16
            or m.out_features % 16
        ):
            continue
        ref = hook.fn_ref
        ref.pre_forward = _unchanged_args
        ref.post_forward = _unchanged_output
        ref.forward = functools.partial(_fp8_linear, m)
        n += 1
    return n


def _unchanged_args(module, *args, **kwargs):
    return args, kwargs


def _unchanged_output(module, output):
    return output


def _fp8_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = getattr(module, "compute_dtype", x.dtype)
    y = _Fp8FrozenLinear.apply(x.to(dtype), module.weight)
    return y if module.bias is None else y + module.bias.to(y.dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, out_dtype: torch.dtype):
    """(a @ b) · scale_a in `out_dtype` for fp8 `a` [M, K] (row-major) and `b` [K, N] (column-
    major, as the kernel requires; checked everywhere, so a CPU test catches a wrong layout). On
    CUDA: `torch._scaled_mm`. Elsewhere the same product of the same fp8 values in fp32 (torch's
    CPU `_scaled_mm` is a reference kernel, ~1000x slower than a matmul: 11 s for one 3072-wide
    layer); `tests/test_fp8_matmul.py` checks the two agree."""
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError("scaled_mm: a must be row-major and b column-major")
    if a.is_cuda:
        one = torch.ones((), device=a.device, dtype=torch.float32)
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=one, out_dtype=out_dtype)
    return (a.float() @ b.float() * scale_a).to(out_dtype)


def _to_fp8(t: torch.Tensor, dtype: torch.dtype, top: float):
    """(t scaled into `dtype`'s range by its absolute maximum, the inverse scale as fp32)."""
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    # row-major, as the kernel's first operand must be (a transposed input or gradient is not)
    return (t.float() * scale).clamp(-top, top).to(dtype).contiguous(), scale.reciprocal()


class _Fp8FrozenLinear(torch.autograd.Function):
    """y = x @ W.T with x [..., in] in the compute dtype and W [out, in] stored e4m3 (frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        shape = x.shape
        x8, inv = _to_fp8(x.reshape(-1, shape[-1]), torch.float8_e4m3fn, E4M3_MAX)
        # mat2 must be column-major: W.T of a row-major W is
        y = scaled_mm(x8, weight.t(), inv, x.dtype)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        shape = grad.shape
        g8, inv = _to_fp8(grad.reshape(-1, shape[-1]), torch.float8_e5m2, E5M2_MAX)
        w = weight.t().contiguous().t()  # [out, in] column-major, as mat2 must be
        gx = scaled_mm(g8, w, inv, grad.dtype)
        return gx.reshape(*shape[:-1], weight.shape[1]), None
