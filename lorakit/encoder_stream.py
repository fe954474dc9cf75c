"""`train.stream_encoders`: the frozen text encoders stay in host memory while caching; the weights
of their repeated layers are copied to the device one layer at a time, just before it runs.

    with streamed(encoders, device):        # {name: module}, already in their run dtype
        ...encode captions / preview prompts...   # the same calls as without streaming

What streams: the children of each encoder's LARGEST `nn.ModuleList` (by parameter bytes): a
transformer text encoder's layers (CLIP `encoder.layers`, T5 `encoder.block`, a decoder LLM's
`layers`), found generically (`stream_units`) - no model family is named here. Those are the
"units". Everything else (embeddings, final norms, heads, a vision tower, rotary buffers) is
moved to the device and stays there while caching, as the whole encoder did before.

How: a unit's tensors keep their Parameter objects; their `.data` is the host tensor (the master
copy). A forward pre-hook points each `.data` at a fresh device copy of the host tensor (and moves
any tensor argument that is not on the device there); the forward post-hook points `.data` back
at the host tensor, and the device copy is freed. Nothing is ever copied back (host → device
only). One unit at a time is on the device (no prefetch: copies are synchronous, simplest and
correct; caching runs once per data set), so the device holds the resident parts + the largest
unit + the activations. The copies are exact, so embeddings are bitwise those of the resident
path (tests/test_encoder_stream.py).

On a CPU device the same code runs: every pre-hook makes a real copy (a new storage), so the
tests exercise the path without a GPU; `StreamStats` counts the copies.

Leaving the context removes the hooks and points every unit's `.data` at its host tensor; the
resident parts stay on the device until `train._place_for_training` moves the encoders off it, as
for an encoder that was resident all along. Text-encoder LoRA and tag shuffling (captions encoded
every step) are refused with streaming (`config.validate`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def largest_module_list(module: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The `nn.ModuleList` under `module` holding the most parameter bytes (the encoder's
    repeated layers); None when there is none (or it holds no parameters)."""
    best, best_bytes = None, 0
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m):
            b = _bytes(m)
            if b > best_bytes:
                best, best_bytes = m, b
    return best


def stream_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `module` that stream: the children of its largest `nn.ModuleList` (empty
    when it has none). Read by `streamed` and by the planner (`lorakit/planner.py`)."""
    layers = largest_module_list(module)
    return list(layers) if layers is not None else []


def streamed_bytes(module: torch.nn.Module, elem_bytes: int) -> tuple[int, int]:
    """(bytes of all units' parameters, bytes of the largest unit) at `elem_bytes` per floating
    element (integer tensors at their own size): for the planner, on meta-device models."""

    def size(m: torch.nn.Module) -> int:
        return sum(
            p.numel() * (elem_bytes if p.is_floating_point() else p.element_size())
            for p in m.parameters()
        )

    sizes = [size(u) for u in stream_units(module)]
    return sum(sizes), max(sizes, default=0)


@dataclass
class StreamStats:
    """What a `streamed` context did: units hooked, copies made (one per unit call), and the
    largest unit in bytes (what the device holds beside the resident parts)."""

    units: int = 0
    copies: int = 0
    unit_bytes: int = 0
    resident_bytes: int = 0
    calls: list[int] = field(default_factory=list)
    """Index of each streamed unit call, in order (for tests)."""


def _to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor) and x.device != device:
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class _Unit:
    """One streamed layer: its tensors' host masters and the hooks that bind device copies."""

    def __init__(self, index: int, module: torch.nn.Module, tensors, device, stats: StreamStats):
        self.index, self.module, self.device, self.stats = index, module, device, stats
        self.tensors = tensors  # [(Parameter or buffer-owner, name, host tensor)]
        self.handles = [
            module.register_forward_pre_hook(self.bind, with_kwargs=True),
            module.register_forward_hook(self.release, always_call=True),
        ]

    def bind(self, _module, args, kwargs):
        for owner, name, host in self.tensors:
            copy = torch.empty_like(host, device=self.device)
            copy.copy_(host)
            _set(owner, name, copy)
        self.stats.copies += 1
        self.stats.calls.append(self.index)
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def release(self, *_):
        for owner, name, host in self.tensors:
            _set(owner, name, host)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.release()


def _set(owner: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name].data = t
    else:
        owner._buffers[name] = t


@contextlib.contextmanager
def streamed(
    encoders: dict[str, torch.nn.Module], device: torch.device | str
) -> Iterator[StreamStats]:
    """Inside: each encoder's non-unit tensors on `device`, its units' weights streamed there per
    call from host memory (see the module docstring). The encoders must be in host memory, in
    the dtype they run in. On exit the hooks are gone and the units' tensors are their host
    masters again; the resident parts stay on `device`."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # compare as the tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    stats = StreamStats()
    units: list[_Unit] = []
    try:
        for encoder in encoders.values():
            layers = stream_units(encoder)
            in_units = {id(m) for u in layers for m in u.modules()}
            outside = {
                id(t)
                for m in encoder.modules()
                if id(m) not in in_units
                for t in [*m._parameters.values(), *m._buffers.values()]
                if t is not None
            }
            for m in encoder.modules():  # everything outside the units: resident
                if id(m) not in in_units:
                    m._apply(lambda t: t.to(device), recurse=False)
            for unit in layers:
                tensors = [
                    (m, name, t.data if isinstance(t, torch.nn.Parameter) else t)
                    for m in unit.modules()
                    for name, t in [*m._parameters.items(), *m._buffers.items()]
                    if t is not None and id(t) not in outside  # tied to a resident part: stays
                ]
                held = sum(t.numel() * t.element_size() for _, _, t in tensors)
                stats.unit_bytes = max(stats.unit_bytes, held)
                units.append(_Unit(len(units), unit, tensors, device, stats))
                stats.units += 1
            stats.resident_bytes += sum(
                t.numel() * t.element_size()
                for t in [*encoder.parameters(), *encoder.buffers()]
                if t.device == device and id(t) in outside
            )
        yield stats
    finally:
        for u in units:
            u.remove()
