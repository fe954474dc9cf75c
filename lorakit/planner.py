"""`lorakit plan`: peak accelerator memory of a training config, estimated without loading weights.

The family's REAL architecture (`Family.build_real_denoiser` / `build_real_frozen`: SD1.5, SDXL
base, SD3.5-large, FLUX.1-dev) is built on the meta device, so parameter counts are exact and
nothing is allocated. Then:

- weights: parameter count × bytes of the dtype the loop uses (`spec.frozen_dtype` rules: VAE
  fp32, T5 bf16 under fp16), or bitsandbytes' layout for `model.quantize` (every `nn.Linear` weight
  of the transformer: NF4 0.5 B + double-quantized absmax 1/64 B + 4/16384 B per parameter; int8
  1 B + a fp32 scale per output row);
- LoRA: `r × (in + out)` per matched Linear (Conv2d: `r × (in·k·k + out)`), fp32 weights + fp32
  gradients + the autocast bf16/fp16 copy + optimizer state (`OPTIMIZER_STATE`);
- activations: ONE training step (forward + MSE loss + backward) of the LoRA-injected denoiser
  is simulated on the meta device at the config's resolution/batch (`step_activations` →
  `simulate_step`) under `StorageMeter`, which counts every tensor storage from its creation to
  its release — saved tensors, transients, activation gradients, and torch's own non-reentrant
  checkpoint recomputing one unit at a time in backward. The trace is made to run as CUDA runs
  it: `CudaAutocast` applies CUDA autocast's cast policy (layer_norm / group_norm / softmax /
  losses in fp32, linear / conv / matmul / SDPA in bf16/fp16, casts as autograd ops, so what
  each op saves has its CUDA dtype); SDPA saves what the flash / memory-efficient kernels save
  (`_FlashAttention`); bitsandbytes NF4/int8 layers are `QuantizedLinearSim` (input cast to
  the compute dtype, a transient dequantized weight in forward and in backward, nothing saved;
  peft's bitsandbytes LoRA wrapper behaviour). Shape arithmetic, no per-family formula: it holds
  at any resolution. One fitted constant: `KERNEL_WORKSPACE` (cuBLAS/cuDNN workspaces), fitted
  on SD1.5 only; SDXL and FLUX NF4 are independent checks (BENCHMARKS.md: all five recorded H100
  rows within ±5%, `benchmarks/planner_gpu_rows.py`). With `train.offload_activations` the
  units' inputs are held off the device as `lorakit.offload` holds them;
- block swap (`train.block_swap = N`): the frozen bytes of the last N blocks over the family's
  `swap_blocks` (as `weight_bytes` counts them) leave the device row and are reported as host
  memory; the device keeps `blockswap.SLOTS` ring slots of the largest swapped block, each its
  tensors padded to `blockswap.ALIGN` (exact for unquantized weights; for NF4/int8 an upper
  bound of one padding per bitsandbytes state tensor). Activations are unchanged;
- text-encoder streaming (`train.stream_encoders`): in the caching phase each text encoder counts
  its resident parts plus its largest streamed layer (`encoder_stream.streamed_bytes`: the
  children of its largest `nn.ModuleList`; one at a time, no prefetch) instead of all its bytes;
- caching and sampling phases: inference passes (VAE encode of `VAE_ENCODE_CHUNK` images, the
  denoiser with CFG, VAE decode) are traced on meta with a dispatch mode that tracks live tensor
  bytes, giving their peak working set;
- `max_memory_allocated` is what the phases predict; the verdict adds the CUDA context and the
  caching allocator's slack (`CUDA_CONTEXT`, `ALLOCATOR_SLACK`), which that counter does not see.

Phases follow `lorakit/train.py`: the VAE and text encoders, not the denoiser, are on the device
while caching (the preview prompts are encoded then too); afterwards the VAE and text encoders
leave it unless captions are encoded every step (text-encoder LoRA, tag shuffling), when they stay
resident. Preview grids (`sample.every` / `every_minutes` / `every_epochs`) are rendered from
those pre-encoded prompt embeddings, so the sample phase adds only the VAE to what training keeps
(all frozen modules when they are resident anyway), plus the larger of one denoiser call with CFG
at the pipeline's own T5 length and one VAE decode.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lorakit.config import Config
from lorakit.models import FAMILIES
from lorakit.models.base import PlanArch
from lorakit.spec import WEIGHT_DTYPES, build_spec, frozen_dtype

GIB = 2**30
CUDA_CONTEXT = 0.55 * GIB
"""CUDA context + cuBLAS/cuDNN workspaces: resident, invisible to `max_memory_allocated`."""
ALLOCATOR_SLACK = 0.08
"""Fraction of the allocated peak lost to the caching allocator's fragmentation."""
KERNEL_WORKSPACE = 84 * 2**20
"""Device memory of the step that the meta trace cannot see, added to the simulated activation
peak: the cuBLAS/cuBLASLt workspace (32 MiB on Hopper, taken from torch's caching allocator, so
`max_memory_allocated` counts it) plus cuDNN convolution workspaces and the 512-byte rounding
of every allocation. The ONE fitted number of the step model: the mean gap of the three SD1.5
H100 rows (benchmarks/gpu_check-h100-*.json: 88, 79 and 85 MiB); SDXL and FLUX rows are
independent checks (`benchmarks/planner_gpu_rows.py`, BENCHMARKS.md)."""
VAE_ENCODE_CHUNK = 1
"""Images per VAE encode call while caching, as in `data.cache.encode_images`."""

# bytes per element of an optimizer's state, for tensors of n elements (see `optimizer_bytes`)
OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy")


# --- real architectures ------------------------------------------------------------------------
# Each family declares its REAL model (`Family.build_real_denoiser` / `build_real_frozen`), its
# shapes (`Family.plan_arch`) and the inputs of one denoiser call (`Family.planner_inputs`);
# functions below take the family's registry key.

ARCHS: dict[str, PlanArch] = {name: fam.plan_arch for name, fam in FAMILIES.items()}
"""Registry key → shapes of the family's real model (`Family.plan_arch`)."""


def build_denoiser(family: str) -> torch.nn.Module:
    """The family's real denoiser on the meta device (random-free, allocation-free)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return _family(family).build_real_denoiser()


def build_frozen(family: str, drop_t5: bool = False) -> dict[str, torch.nn.Module]:
    """VAE and text encoders of the real model on the meta device, named as `frozen_modules`."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return _family(family).build_real_frozen(drop_t5)


# --- byte counts (exact) -----------------------------------------------------------------------

DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def quantized_linear_bytes(numel: int, out_features: int, mode: str) -> int:
    """Bytes bitsandbytes stores for one Linear weight of `numel` elements."""
    if mode == "nf4":  # 4-bit codes + uint8 absmax per 64 + fp32 absmax per 256 absmax blocks
        blocks = math.ceil(numel / 64)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 64
    if mode == "int8":  # int8 codes + fp32 scale per output row
        return numel + 4 * out_features
    raise ValueError(mode)


def weight_bytes(module: torch.nn.Module, elem_bytes: int, quantize: str = "none") -> int:
    """Resident bytes of a module's parameters and buffers at `elem_bytes` per element, with
    every `nn.Linear` weight in bitsandbytes' layout when `quantize` is `nf4`/`int8`, and 1 byte
    per parameter of the layers fp8 storage holds (`quantize.fp8_layers`) when it is `fp8`."""
    quantized: set[int] = set()
    total = 0
    if quantize == "fp8":
        from lorakit.models.quantize import fp8_layers

        for m in fp8_layers(module):
            for p in m.parameters(recurse=False):
                quantized.add(id(p))
                total += p.numel()  # float8 e4m3: 1 byte
    elif quantize != "none":
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                quantized.add(id(m.weight))
                total += quantized_linear_bytes(m.weight.numel(), m.out_features, quantize)
    for p in module.parameters():
        if id(p) not in quantized:
            total += p.numel() * elem_bytes
    for b in module.buffers():
        total += b.numel() * (elem_bytes if b.is_floating_point() else b.element_size())
    return total


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_shapes(module: torch.nn.Module, targets: list[str], rank: int) -> list[int]:
    """Element counts of every LoRA tensor peft creates (lora_A, lora_B per matched layer)."""
    out = []
    for name, m in module.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(m, torch.nn.Linear):
            out += [rank * m.in_features, m.out_features * rank]
        elif isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            out += [rank * m.in_channels // m.groups * k, m.out_channels * rank]
    return out


def optimizer_bytes(
    sizes: list[int], optimizer: str, shapes: list[tuple[int, int]] | None = None
) -> int:
    """Optimizer state bytes for trainable tensors of `sizes` elements.

    adamw: 2 fp32 moments (8 B). adamw8bit: 2 uint8 moments + a fp32 absmax per 256-element block
    each, only for tensors of ≥ 4096 elements (bitsandbytes' `min_8bit_size`; smaller ones keep
    32-bit state). lion8bit: 1 uint8 moment (+ absmax), same threshold. adafactor: factored row +
    column fp32 statistics for matrices (`shapes`), full fp32 for vectors. prodigy: 4 fp32 tensors
    (2 moments, the initial point p0 and s).
    """
    total = 0
    for i, n in enumerate(sizes):
        if optimizer == "adamw":
            total += 8 * n
        elif optimizer == "adamw8bit":
            total += (2 * n + 8 * math.ceil(n / 256)) if n >= 4096 else 8 * n
        elif optimizer == "lion8bit":
            total += (n + 4 * math.ceil(n / 256)) if n >= 4096 else 4 * n
        elif optimizer == "adafactor":
            rows, cols = shapes[i] if shapes else (n, 1)
            total += 4 * (rows + cols) if rows > 1 and cols > 1 else 4 * n
        elif optimizer == "prodigy":
            total += 16 * n
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return total


# --- activations (meta-device trace) -----------------------------------------------------------


@dataclass
class SavedCount:
    """Bytes autograd keeps for backward during one forward pass."""

    retained: int = 0
    """Saved tensors + checkpoint-unit inputs alive when backward starts."""
    largest_unit: int = 0
    """Saved bytes of the largest checkpointed unit (re-materialised during backward)."""
    largest_tensor: int = 0
    units: int = 0
    unit_inputs: int = 0
    """Part of `retained`: the checkpointed units' inputs (what `train.offload_activations`
    moves to host memory)."""
    largest_unit_input: int = 0


class _Counter:
    def __init__(self, params: set[int]):
        self.params = params
        self.seen: dict[int, torch.Tensor] = {}  # keeps refs: ids stay unique during the pass
        self.count = SavedCount()
        self.unit_bytes: int | None = None  # inside a checkpointed unit
        self.depth = 0

    def _bytes(self, t: torch.Tensor) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        t = t._base if t._base is not None else t  # a view costs nothing beyond its base
        if id(t) in self.params or id(t) in self.seen:  # frozen weights are counted as weights
            return 0
        self.seen[id(t)] = t
        n = t.numel() * t.element_size()
        self.count.largest_tensor = max(self.count.largest_tensor, n)
        return n

    def pack(self, t):
        n = self._bytes(t)
        if self.unit_bytes is None:
            self.count.retained += n
        else:
            self.unit_bytes += n
        return t

    def checkpoint(self, fn, *args):
        """Stand-in for diffusers' `_gradient_checkpointing_func` (non-reentrant semantics)."""
        if self.depth:  # nested unit: part of the outer unit's recompute
            return fn(*args)
        self.count.units += 1
        leaves = torch.utils._pytree.tree_leaves(args)
        held = sum(self._bytes(a) for a in leaves if isinstance(a, torch.Tensor))
        self.count.retained += held
        self.count.unit_inputs += held
        self.count.largest_unit_input = max(self.count.largest_unit_input, held)
        self.depth, self.unit_bytes = 1, 0
        seen_before = dict(self.seen)
        try:
            out = fn(*args)
        finally:
            self.count.largest_unit = max(self.count.largest_unit, self.unit_bytes or 0)
            self.depth, self.unit_bytes = 0, None
            self.seen = seen_before  # unit internals are freed after the forward
        return out


def _cast(module: torch.nn.Module, dtype) -> torch.nn.Module:
    for p in module.parameters():  # not `.to(dtype)`: diffusers warns about fp32 modules
        p.data = p.data.to(dtype)
    return module


def _inputs(family: str, batch: int, h: int, w: int, dtype, t5_len: int):
    """Meta-device (latents, timesteps, cond) of one denoiser call (`Family.planner_inputs`)."""
    return _family(family).planner_inputs(batch, h, w, dtype, t5_len)


@functools.lru_cache(maxsize=64)
def saved_activations(
    family: str,
    resolution: int,
    batch: int,
    checkpointing: bool,
    precision: str,
    targets: tuple[str, ...],
    rank: int,
    t5_len: int = 0,
) -> SavedCount:
    """Trace one training forward of the real LoRA-injected denoiser on meta; see module doc."""
    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    den = _cast(build_denoiser(family), dtype)
    den.requires_grad_(False)
    inject_lora(den, LoraConfigSection(rank=rank, alpha=rank, target_modules=list(targets)), 0)
    side = resolution // 8
    return count_saved(den, family, *_inputs(family, batch, side, side, dtype, t5_len),
                       checkpointing=checkpointing)  # fmt: skip


@functools.lru_cache(maxsize=64)
def step_activations(
    family: str,
    resolution: int,
    batch: int,
    checkpointing: bool,
    precision: str,
    targets: tuple[str, ...],
    rank: int,
    t5_len: int = 0,
    quantize: str = "none",
    offload: bool = False,
) -> StepPeak:
    """One training step of the real LoRA-injected denoiser simulated on meta as CUDA runs it
    (`simulate_step` with `CudaAutocast` under mixed precision, frozen weights in the precision's
    dtype, fp32 LoRA weights, `quantize` layers as `QuantizedLinearSim`); see the module doc."""
    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    den = _cast(build_denoiser(family), dtype)
    if quantize in ("nf4", "int8"):  # fp8 storage: compute-dtype layers in the step, as here
        quantize_sim(den, quantize)
    den.requires_grad_(False)
    params = inject_lora(
        den, LoraConfigSection(rank=rank, alpha=rank, target_modules=list(targets)), 0
    )
    for p in params:  # lorakit trains fp32 LoRA weights under autocast
        p.data = p.data.float()
    _peft_bnb_behaviour(den)
    side = resolution // 8
    lat, t, cond = _inputs(family, batch, side, side, dtype, t5_len)
    amp = None if precision == "no" else dtype
    with warnings.catch_warnings():  # rms_norm of fp32 input + bf16 weight, as on CUDA: noise
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        return simulate_step(den, family, lat, t, cond, checkpointing, offload, autocast=amp)


def count_saved(den, family: str, lat, t, cond, checkpointing: bool) -> SavedCount:
    """Bytes autograd saves in one training forward of `den` (LoRA already injected) through
    `family.predict`; works on meta and on real tensors alike (SDPA counted as CUDA runs it)."""
    counter = _Counter({id(p) for p in den.parameters()})
    if checkpointing:
        den.enable_gradient_checkpointing(gradient_checkpointing_func=counter.checkpoint)
    den.train()
    dtype = lat.dtype
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x)
    with hooks, _CudaLikeAttention(), autocast:
        _family(family).predict(den, lat, t, cond)
    return counter.count


@dataclass
class StepPeak:
    """Bytes above the step's static tensors (weights, buffers, inputs) in one training step."""

    forward: int
    """Peak while running the forward pass + loss."""
    backward: int
    """Peak over forward + backward (includes the LoRA gradients created in backward)."""
    grads: int
    """Bytes of the trainable parameters' `.grad` after backward."""

    @property
    def activations(self) -> int:
        """The backward peak less the parameter gradients (a row of their own in a plan)."""
        return max(self.backward - self.grads, 0)


def simulate_step(
    den: torch.nn.Module,
    family: str,
    lat: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor],
    checkpointing: bool,
    offload: bool = False,
    autocast: torch.dtype | None = None,
) -> StepPeak:
    """Run one forward + MSE loss + backward of `den` (LoRA injected, frozen base) under a
    `StorageMeter` and return the peaks above the static tensors.

    On the meta device this is the planner's activation model and pure shape arithmetic: every
    tensor the real step creates is created with its real shape and freed when the real step
    frees it (saved for backward, released by backward, recomputed unit by unit by torch's own
    non-reentrant checkpoint). SDPA is counted as the flash kernels run it (CUDA flash /
    memory-efficient and CPU's flash kernel alike: q, k, v, output and log-sum-exp are saved,
    never the `L × L` weights). With `autocast` (a dtype) the forward and the loss run under
    CUDA autocast's policy (`CudaAutocast`; on meta folded into the SDPA mode), backward outside
    it, as `lorakit train` runs them; checkpoint recomputes re-enter it. Not modelled:
    kernel-internal workspaces (`KERNEL_WORKSPACE`). With `offload` the units' inputs are held as
    `train.offload_activations` holds them (`lorakit.offload`), off the device.
    On real CPU tensors the same call is a measurement (`benchmarks/planner_cpu.py`).
    """
    from torch.utils.checkpoint import checkpoint

    from lorakit.offload import OffloadedCheckpoint

    meter = StorageMeter()
    if lat.is_meta:  # SDPA as CUDA's kernels save it (+ CUDA autocast's casts), one mode
        context = lambda: _CudaLikeAttention(autocast)  # noqa: E731
    elif autocast is not None:
        context = lambda: CudaAutocast(autocast)  # noqa: E731
    else:
        context = contextlib.nullcontext
    if checkpointing:
        # torch's checkpoint re-enters the forward's autocast state for the recompute in
        # backward; the emulated autocast is re-entered the same way
        both = lambda: (context(), context())  # noqa: E731
        if offload:
            func = OffloadedCheckpoint(lat.device, False, meter.untrack, both)
        else:
            func = functools.partial(checkpoint, use_reentrant=False, context_fn=both)
        den.enable_gradient_checkpointing(gradient_checkpointing_func=func)
    den.train()
    trainable = [p for p in den.parameters() if p.requires_grad]
    target = torch.empty_like(lat) if lat.is_meta else torch.randn_like(lat)
    meter.track(*_static(den), lat, t, target, *cond.values())
    static = meter.live
    with meter:
        with context():  # as `lorakit train`: forward + loss under autocast, backward outside
            pred = _family(family).predict(den, lat, t, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            del pred
        forward = meter.peak
        loss.backward()
        del loss
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    for p in trainable:
        p.grad = None
    return StepPeak(forward - static, meter.peak - static, grads)


def step_rows(
    den: torch.nn.Module,
    family: str,
    lat: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor],
    checkpointing: bool,
    optimizer: str = "adamw",
    offload: bool = False,
    block_swap: int = 0,
) -> dict[str, int]:
    """The planner's training-step components for ANY LoRA-injected denoiser (usually on meta),
    in the dtypes its tensors have (no autocast): frozen weights + buffers, LoRA weights, their
    gradients, optimizer state (`optimizer_bytes`), activations (`simulate_step`) and the batch
    (latents, timesteps, conditioning, target). Their sum is the predicted peak of one step
    (forward + backward + optimizer step); `tests/test_planner_calibration.py` and
    `benchmarks/planner_cpu.py` compare it with a `StorageMeter` measurement on CPU. With
    `block_swap` the last blocks' frozen bytes are replaced by the device ring
    (`tests/test_block_swap.py` compares that with a step of a swapped model)."""
    trainable = [p for p in den.parameters() if p.requires_grad]
    ids = {id(p) for p in trainable}
    frozen = sum(p.numel() * p.element_size() for p in den.parameters() if id(p) not in ids)
    frozen += sum(b.numel() * b.element_size() for b in den.buffers())
    ring = 0
    if block_swap:
        from lorakit.blockswap import SLOTS, block_bytes, swapped_blocks

        blocks = [b for _, b in swapped_blocks(den, _family(family), block_swap)]
        frozen -= sum(_frozen_bytes(b) for b in blocks)
        ring = min(SLOTS, block_swap) * max(block_bytes(b) for b in blocks)
    lora = sum(p.numel() * p.element_size() for p in trainable)
    batch = sum(x.numel() * x.element_size() for x in (lat, t, *cond.values()))
    batch += lat.numel() * lat.element_size()  # the loss target
    peak = simulate_step(den, family, lat, t, cond, checkpointing, offload)
    return {
        "weights": frozen,
        **({"block swap ring": ring} if block_swap else {}),
        "LoRA weights": lora,
        "LoRA gradients": peak.grads,
        "optimizer state": optimizer_bytes([p.numel() for p in trainable], optimizer),
        "activations": peak.activations,
        "batch tensors": batch,
    }


def measure_step(
    den: torch.nn.Module,
    family: str,
    lat: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor],
    checkpointing: bool,
    optimizer: str = "adamw",
    offload: bool = False,
) -> tuple[int, StepPeak]:
    """MEASURED peak live bytes of one real CPU training step of `den` (LoRA injected): forward +
    loss + backward (`simulate_step` on real tensors) and then lorakit's optimizer step (its
    state is created here, as in a run's first step). Returns (peak over the whole step, weights
    and batch included; the forward/backward `StepPeak`)."""
    from lorakit.config import TrainConfig
    from lorakit.train import build_optimizer

    trainable = [p for p in den.parameters() if p.requires_grad]
    opt = build_optimizer(trainable, TrainConfig(optimizer=optimizer), lat.device)
    before = StorageMeter().track(*_static(den), lat, t, *cond.values())
    static = before.live + lat.numel() * lat.element_size()  # + the target simulate_step makes
    step = simulate_step(den, family, lat, t, cond, checkpointing, offload)
    for p in trainable:  # the gradients simulate_step measured and released, back for the step
        p.grad = torch.ones_like(p)
    meter = StorageMeter().track(*_static(den), lat, t, *cond.values())
    meter.track(*(p.grad for p in trainable))
    with meter:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return max(static + step.backward, meter.peak), step


def _static(den: torch.nn.Module) -> list[torch.Tensor]:
    """The device tensors a step starts with: parameters, buffers and, with block swap, its
    ring slots (the streamed blocks' host buffers are not device memory)."""
    swap = getattr(den, "_lorakit_block_swap", None)
    return [*den.parameters(), *den.buffers(), *(swap.ring if swap is not None else ())]


def _frozen_bytes(module: torch.nn.Module) -> int:
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    return frozen + sum(b.numel() * b.element_size() for b in module.buffers())


class _FlashAttention(torch.autograd.Function):
    """Shape-only stand-in for SDPA as it runs on CUDA (flash / memory-efficient kernels): saves
    q, k, v, the output and a fp32 log-sum-exp `[B, H, L]`, never the `L × L` weights that the
    math fallback on the meta device would materialise."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (meta tensors only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _CudaLikeAttention(torch.overrides.TorchFunctionMode):
    """SDPA as `_FlashAttention`; with `autocast` also CUDA autocast's casts (`CudaAutocast`),
    in ONE mode: torch's checkpoint enters it again for each unit's recompute in backward."""

    def __init__(self, autocast: torch.dtype | None = None):
        super().__init__()
        self.autocast = autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.autocast is not None:
            args, kwargs = autocast_args(func, args, kwargs, self.autocast)
        if func is torch.nn.functional.scaled_dot_product_attention:
            kw = dict(kwargs or {})
            q, k, v = [*args, *(kw.get(n) for n in ("query", "key", "value")[len(args) :])][:3]
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention: expand like the kernel
                rep = q.shape[-3] // k.shape[-3]
                k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
            return _FlashAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


# --- CUDA emulation on the meta device ---------------------------------------------------------
#
# Meta tensors have no autocast dispatch key and bitsandbytes has no meta kernels, so a plain meta
# trace runs every op in the weights' dtype through plain `nn.Linear`s. On CUDA the same step
# runs under `torch.autocast("cuda")` (norms/softmax/losses in fp32, matmuls/convs in bf16/fp16)
# through bitsandbytes layers. The two helpers below make the meta trace do what CUDA does, with
# every cast a real autograd op so its saved tensors are counted as CUDA keeps them.


def _fns(owner: Any, *names: str) -> set:
    return {getattr(owner, n) for n in names if hasattr(owner, n)}


_F, _T = torch.nn.functional, torch.Tensor
_AC_LOWER = (
    _fns(_F, "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d", "prelu", "scaled_dot_product_attention")
    | _fns(torch, "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
           "addbmm", "baddbmm", "bmm", "chain_matmul")
    | _fns(torch.linalg, "vecdot", "multi_dot")
    | _fns(_T, "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "mm", "mv",
           "addbmm", "baddbmm", "bmm", "prelu")
)  # fmt: skip
"""CUDA autocast's `lower_precision_fp` ops (aten/src/ATen/autocast_mode.h,
`AT_FORALL_LOWER_PRECISION_FP`): floating inputs are cast to the autocast dtype."""
_AC_FP32 = (
    _fns(torch, "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
         "reciprocal", "rsqrt", "sinh", "tan", "pow", "layer_norm", "group_norm",
         "native_layer_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity",
         "poisson_nll_loss", "cosine_embedding_loss", "hinge_embedding_loss", "kl_div",
         "margin_ranking_loss", "triplet_margin_loss", "binary_cross_entropy_with_logits",
         "dist", "pdist", "cdist", "renorm", "logsumexp")
    | _fns(_T, "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
           "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "dist", "renorm",
           "logsumexp")
    | _fns(_F, "softplus", "layer_norm", "group_norm", "cosine_similarity", "poisson_nll_loss",
           "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
           "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
           "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
           "multi_margin_loss", "binary_cross_entropy_with_logits", "pdist")
)  # fmt: skip
"""CUDA autocast's `fp32` ops (`AT_FORALL_FP32`): floating inputs are cast to float32."""
_AC_FP32_OPT = (
    _fns(torch, "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum")
    | _fns(_T, "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum")
    | _fns(_F, "softmax", "log_softmax")
    | _fns(torch.linalg, "vector_norm", "matrix_norm")
)  # fmt: skip
"""`fp32_set_opt_dtype` ops (`AT_FORALL_FP32_SET_OPT_DTYPE`): run with `dtype=float32` unless
the caller passed a dtype (the input is converted inside the kernel)."""
_AC_PROMOTE = _fns(torch, "addcdiv", "addcmul", "atan2", "cross", "dot", "tensordot",
                   "scatter_add", "index_put") | _fns(
    _T, "addcdiv", "addcmul", "atan2", "cross", "dot", "scatter_add", "index_put"
) | _fns(_F, "bilinear", "grid_sample")  # fmt: skip
"""`promote` ops (`AT_FORALL_PROMOTE`): floating inputs are cast to the widest among them."""


def _eligible(x: Any) -> bool:  # autocast's `is_eligible`: floating, not float64
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


class CudaAutocast(torch.overrides.TorchFunctionMode):
    """`torch.autocast("cuda", dtype)` for tensors of ANY device (meta included): the CUDA cast
    policy applied above autograd, as the `AutocastCUDA` dispatch key does, so the casts are
    autograd ops and what each op saves for backward has the dtype it has on CUDA (layer_norm /
    group_norm / softmax / losses fp32, linear / conv / matmul / SDPA in `dtype`, fp32 LoRA
    weights cast to `dtype` per call). Ops outside the policy lists run in their inputs' dtype.
    Not emulated: autocast's weight-cast cache (the LoRA copies are counted per call instead).
    (Tried first: `FakeTensorMode` with fake CUDA tensors under the real CUDA autocast. On a
    CPU-only torch build the casts do apply, but indexing a fake CUDA tensor raises "PyTorch is
    not linked with support for cuda devices", so the policy is replayed here instead.)"""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = autocast_args(func, args, kwargs, self.dtype)
        return func(*args, **kwargs)


def autocast_args(func, args: tuple, kwargs: dict | None, dtype: torch.dtype):
    """`(args, kwargs)` of a call to `func` with CUDA autocast's cast policy for `dtype` applied
    (`CudaAutocast`); unchanged for ops outside the policy lists."""
    kwargs = dict(kwargs or {})
    tree_map = torch.utils._pytree.tree_map
    if func in _AC_LOWER:
        target = dtype
    elif func in _AC_FP32:
        target = torch.float32
    elif func in _AC_FP32_OPT:
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        first = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
        explicit = kwargs.get("dtype") is not None or any(
            isinstance(x, torch.dtype) for x in leaves
        )
        if first is not None and _eligible(first) and first.dtype != torch.float32 and not explicit:
            kwargs["dtype"] = torch.float32  # the kernel converts its input; no autograd cast
        return args, kwargs
    elif func in _AC_PROMOTE:
        floats = [x.dtype for x in torch.utils._pytree.tree_leaves((args, kwargs)) if _eligible(x)]
        if not floats:
            return args, kwargs
        target = functools.reduce(torch.promote_types, floats)
    else:
        return args, kwargs
    cast = lambda x: x.to(target) if _eligible(x) and x.dtype != target else x  # noqa: E731
    return tree_map(cast, args), tree_map(cast, kwargs)


class _Dequant4bitMatmul(torch.autograd.Function):
    """Shape-level `bitsandbytes.MatMul4Bit` as it runs at training sizes on CUDA (more than
    `_gemm_4bit_custom_max_m` = 256 rows: the dequantize + `F.linear` fallback). Forward and
    backward each materialise the dequantized `[out, in]` weight in the input's dtype (plus its
    fp32 absmax per 64-block) for one matmul; nothing is saved for backward (the 4-bit weight is
    a parameter)."""

    @staticmethod
    def forward(ctx, a, out_features: int, bias):
        ctx.out_features, ctx.in_features = out_features, a.shape[-1]
        k = a.shape[-1]
        _absmax = a.new_empty(math.ceil(out_features * k / 64), dtype=torch.float32)
        w = a.new_empty(out_features, k)
        return _F.linear(a, w, bias)  # absmax and w are freed on return, as in bitsandbytes

    @staticmethod
    def backward(ctx, grad):
        n, k = ctx.out_features, ctx.in_features
        _absmax = grad.new_empty(math.ceil(n * k / 64), dtype=torch.float32)
        w = grad.new_empty(n, k)
        return grad @ w, None, None


class _Int8Matmul(torch.autograd.Function):
    """Shape-level `bitsandbytes.MatMul8bitLt` (LLM.int8, frozen weight): the input is cast to
    fp16 and saved, quantized to an int8 copy, the product comes out of an int32 accumulator;
    backward dequantizes the weight to fp16 for one matmul."""

    @staticmethod
    def forward(ctx, a, out_features: int, bias):
        a16 = a.to(torch.float16)
        ctx.save_for_backward(a16)
        ctx.out_features = out_features
        q = a16.new_empty(a16.shape, dtype=torch.int8)
        acc = a16.new_empty(*a16.shape[:-1], out_features, dtype=torch.int32)
        del q
        out = acc.to(torch.float16)
        del acc
        if bias is not None:
            out = out + bias.to(torch.float16)
        return out.to(a.dtype)

    @staticmethod
    def backward(ctx, grad):
        (a16,) = ctx.saved_tensors
        w = grad.new_empty(ctx.out_features, a16.shape[-1], dtype=torch.float16)
        return (grad.to(torch.float16) @ w).to(grad.dtype), None, None


class QuantizedLinearSim(torch.nn.Linear):
    """A frozen `bnb.nn.Linear4bit` (NF4, compute dtype bf16) or `Linear8bitLt` as lorakit
    loads it (`models/quantize.py`), for the meta trace. 4-bit: the input is cast to the compute
    dtype, `_Dequant4bitMatmul` runs, the output is cast back to the input's dtype. peft's
    LoRA wrapper of a bitsandbytes layer clones that output (`result.clone()`) and, under
    autocast, does not cast the input to the LoRA weights' dtype: `clone_output` and
    `prepare_for_lora` reproduce that. Weight bytes are counted by `weight_bytes`, not here."""

    def __init__(self, linear: torch.nn.Linear, mode: str):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device="meta", dtype=linear.weight.dtype)  # fmt: skip
        self.weight, self.bias = linear.weight, linear.bias
        self.mode = mode
        self.clone_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nf4":
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            out = _Dequant4bitMatmul.apply(x.to(torch.bfloat16), self.out_features, bias)
            out = out.to(x.dtype)
        else:
            out = _Int8Matmul.apply(x, self.out_features, self.bias)
        return out.clone() if self.clone_output else out


def quantize_sim(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Swap every `nn.Linear` of `module` for a `QuantizedLinearSim` (as diffusers'
    bitsandbytes quantizer swaps every Linear of a FLUX/SD3 transformer); in place."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(module, name, QuantizedLinearSim(child, mode))
        else:
            quantize_sim(child, mode)
    return module


def _peft_bnb_behaviour(module: torch.nn.Module) -> None:
    """After LoRA injection: LoRA layers around a `QuantizedLinearSim` behave as peft's
    bitsandbytes LoRA layers (clone the base output; no input cast under autocast)."""
    for m in module.modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, QuantizedLinearSim):
            base.clone_output = True
            m.cast_input_dtype_enabled = False


class _LivePeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensors created inside the mode (meta tensors; views not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not any(t is a for a in args):
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


class StorageMeter(torch.utils._python_dispatch.TorchDispatchMode):
    """MEASURED peak bytes of live tensor storages while the mode is active (real CPU tensors).

    Every storage that an op's outputs live in is counted once (views, in-place results and
    `detach()` share their base's storage and add nothing), and leaves the count when the storage
    itself dies — a `weakref.finalize` on the `UntypedStorage`, whose Python object torch keeps
    for as long as any tensor, view or autograd-saved reference holds it. Backward ops and the
    optimizer step run on the calling thread on CPU, so they are seen too. Tensors that existed
    before are added with `track` (weights, inputs): the peak then covers everything. Not seen:
    scratch buffers an ATen kernel allocates and frees inside one op (e.g. oneDNN workspaces) —
    CUDA's `max_memory_allocated` would count those.

    `peak`, `live` are bytes; `events` counts storages created inside the mode.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.events = 0
        self._sizes: dict[int, int] = {}
        self._host: set[int] = set()

    def _gone(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._host.discard(key)

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, n = id(storage), storage.nbytes()
        if key in self._host:
            return
        if key in self._sizes:
            if self._sizes[key] != n:  # resized in place (`out=` ops)
                self.live += n - self._sizes[key]
                self._sizes[key] = n
        else:
            self._sizes[key] = n
            self.live += n
            self.events += 1
            weakref.finalize(storage, self._gone, key)
        self.peak = max(self.peak, self.live)

    def untrack(self, t: torch.Tensor) -> None:
        """Stop counting `t`'s storage (a copy held in host memory, not device memory)."""
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self._sizes:
            weakref.finalize(storage, self._gone, key)
        self.live -= self._sizes.pop(key, 0)
        self._host.add(key)  # never counted again while it lives

    def track(self, *tensors: torch.Tensor) -> StorageMeter:
        """Count tensors that already exist (parameters, buffers, inputs) as live."""
        for t in tensors:
            self._add(t)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            self._add(t)
        return out


@functools.lru_cache(maxsize=64)
def inference_peak(
    family: str, what: str, resolution: int, batch: int, precision: str, t5_len: int = 0
) -> int:
    """Peak working-set bytes of an inference pass on meta: `vae_encode` (fp32 VAE, pixels in),
    `vae_decode`, or `denoise` (one no-grad denoiser call)."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    side = resolution // 8
    with torch.no_grad(), _CudaLikeAttention():
        if what == "denoise":
            den = _cast(build_denoiser(family), dtype)
            lat, t, cond = _inputs(family, batch, side, side, dtype, t5_len)
            with _LivePeak() as mode:
                _family(family).predict(den, lat, t, cond)
            return mode.peak
        vae = build_frozen(family)["vae"]
        if what == "vae_encode":
            x = torch.empty(batch, 3, resolution, resolution, device="meta")
            with _LivePeak() as mode:
                vae.encode(x)
        else:
            z = torch.empty(batch, vae.config.latent_channels, side, side, device="meta")
            with _LivePeak() as mode:
                vae.decode(z)
        return mode.peak


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    family: str
    rows: dict[str, int]
    """Component → bytes during the training phase (allocated)."""
    phases: dict[str, int]
    """Phase (`cache`, `train`, `sample`) → predicted `max_memory_allocated` bytes."""
    notes: list[str] = field(default_factory=list)
    host: dict[str, int] = field(default_factory=dict)
    """Host memory the run holds in place of device memory (`train.block_swap`), bytes."""
    real: str = ""
    """The real model planned (`Family.real_label`)."""
    passes: dict[str, int] = field(default_factory=dict)
    """Denoiser passes per micro-batch: `forward` (with gradients), `forward without grad`,
    `backward` (1, 0, 1; anti-bleed preservation 2, 1, 2; prior preservation one more forward
    and backward)."""

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def needed(self) -> int:
        """Device memory the run needs: allocated peak + allocator slack + CUDA context."""
        return int(self.peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT)

    def fits(self, vram_gib: float) -> bool:
        return self.needed <= vram_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        gib = lambda n: round(n / GIB, 3)  # noqa: E731
        return {
            "family": self.family,
            "real_model": self.real,
            "train_components_gib": {k: gib(v) for k, v in self.rows.items()},
            "phases_gib": {k: gib(v) for k, v in self.phases.items()},
            "peak_allocated_gib": gib(self.peak),
            "peak_phase": self.peak_phase,
            "needed_gib": gib(self.needed),
            "host_gib": {k: gib(v) for k, v in self.host.items()},
            "denoiser_passes": self.passes,
            "notes": self.notes,
        }


def family_of(c: Config) -> str:
    """The family a config trains, without touching the network (hub ids need model.family
    or a name that says which family it is)."""
    from lorakit.errors import ConfigError

    if c.model.family != "auto":
        return c.model.family
    name = c.model.name.lower()
    if name.startswith("tiny:"):
        return name.split(":", 1)[1]
    for fam in reversed(FAMILIES.values()):  # `Family.name_hints`: later families first
        if any(hint in name for hint in fam.name_hints):
            return fam.name
    from pathlib import Path

    if Path(c.model.name).expanduser().exists():
        from lorakit.models import resolve_family

        return resolve_family(c.model)[0].name
    raise ConfigError(
        f"lorakit plan cannot tell the family of model.name '{c.model.name}' offline. Set "
        f"model.family ({', '.join(FAMILIES)}), e.g. --set model.family={next(iter(FAMILIES))}."
    )


_REAL: dict[str, Any] = {}
"""Planner key ("flux2-klein@FLUX.2 klein 4B") → the `Family.real_model` it stands for."""


def _family(key: str):
    """The family object of a planner key: a registry name, or `name@real_label` for a
    `real_model` other than the registered one (klein 4B)."""
    return _REAL.get(key) or FAMILIES[key.partition("@")[0]]


def planner_key(c: Config) -> str:
    """`family_of(c)`, with the real model the name picks (`Family.real_model`): the key every
    function here caches the real architecture under."""
    name = family_of(c)
    real = FAMILIES[name].real_model(c.model.name)
    if real is FAMILIES[name]:
        return name
    key = f"{name}@{real.real_label}"
    _REAL[key] = real
    return key


@functools.lru_cache(maxsize=16)
def _counts(family: str, drop_t5: bool):
    den = build_denoiser(family)
    frozen = build_frozen(family, drop_t5)
    return den, {n: m for n, m in frozen.items()}


def plan(c: Config, images: int = VAE_ENCODE_CHUNK) -> Plan:
    """Predicted peak `torch.cuda.max_memory_allocated` of `lorakit train` with config `c`
    (the real architecture of its family; `tiny:` names are planned as the real model)."""
    family = planner_key(c)
    t, lo = c.train, c.lora
    prec = t.mixed_precision
    eb = DTYPE_BYTES[prec]
    fam = _family(family)
    spec = build_spec(c, fam)  # the run's decisions, as `train` makes them
    den, frozen = _counts(family, c.model.drop_t5)  # families without T5 to drop ignore it
    quant = c.model.quantize if fam.quantizable or c.model.quantize == "fp8" else "none"
    targets = spec.targets
    t5_len = spec.text_length

    rows: dict[str, int] = {"denoiser weights": weight_bytes(den, eb, quant)}
    host: dict[str, int] = {}
    if spec.block_swap:  # the streamed blocks' frozen weights: host memory + a device ring
        streamed, slot, slots = swap_bytes(family, spec.block_swap, eb, quant)
        rows["denoiser weights"] -= streamed
        rows[f"block swap ring ({slots} blocks)"] = slots * slot
        host[f"{spec.block_swap} streamed blocks"] = streamed
    frozen_bytes = {}
    for name, m in frozen.items():
        # as train places them, on a GPU with bf16 (what the planner plans for)
        fb = frozen_dtype(name, m, WEIGHT_DTYPES[prec], bf16_supported=True).itemsize
        frozen_bytes[name] = weight_bytes(m, fb)
    sizes = lora_shapes(den, list(targets), lo.rank)
    te_sizes: list[int] = []
    if spec.train_text_encoder:
        for m in frozen.values():
            if type(m).__name__.startswith("CLIP"):
                te_sizes += lora_shapes(m, list(spec.text_encoder_targets), spec.text_encoder_rank)
    all_sizes = sizes + te_sizes
    n_lora = sum(all_sizes)
    rows["LoRA weights (fp32)"] = 4 * n_lora
    rows["LoRA gradients (fp32)"] = 4 * n_lora
    if eb == 2:
        rows["LoRA autocast copies"] = 2 * n_lora
    opt_name = t.optimizer.lower().replace("_", "")
    if opt_name not in OPTIMIZERS:  # an optimizer the planner has no table for: AdamW's 8 B
        opt_name = "adamw"
    rows[f"optimizer state ({t.optimizer})"] = optimizer_bytes(all_sizes, opt_name)

    resident = spec.encoders_stay_on_device
    if resident:
        for name, b in frozen_bytes.items():
            rows[f"{name} (resident)"] = b
    offload = t.gradient_checkpointing and t.offload_activations
    step = step_activations(family, spec.resolution, t.batch_size, t.gradient_checkpointing,
                            prec, targets, lo.rank, t5_len, quant, offload)  # fmt: skip
    label = " (checkpointed, inputs offloaded)" if offload else " (checkpointed)"
    activations = step.activations
    pres = spec.preservation
    if pres is not None:  # its no-grad base forward runs while no step graph is alive
        base_pass = inference_peak(family, "denoise", spec.resolution, t.batch_size, prec, t5_len)
        activations = max(activations, base_pass)
    rows["activations" + (label if t.gradient_checkpointing else "")] = (
        activations + KERNEL_WORKSPACE
    )
    if spec.train_text_encoder:
        # CLIP activations at 77 tokens are small next to the denoiser's: 2 × saved estimate
        te_act = sum(
            t.batch_size * 77 * m.config.hidden_size * m.config.num_hidden_layers * 24 * eb
            for n, m in frozen.items()
            if type(m).__name__.startswith("CLIP")
        )
        rows["text-encoder activations"] = te_act
    rows["batch tensors"] = (
        6 * t.batch_size * fam.plan_arch.latent_channels * (spec.resolution // 8) ** 2 * 4
    )
    if pres is not None:  # held through the preservation forward + backward (lorakit/preserve.py)
        rows["anti-bleed base prediction"] = (
            t.batch_size * fam.plan_arch.latent_channels * (spec.resolution // 8) ** 2 * eb
        )
    if spec.prior_weight:  # the class batch: its tensors beside the instance batch's; its graph
        # only after the instance backward (lorakit/data/reg.py), so no more activations
        rows["class batch tensors (prior preservation)"] = rows["batch tensors"]
    train_phase = sum(rows.values())

    # The loop brings the denoiser to the device only after caching (a quantized one, which
    # bitsandbytes loads onto the GPU, is parked in host memory meanwhile).
    weights_all = sum(frozen_bytes.values())
    streamed_note = ""
    if spec.stream_encoders:  # text encoders: resident parts + one streamed layer (no prefetch)
        from lorakit.encoder_stream import streamed_bytes

        saved = 0
        for name, m in frozen.items():
            if name != "vae":
                fb = frozen_dtype(name, m, WEIGHT_DTYPES[prec], bf16_supported=True).itemsize
                units, largest = streamed_bytes(m, fb)
                saved += units - largest
        weights_all -= saved
        streamed_note = (
            f"train.stream_encoders = true: while caching, the text encoders' layers stream from "
            f"host memory one at a time ({saved / GIB:.2f} GiB less on the device; slower "
            "caching, same results)."
        )
    chunk = min(images, VAE_ENCODE_CHUNK)
    cache_phase = weights_all + inference_peak(family, "vae_encode", spec.resolution, chunk, prec)
    phases = {"cache": cache_phase, "train": train_phase}
    notes = []
    if spec.sampling:
        sw = c.sample.width or spec.resolution
        sh = c.sample.height or spec.resolution
        sres = max(sw, sh)
        keep = rows["denoiser weights"] + 4 * n_lora + rows[f"optimizer state ({t.optimizer})"]
        keep += sum(v for k, v in rows.items() if k.startswith("block swap ring"))
        if eb == 2:
            keep += 2 * n_lora
        # Previews are rendered from prompt embeddings encoded once while caching: only the VAE
        # joins the denoiser, unless everything frozen stays resident anyway (encode_each_step)
        # or the pipeline re-encodes its prompts (`spec.preview_embeds` false).
        pre = spec.preview_embeds and not resident
        with_previews = frozen_bytes["vae"] if pre else sum(frozen_bytes.values())
        # Previews encode their prompts at the run's text length, as training does
        # (`GridSpec.text_length`).
        sample_t5 = spec.text_length
        sample_phase = (
            keep
            + with_previews
            + max(
                inference_peak(family, "denoise", sres, fam.plan_arch.cfg_batch, prec, sample_t5),
                inference_peak(family, "vae_decode", sres, 1, prec),
            )
        )
        phases["sample"] = sample_phase
    if not resident:
        notes.append(
            "VAE and text encoders leave the device after caching; preview grids bring back "
            + (
                "only the VAE (their prompts are encoded once while caching)."
                if spec.preview_embeds or not spec.sampling
                else "the text encoders too (this family's pipeline re-encodes its prompts)."
            )
        )
    if phases["cache"] >= max(phases.values()):
        notes.append(
            "The caching phase (VAE and text encoders on the device + VAE encoding of "
            f"{chunk} image(s) at once) is the peak."
        )
    if streamed_note:
        notes.append(streamed_note)
    if pres is not None:
        notes.append(
            f"train.preserve_weight = {pres.weight:g} (anti-bleed preservation): each micro-batch "
            "runs the denoiser forward 3 times (the caption and the preservation prompt with the "
            "LoRA and gradients, the preservation prompt once more with the LoRA off and no "
            "gradients) and backward twice, one graph at a time: about twice the step time, the "
            "activation peak of one step."
        )
    if spec.prior_weight:
        notes.append(
            f"data.reg_folder (prior preservation, train.prior_weight = {spec.prior_weight:g}): "
            f"each micro-batch also trains on {t.batch_size} class image(s), one more denoiser "
            "forward and backward after the instance batch's, one graph at a time: about twice "
            "the step time, the activation peak of one batch, both batches' tensors."
        )
    if spec.block_swap:
        notes.append(
            f"train.block_swap = {spec.block_swap}: those blocks' frozen weights stay in pinned "
            "host memory and are copied to the device before each block runs (forward and "
            "backward): slower steps, same results."
        )
    real = _family(family)
    passes = {"forward": 1, "forward without grad": 0, "backward": 1}
    if pres is not None:
        passes = {"forward": 2, "forward without grad": 1, "backward": 2}
    if spec.prior_weight:  # the class batch (lorakit/data/reg.py)
        passes = {**passes, "forward": passes["forward"] + 1, "backward": passes["backward"] + 1}
    return Plan(real.name, rows, phases, notes, host, real.real_label, passes)


@functools.lru_cache(maxsize=16)
def _real_denoiser(family: str) -> torch.nn.Module:
    return build_denoiser(family)


@functools.lru_cache(maxsize=64)
def _block_bytes(family: str, eb: int, quant: str) -> tuple[tuple[int, int], ...]:
    """(frozen bytes as `weight_bytes` counts them, ring slot bytes) of every block of the real
    denoiser over the family's `swap_blocks`, in run order."""
    return blocks_bytes(_real_denoiser(family), family, eb, quant)


def blocks_bytes(den: torch.nn.Module, family: str, eb: int, quant: str = "none"):
    """`_block_bytes` of any denoiser (meta or real, without LoRA). fp8: the layers fp8 storage
    holds are chosen over the WHOLE denoiser (`quantize.fp8_layers`: its skip patterns match
    full names, e.g. a FLUX single block's `proj_out` is fp8) and stream as 1 byte per element,
    as `blockswap` lays them out."""
    from lorakit.blockswap import ALIGN, block_list, padded

    fp8: set[int] = set()
    if quant == "fp8":
        from lorakit.models.quantize import fp8_layers

        fp8 = {id(p) for m in fp8_layers(den) for p in m.parameters(recurse=False)}
    out = []
    for _, block in block_list(den, _family(family)):
        tensors = [*block.parameters(), *block.buffers()]
        if quant in ("none", "fp8"):
            held = weight_bytes(block, eb)
            held -= (eb - 1) * sum(p.numel() for p in block.parameters() if id(p) in fp8)

            def size(t: torch.Tensor) -> int:
                per = 1 if id(t) in fp8 else eb if t.is_floating_point() else t.element_size()
                return t.numel() * per

            slot = sum(padded(size(t)) for t in tensors)
        else:  # bitsandbytes: codes + absmax + code (+ nested absmax, code, offset) per Linear
            held = weight_bytes(block, eb, quant)
            slot = held + 6 * ALIGN * len(tensors)
        out.append((held, slot))
    return tuple(out)


def swap_bytes(family: str, n: int, eb: int, quant: str = "none") -> tuple[int, int, int]:
    """(host bytes of the last `n` blocks' frozen weights, bytes of one ring slot, slots) of the
    family's REAL denoiser with `train.block_swap = n`; ConfigError if it has fewer blocks."""
    from lorakit.blockswap import SLOTS, check_family
    from lorakit.errors import ConfigError

    check_family(_family(family), n)
    blocks = _block_bytes(family, eb, quant)
    if n > len(blocks):
        raise ConfigError(
            f"Config key 'train.block_swap' is {n}, but the real {family} denoiser has only "
            f"{len(blocks)} transformer blocks to stream. Set train.block_swap to at most "
            f"{len(blocks)} (`lorakit plan --vram GIB` proposes the smallest value that fits)."
        )
    last = blocks[len(blocks) - n :]
    return sum(h for h, _ in last), max(s for _, s in last), min(SLOTS, n)


def _default_targets(family: str) -> tuple[str, ...]:
    return tuple(_family(family).default_targets)


# --- proposals ---------------------------------------------------------------------------------


def _apply(c: Config, section: str, key: str, value: Any) -> Config:
    return replace(c, **{section: replace(getattr(c, section), **{key: value})})


def _steps(c: Config, family: str):
    """Candidate changes, cheapest quality loss first: (description, [(section, key, value)])."""
    if c.train.mixed_precision == "no":
        yield "bf16 mixed precision", [("train", "mixed_precision", "bf16")]
    if not c.train.gradient_checkpointing:
        yield "gradient checkpointing", [("train", "gradient_checkpointing", True)]
    if c.train.optimizer == "adamw":
        yield "8-bit AdamW", [("train", "optimizer", "adamw8bit")]
    if not c.train.offload_activations:
        yield "checkpoint inputs offloaded to CPU", [
            ("train", "gradient_checkpointing", True), ("train", "offload_activations", True)
        ]  # fmt: skip
    te = [("lora", "train_text_encoder", False)] if c.lora.train_text_encoder else []
    te += [("data", "shuffle_tags", False)] if c.data.shuffle_tags else []
    stream = [("train", "stream_encoders", True)]
    if not c.train.stream_encoders and not te:  # costs caching speed, not results
        yield "text encoders streamed while caching", stream
    if _family(family).swap_blocks:
        # costs speed, not results: from here on every candidate also tries the smallest
        # train.block_swap that fits (`propose`)
        yield "block swap", [SWAP_SEARCH]
    if te:
        yield "cached text-encoder outputs (encoders off the device)", te
        if not c.train.stream_encoders:  # refused while captions are encoded every step
            yield "text encoders streamed while caching", stream
    # Previews need only the VAE beside the denoiser (prompts pre-encoded); off, no sample phase.
    keys = ("every", "every_minutes", "every_epochs")
    previews = [("sample", k, type(getattr(c.sample, k))(0)) for k in keys if getattr(c.sample, k)]
    if previews:
        yield "no preview grids during training", previews
    fam = _family(family)
    if fam.quantizable and c.model.quantize != "nf4":
        yield "NF4 base", [("model", "quantize", "nf4")]
    batch, accum = c.train.batch_size, c.train.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        yield f"batch {batch} × {accum} accumulation", [
            ("train", "batch_size", batch), ("train", "grad_accum", accum)
        ]  # fmt: skip
    res = c.data.resolution
    floor = fam.min_resolution
    while res - 128 >= floor:
        res -= 128
        yield f"resolution {res}", [("data", "resolution", res)]


SWAP_SEARCH = ("train", "block_swap", None)
"""The block-swap step of `_steps`: not one value but the smallest that fits (`propose`)."""


def _smallest_swap(c: Config, family: str, vram_gib: float) -> tuple[int, Plan] | None:
    """The smallest `train.block_swap` above the config's own that makes `c` fit, with its
    plan; None if even streaming every block does not. Only weight arithmetic changes with N
    (the step trace is cached), so trying each value is cheap."""
    eb = DTYPE_BYTES[c.train.mixed_precision]
    blocks = len(_block_bytes(family, eb, "none"))
    for n in range(c.train.block_swap + 1, blocks + 1):
        p = plan(_apply(c, "train", "block_swap", n))
        if p.fits(vram_gib):
            return n, p
    return None


def propose(c: Config, vram_gib: float) -> tuple[list[str], Plan]:
    """`--set` lines that make `c` fit `vram_gib` by the planner's own estimate, applied in order
    of quality loss; ([], plan) when it already fits. From the block-swap step on (it costs
    speed, not quality), each candidate is also tried with the smallest `train.block_swap` that
    fits. Raises LorakitError when nothing fits."""
    from lorakit.errors import LorakitError

    current = plan(c)
    if current.fits(vram_gib):
        return [], current
    family = planner_key(c)
    changes: dict[str, Any] = {}
    swap = False
    for _desc, edits in list(_steps(c, family)):
        for section, key, value in edits:
            if (section, key, value) == SWAP_SEARCH:
                swap = True
                continue
            c = _apply(c, section, key, value)
            changes[f"{section}.{key}"] = value
        current = plan(c)
        if current.fits(vram_gib):
            return [f"{k}={_toml(v)}" for k, v in changes.items()], current
        found = _smallest_swap(c, family, vram_gib) if swap else None
        if found is not None:
            changes["train.block_swap"], current = found
            return [f"{k}={_toml(v)}" for k, v in changes.items()], current
    if swap:
        changes["train.block_swap"] = len(_block_bytes(family, 2, "none"))  # every block
        current = plan(_apply(c, "train", "block_swap", changes["train.block_swap"]))
    raise LorakitError(
        f"No lorakit setting makes this {family} config fit {vram_gib:g} GiB: even with "
        + ", ".join(f"{k}={_toml(v)}" for k, v in changes.items())
        + f" it needs ~{current.needed / GIB:.1f} GiB (peak in the {current.peak_phase} phase). "
        "Use a GPU with more memory."
    )


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    return str(v)


def detected_vram_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def check_before_training(c: Config, device: torch.device, strict: bool) -> str | None:
    """For `train.py`: None when the plan fits the CUDA device (or on CPU, where nothing runs);
    else a one-paragraph warning. Raises LorakitError instead when `strict`."""
    from lorakit.errors import LorakitError

    if device.type != "cuda":
        return None
    if c.model.name.startswith("tiny:"):
        return None  # tiny models: planning the real architecture would be meaningless
    try:
        p = plan(c)
    except LorakitError:
        return None  # family unknown offline: no estimate, no warning
    _free, total = torch.cuda.mem_get_info(device)
    vram = total / GIB
    if p.fits(vram):
        return None
    try:
        sets, _ = propose(copy.deepcopy(c), vram)
        fix = "Try: " + " ".join(f"--set {s}" for s in sets)
    except LorakitError as e:
        fix = str(e)
    msg = (
        f"lorakit plan estimates this run needs ~{p.needed / GIB:.1f} GiB (peak in the "
        f"{p.peak_phase} phase) but the GPU has {vram:.1f} GiB. {fix}"
    )
    if strict:
        raise LorakitError(msg + " (train.strict_memory = true: not starting.)")
    return msg


def table(p: Plan, vram_gib: float | None) -> str:
    """Plain-text table of a plan."""
    lines = [f"{'component (training phase)':<44}{'GiB':>9}"]
    for k, v in p.rows.items():
        lines.append(f"  {k:<42}{v / GIB:>9.2f}")
    lines.append("")
    for k, v in p.phases.items():
        lines.append(f"{'peak allocated, ' + k + ' phase':<44}{v / GIB:>9.2f}")
    lines.append(f"{'needed (+ allocator slack, CUDA context)':<44}{p.needed / GIB:>9.2f}")
    for k, v in p.host.items():
        lines.append(f"{'host memory, ' + k:<44}{v / GIB:>9.2f}")
    if p.passes:
        said = ", ".join(f"{n} {k}" for k, n in p.passes.items())
        lines.append(f"denoiser passes per micro-batch: {said}")
    for n in p.notes:
        lines.append(f"note: {n}")
    if vram_gib is not None:
        verdict = "fits" if p.fits(vram_gib) else "does NOT fit"
        lines.append(f"verdict: {verdict} in {vram_gib:g} GiB")
    return "\n".join(lines)
