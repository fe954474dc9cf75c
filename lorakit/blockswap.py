"""`train.block_swap = N`: the frozen weights of the denoiser's last N transformer blocks live in
(pinned) host memory and are streamed to the device just before each block runs.

    swap = enable_block_swap(denoiser, family, n, device)   # after LoRA injection, once

Which blocks: the LAST N over the family's `swap_blocks` lists concatenated in run order (FLUX:
19 double-stream then 38 single-stream blocks), as musubi-tuner's `--blocks_to_swap` picks them:
the blocks that run last in forward run first in backward, so the two that are still on the
device when the forward pass ends serve the start of backward without a copy.

What moves: every frozen tensor of a swapped block (parameters that do not require grad, buffers,
and the bitsandbytes state that IS the weight: a 4-bit layer's `quant_state` tensors, an int8
layer's `state.CB` / `state.SCB`) is copied once into one host buffer, each block a contiguous
slice laid out as in a device slot (one host→device copy per block). On CUDA the filled buffer
is page-locked in place with cudaHostRegister (torch's pinned allocator, the fallback, rounds an
allocation up to a power of two). The module keeps the same Parameter objects; between uses
their `.data` is an empty device placeholder, so `model.to(device)` (accelerate's `prepare`)
moves nothing, and any use of a block outside the swap fails loudly instead of reading another
block's weights. LoRA
parameters (`requires_grad`) and therefore their gradients and optimizer state are never
touched: they stay on the device like the unswapped blocks.

How: a ring of `slots` (2) device buffers, each the size of the largest swapped block. A block
is bound (its tensors' `.data` pointed at views of its slot) from its forward pre-hook until its
forward post-hook, and again from the moment its backward begins (a gradient hook on its outputs)
until the backward of the block before it begins. Binding waits only for that block's copy
event; the copy of the next block (forward: i+1, backward: i-1) is issued at once on a side
stream into the other slot, after an event that marks the end of the compute that last read
that slot, so transfer overlaps compute. Frozen weights are never copied back (host→device
only): the host buffer is the master copy. Each streamed block costs one host→device copy per
forward and one per backward pass; two blocks stay resident across the turn of each pass.

Autograd and saved weights:
- with gradient checkpointing (diffusers' non-reentrant checkpoint, `lorakit.offload` too) the
  forward saves nothing inside a block, and the recompute in backward runs inside the block's
  bound window: nothing else is needed;
- without checkpointing, autograd saves weight tensors (views such as `weight.t()`) of every
  block for backward, pointing at the slot the block had in forward, which another block may
  hold by the time backward reads them. A `saved_tensors_hooks` pair around
  each swapped block's forward replaces a saved tensor that lives in a slot by a token (block,
  offset, shape, stride) and, in backward, re-creates it from the block's current slot. Tensors
  that bitsandbytes keeps on its autograd context directly (not as saved tensors) are the
  Parameter objects themselves, rebound before the block's backward runs.
Gradients are bitwise those of an unswapped run (tests/test_block_swap.py).

fp8 storage (`model.quantize = 'fp8'`, `quantize.enable_fp8_storage`): a swapped block's
fp8-stored layers keep their float8 weights in the host buffer and the slots (half the bytes of
bf16 per copy). diffusers' layerwise-casting hook would, around each call, give the layer a
compute-dtype copy and then a NEW fp8 Parameter outside the slot (`module.to(dtype)`), which
the slot binding cannot follow. For the layers of swapped blocks its casts are replaced
(`_Fp8Casts`): before the layer runs, each fp8 Parameter (bound to its slot view) is set aside
and the layer gets a new Parameter holding `view.to(compute dtype)`, the value diffusers' cast
gives; after it runs, the fp8 Parameter (still the slot-bound object) is put back. The compute
copy lives only while the layer runs, unless autograd saved it: with gradient checkpointing the
recompute in backward casts again inside the block's bound window; without, the saved-tensor
hooks replace a saved cast copy (or a view of it) by a token too and re-cast it from the
block's current slot in backward. Gradients are bitwise those of the unswapped fp8 model.

`torch.compile` is refused (`config.validate`): the per-block hooks would break the graph.

On a CPU device the same code runs with `HostStream`, a stand-in for the side stream whose
copies happen only when the compute side waits for their event: a missing wait reads a stale
slot, so the tests catch ordering bugs without a GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import ConfigError

ALIGN = 256
"""Byte alignment of every tensor inside a block's host buffer and device slot (any dtype view
of the uint8 buffer, and the alignment CUDA kernels expect)."""
SLOTS = 2
"""Device ring buffers: one block computing, the next one arriving."""


def padded(nbytes: int) -> int:
    return math.ceil(nbytes / ALIGN) * ALIGN


def block_list(denoiser: torch.nn.Module, family) -> list[tuple[str, torch.nn.Module]]:
    """(dotted name, block) of every block in the family's `swap_blocks` lists, in run order."""
    out = []
    for attr in family.swap_blocks:
        blocks = getattr(denoiser, attr, None)
        if blocks is None:
            continue  # a variant without this list (SD3 medium vs large share one list anyway)
        out += [(f"{attr}.{i}", b) for i, b in enumerate(blocks)]
    return out


def swapped_blocks(
    denoiser: torch.nn.Module, family, n: int, where: str = "this model"
) -> list[tuple[str, torch.nn.Module]]:
    """The LAST `n` blocks over `family.swap_blocks`; ConfigError when the family has none or
    `n` exceeds the number of blocks of `where`."""
    check_family(family, n)
    blocks = block_list(denoiser, family)
    if n > len(blocks):
        raise ConfigError(
            f"Config key 'train.block_swap' is {n}, but {where} has only {len(blocks)} "
            f"transformer blocks ({', '.join(family.swap_blocks)}) to stream. Set "
            f"train.block_swap to at most {len(blocks)} (`lorakit plan --vram GIB` proposes the "
            "smallest value that fits), or 0 to keep every block on the device."
        )
    return blocks[len(blocks) - n :]


def check_family(family, n: int) -> None:
    """ConfigError when `train.block_swap` > 0 for a family without swappable blocks."""
    if n > 0 and not family.swap_blocks:
        raise ConfigError(
            f"Config key 'train.block_swap' is {n}, but the '{family.name}' family has no "
            "repeated transformer blocks to stream (block swap is for the DiT families; its UNet "
            "blocks differ in shape). Set train.block_swap = 0; to save memory use "
            "train.gradient_checkpointing, train.optimizer = 'adamw8bit' or model.quantize = "
            "'fp8' (`lorakit plan --vram GIB` lists what fits)."
        )


# --- what a block holds ---------------------------------------------------------------------------


@dataclass
class _Entry:
    """One frozen tensor of a block: where the module finds it, where it lives in the slot."""

    owner: Any
    """The module (`kind` param / buffer) or the object (`attr`: a bitsandbytes QuantState or
    int8 MatmulLtState) that holds the tensor under `name`."""
    kind: str
    name: str
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    def get(self) -> torch.Tensor:
        if self.kind == "param":
            return self.owner._parameters[self.name]
        if self.kind == "buffer":
            return self.owner._buffers[self.name]
        return getattr(self.owner, self.name)

    def point(self, t: torch.Tensor) -> None:
        """Make the owner see `t` (Parameters keep their identity: `.data` only)."""
        if self.kind == "param":
            self.owner._parameters[self.name].data = t
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = t
        else:
            setattr(self.owner, self.name, t)


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    entries: list[_Entry]
    nbytes: int
    host: torch.Tensor | None = None
    """uint8 host buffer holding every entry at its offset (a slice of `BlockSwap.host`)."""
    aliases: list[tuple[_Entry, _Entry]] = field(default_factory=list)
    """(entry, the entry whose tensor it shares): tied tensors take one place in the buffer."""


def _frozen_tensors(module: torch.nn.Module):
    """(owner, kind, name, tensor) of every frozen tensor `module` computes with."""
    for m in module.modules():
        if hasattr(m, "init_8bit_state") and getattr(m.weight, "CB", None) is not None:
            m.init_8bit_state()  # bitsandbytes int8: the codes move to `m.state` on first call
        for name, p in m._parameters.items():
            if p is None or p.requires_grad:
                continue  # LoRA weights stay where they are
            yield m, "param", name, p
            qs = getattr(p, "quant_state", None)
            if qs is not None:  # bitsandbytes 4-bit: absmax / code (+ nested state) = the weight
                yield from _quant_state_tensors(qs)
        for name, b in m._buffers.items():
            if b is not None:
                yield m, "buffer", name, b
        state = getattr(m, "state", None)
        if state is not None and type(state).__name__ == "MatmulLtState":
            for name in ("CB", "SCB"):
                if isinstance(getattr(state, name, None), torch.Tensor):
                    yield state, "attr", name, getattr(state, name)


def _quant_state_tensors(qs):
    for name in ("absmax", "code", "offset"):
        if isinstance(getattr(qs, name, None), torch.Tensor):
            yield qs, "attr", name, getattr(qs, name)
    state2 = getattr(qs, "state2", None)
    if state2 is not None:
        yield from _quant_state_tensors(state2)


def _layout(name: str, module: torch.nn.Module) -> _Block:
    entries, aliases, seen, offset = [], [], {}, 0
    for owner, kind, key, t in _frozen_tensors(module):
        e = _Entry(owner, kind, key, 0, t.dtype, t.shape)
        if id(t) in seen:
            e.offset = seen[id(t)].offset
            aliases.append((e, seen[id(t)]))
            continue
        e.offset = offset
        seen[id(t)] = e
        entries.append(e)
        offset += padded(t.numel() * t.element_size())
    return _Block(name, module, entries, offset, aliases=aliases)


def block_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s frozen tensors as the swap lays them out (each padded to `ALIGN`):
    a block's host buffer and the size of a device slot. Works on meta modules (the planner)."""
    return _layout("", module).nbytes


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return buf[offset : offset + n].view(dtype).view(shape)


# --- the side stream ------------------------------------------------------------------------------


class HostStream:
    """CPU stand-in for the CUDA copy stream and events: a copy is queued and happens only when
    the compute side waits for an event recorded after it (`wait_event`), as a GPU copy is only
    guaranteed complete then. Code that binds a slot without waiting reads stale weights."""

    def __init__(self):
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done = 0  # copies executed so far (queue positions below this are done)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.queue.append((dst, src))

    def record_event(self) -> int:
        return len(self.queue) + self.done

    def run_until(self, event: int) -> None:
        while self.done < event:
            dst, src = self.queue.pop(0)
            dst.copy_(src)
            self.done += 1


class _CudaStreams:
    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def compute(self):
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> Any:
        self.side.wait_event(after)  # the compute that last read this slot is done
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
        return self.side.record_event()

    def compute_event(self):
        return self.compute().record_event()

    def wait(self, event) -> None:
        self.compute().wait_event(event)


class _HostStreams:
    def __init__(self):
        self.side = HostStream()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after) -> int:
        self.side.copy(dst, src)
        return self.side.record_event()

    def compute_event(self) -> None:
        return None  # CPU compute is synchronous: a slot is free once the host moved on

    def wait(self, event: int) -> None:
        self.side.run_until(event)


# --- the swap -------------------------------------------------------------------------------------


class _Token:
    """A saved tensor that lives in a slot, as (block, byte offset, shape, stride, dtype)."""

    __slots__ = ("block", "dtype", "offset", "size", "stride")

    def __init__(self, block: int, t: torch.Tensor):
        self.block, self.dtype = block, t.dtype
        self.offset, self.size, self.stride = t.storage_offset(), t.shape, t.stride()


class _CastToken:
    """A saved tensor that is (a view of) the compute-dtype copy of an fp8 entry of a block:
    re-cast from the block's slot in backward."""

    __slots__ = ("block", "compute", "entry", "offset", "size", "stride")

    def __init__(self, block: int, entry: _Entry, compute: torch.dtype, t: torch.Tensor):
        self.block, self.entry, self.compute = block, entry, compute
        self.offset, self.size, self.stride = t.storage_offset(), t.shape, t.stride()


class _Fp8Casts:
    """The casts of diffusers' layerwise-casting hook on one fp8-stored layer of swapped block
    `block`, replaced so that the layer's fp8 Parameters stay the slot-bound objects (see the
    module doc). `restore` gives the hook back its own casts (`BlockSwap.remove`)."""

    def __init__(self, swap: BlockSwap, block: int, module: torch.nn.Module, hook, entries):
        self.swap, self.block, self.module, self.hook = swap, block, module, hook
        self.entries: dict[str, _Entry] = entries
        self.compute = hook.compute_dtype
        self.stash: dict[str, torch.nn.Parameter] | None = None
        ref = hook.fn_ref
        self.original = (ref.pre_forward, ref.post_forward)
        ref.pre_forward, ref.post_forward = self.pre_forward, self.post_forward

    def restore(self) -> None:
        self.hook.fn_ref.pre_forward, self.hook.fn_ref.post_forward = self.original

    def pre_forward(self, module, *args, **kwargs):
        if self.stash is not None:  # a forward that raised never ran post_forward
            self.post_forward(module, None)
        params, self.stash = module._parameters, {}
        for name, e in self.entries.items():
            p = params[name]
            w = p.to(self.compute)  # as `module.to(dtype=compute)`: one new tensor per weight
            if w.numel() and w.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                self.swap._casts[w.untyped_storage().data_ptr()] = (self.block, e, self.compute)
            self.stash[name] = p
            params[name] = torch.nn.Parameter(w, requires_grad=False)
        return args, kwargs

    def post_forward(self, module, output):
        params, stash, self.stash = module._parameters, self.stash or {}, None
        for name, p in stash.items():
            self.swap._casts.pop(params[name].untyped_storage().data_ptr(), None)
            params[name] = p  # the fp8 Parameter, still bound to the slot view
        return output


def _fp8_layers(module: torch.nn.Module):
    """(layer, its diffusers layerwise-casting hook) of every fp8-stored layer in `module`."""
    try:
        from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK
    except ImportError:  # no diffusers hooks: nothing is fp8-stored
        return
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            yield m, hook


class BlockSwap:
    """The streaming state of one denoiser (see the module doc). Made by `enable_block_swap`."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        blocks: list[tuple[str, torch.nn.Module]],
        device: torch.device,
        slots: int = SLOTS,
        pin_memory: bool | None = None,
    ):
        self.device = torch.device(device)
        self.denoiser = denoiser
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.blocks = [_layout(name, m) for name, m in blocks]
        self.placeholders: dict[torch.dtype, torch.Tensor] = {}
        # Pageable at first: pages are faulted in block by block as each block's own storage
        # is freed below, so host memory peaks at the model plus one block, not twice the
        # streamed part.
        self.host = torch.empty(sum(b.nbytes for b in self.blocks), dtype=torch.uint8)
        self.pinned = "no"
        self._slice_host()
        for b in self.blocks:
            for e in b.entries:
                _view(b.host, e.offset, e.dtype, e.shape).copy_(e.get())
            for e in b.entries + [a for a, _ in b.aliases]:
                e.point(self._placeholder(e.dtype))  # the original storage is freed here
            for m in b.module.modules():  # LoRA: trainable, resident like the unswapped blocks
                for p in m._parameters.values():
                    if p is not None and p.requires_grad and p.device != self.device:
                        p.data = p.data.to(self.device)
        if pin:
            self.host, self.pinned = _pin(self.host)
            self._slice_host()
        self.slot_bytes = max(b.nbytes for b in self.blocks)
        self.ring = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            for _ in range(min(slots, len(self.blocks)))
        ]
        self._slot_ptrs = {r.untyped_storage().data_ptr(): s for s, r in enumerate(self.ring)}
        self.streams = _CudaStreams(self.device) if self.device.type == "cuda" else _HostStreams()
        self.in_slot: list[int | None] = [None] * len(self.ring)  # block held by each slot
        self.ready: list[Any] = [None] * len(self.ring)  # its copy's event
        self.used: list[int] = [0] * len(self.ring)  # LRU clock
        self.clock = 0
        self.bound: int | None = None  # the block whose tensors point at its slot
        self.h2d_copies = 0
        self.h2d_bytes = 0
        self._graph_task: int | None = None
        self._saved_hooks: contextlib.AbstractContextManager | None = None
        # fp8 storage: the swapped blocks' layers cast from their slot views (`_Fp8Casts`);
        # storage pointer of each compute-dtype copy alive now -> (block, entry, dtype)
        self._casts: dict[int, tuple[int, _Entry, torch.dtype]] = {}
        self.fp8_casts: list[_Fp8Casts] = []  # by block: `_fp8_casts[i]`
        self._fp8_casts: list[list[_Fp8Casts]] = [[] for _ in self.blocks]
        for i, b in enumerate(self.blocks):
            for m, hook in _fp8_layers(b.module):
                entries = {
                    e.name: e
                    for e in b.entries + [a for a, _ in b.aliases]
                    if e.owner is m and e.kind == "param" and e.dtype.is_floating_point
                }
                if entries:
                    self._fp8_casts[i].append(_Fp8Casts(self, i, m, hook, entries))
                    self.fp8_casts.append(self._fp8_casts[i][-1])
        self._handles = [denoiser.register_forward_pre_hook(self._denoiser_start)]
        for i, b in enumerate(self.blocks):
            self._handles.append(b.module.register_forward_pre_hook(self._pre(i)))
            self._handles.append(b.module.register_forward_hook(self._post(i), always_call=True))

    # -- bookkeeping --

    def _slice_host(self) -> None:
        start = 0
        for b in self.blocks:
            b.host = self.host[start : start + b.nbytes]
            start += b.nbytes

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.placeholders:
            self.placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self.placeholders[dtype]

    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * len(self.ring)

    def slot_of(self, i: int) -> int | None:
        return self.in_slot.index(i) if i in self.in_slot else None

    def prefetch(self, i: int, keep: range = range(0)) -> None:
        """Start the host→device copy of block `i` (no-op if it is resident or out of range)
        into a slot that neither the bound block nor a block in `keep` (the blocks this pass
        needs next) occupies: an empty one, else the least recently used."""
        if not 0 <= i < len(self.blocks) or i in self.in_slot:
            return
        busy = self.slot_of(self.bound) if self.bound is not None else None
        free = [
            s
            for s in range(len(self.ring))
            if s != busy and (self.in_slot[s] is None or self.in_slot[s] not in keep)
        ]
        if not free:  # every slot is needed first: `bind` loads the block when its turn comes
            return
        s = self._victim(free)
        b = self.blocks[i]
        # Everything that read slot `s` was issued before this point on the compute stream
        # (forward: earlier blocks; backward: later blocks, whose backward autograd finishes
        # before an earlier block's begins), so the copy waits for this event only.
        after = self.streams.compute_event()
        self.ready[s] = self.streams.copy(self.ring[s][: b.nbytes], b.host, after)
        self.in_slot[s] = i
        self.clock += 1
        self.used[s] = self.clock
        self.h2d_copies += 1
        self.h2d_bytes += b.nbytes

    def _victim(self, free: list[int]) -> int:
        """Which free slot a prefetch overwrites. Correctness does not depend on it (a test
        replaces it); speed does: the empty or least recently used slot."""
        return min(free, key=lambda k: (self.in_slot[k] is not None, self.used[k]))

    def bind(self, i: int) -> None:
        """Point block `i`'s tensors at its slot, after its copy (compute waits for it only)."""
        if self.bound == i:
            return
        if self.bound is not None:
            self.unbind()
        self.prefetch(i)
        s = self.slot_of(i)
        self.streams.wait(self.ready[s])
        self.clock += 1
        self.used[s] = self.clock
        b, slot = self.blocks[i], self.ring[s]
        for e in b.entries:
            e.point(_view(slot, e.offset, e.dtype, e.shape))
        for e, same in b.aliases:
            e.point(same.get())
        self.bound = i

    def unbind(self) -> None:
        if self.bound is None:
            return
        b = self.blocks[self.bound]
        for c in self._fp8_casts[self.bound]:
            if c.stash is not None:  # a layer's forward raised: its fp8 Parameters back first
                c.post_forward(c.module, None)
        for e in b.entries + [a for a, _ in b.aliases]:
            e.point(self._placeholder(e.dtype))
        self.bound = None

    # -- hooks --

    def _denoiser_start(self, module, args) -> None:
        if _in_backward():
            return
        window = range(len(self.ring))  # the first swapped blocks arrive while earlier ones run
        for i in window:
            self.prefetch(i, window)

    def _pre(self, i: int) -> Callable:
        def hook(module, args):
            if _in_backward():  # checkpoint recompute: bound since this block's backward began
                self.bind(i)
                return
            self.bind(i)
            window = range(i, i + len(self.ring))
            for j in window[1:]:
                self.prefetch(j, window)
            if torch.is_grad_enabled() and not _checkpointing(self.denoiser):
                self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(
                    self._pack, self._unpack
                )
                self._saved_hooks.__enter__()

        return hook

    def _post(self, i: int) -> Callable:
        def hook(module, args, output):
            if _in_backward():
                return  # stays bound for this block's backward
            if self._saved_hooks is not None:
                self._saved_hooks.__exit__(None, None, None)
                self._saved_hooks = None
            if torch.is_grad_enabled():
                for t in torch.utils._pytree.tree_leaves(output):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        t.register_hook(self._backward_hook(i))
            self.unbind()

        return hook

    def _backward_hook(self, i: int) -> Callable:
        def hook(grad):
            self._backward_begins(i)

        return hook

    def _backward_begins(self, i: int) -> None:
        task = torch._C._current_graph_task_id()
        if self._graph_task != task:
            self._graph_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)
        self.bind(i)
        window = range(i - len(self.ring) + 1, i + 1)
        for j in reversed(window[:-1]):
            self.prefetch(j, window)

    def _backward_ends(self) -> None:
        self._graph_task = None
        self.unbind()

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.device == self.device:
            ptr = t.untyped_storage().data_ptr()
            s = self._slot_ptrs.get(ptr)
            if s is not None:
                return _Token(self.in_slot[s], t)
            cast = self._casts.get(ptr)
            if cast is not None:  # fp8: a compute copy of a slot tensor, re-cast in backward
                return _CastToken(*cast, t)
        return t

    def _unpack(self, x):
        if isinstance(x, _CastToken):
            self.bind(x.block)
            e = x.entry
            slot = self.ring[self.slot_of(x.block)]
            w = _view(slot, e.offset, e.dtype, e.shape).to(x.compute)
            return w.as_strided(x.size, x.stride, x.offset)
        if not isinstance(x, _Token):
            return x
        self.bind(x.block)  # already bound when its backward began; a safe fallback otherwise
        storage = self.ring[self.slot_of(x.block)].untyped_storage()
        out = torch.empty(0, dtype=x.dtype, device=self.device)
        return out.set_(storage, x.offset, x.size, x.stride)

    def remove(self) -> None:
        """Detach the hooks and bring every block back onto the device (tests, merging)."""
        self.unbind()
        for h in self._handles:
            h.remove()
        for c in self.fp8_casts:
            c.restore()
        self.fp8_casts, self._fp8_casts, self._casts = [], [], {}
        for b in self.blocks:
            dev = b.host.to(self.device)
            for e in b.entries:
                e.point(_view(dev, e.offset, e.dtype, e.shape).clone())
            for e, same in b.aliases:
                e.point(same.get())
        if self.pinned == "registered":  # before the buffer can be freed
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
        self.blocks, self.host = [], None
        if getattr(self.denoiser, "_lorakit_block_swap", None) is self:
            del self.denoiser._lorakit_block_swap


def _pin(buf: torch.Tensor) -> tuple[torch.Tensor, str]:
    """`buf` page-locked for asynchronous copies, and how: `registered` (in place, with
    cudaHostRegister), else `pinned` (a copy in torch's pinned allocator, which rounds each
    allocation up to a power of two: up to 2x the host memory, hence only the fallback).
    Called once the buffer is filled: registering first would fault in every page of it while
    the model's own copy of those weights still exists."""
    try:
        # Kept registered while the swap lives; `BlockSwap.remove` unregisters it.
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)) == 0:
            return buf, "registered"
    except (AttributeError, RuntimeError):
        pass
    return buf.pin_memory(), "pinned"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _checkpointing(denoiser: torch.nn.Module) -> bool:
    return bool(getattr(denoiser, "is_gradient_checkpointing", False))


def enable_block_swap(
    denoiser: torch.nn.Module,
    family,
    n: int,
    device: torch.device | str,
    slots: int = SLOTS,
    pin_memory: bool | None = None,
) -> BlockSwap:
    """The run's placement step for `train.block_swap = n`: call it after the LoRA is injected,
    with the denoiser still in host memory (cast to the run's dtype; fp8-stored layers stay
    in fp8: they stream as fp8). Streams the last `n`
    blocks' frozen tensors (see the module doc), then moves everything else (the unswapped
    blocks, embeddings, every LoRA weight) to `device`. Returns the `BlockSwap`, also kept as
    `denoiser._lorakit_block_swap`."""
    blocks = swapped_blocks(denoiser, family, n)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            "train.block_swap is not supported with several processes (DDP / FSDP / DeepSpeed "
            "shard or replicate the weights themselves). Set train.block_swap = 0, or train "
            "with one process (--num-processes 1)."
        )
    swap = BlockSwap(denoiser, blocks, torch.device(device), slots, pin_memory)
    denoiser.to(swap.device)  # the swapped blocks' placeholders are there already: no copies
    denoiser._lorakit_block_swap = swap
    return swap
