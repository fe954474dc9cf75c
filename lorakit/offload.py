"""`train.offload_activations`: gradient checkpointing whose kept inputs live in host memory.

With diffusers' gradient checkpointing every checkpointed block (a UNet resnet/attention block,
an SD3/FLUX transformer block) keeps only its inputs for backward; those inputs are most of the
activation memory that is left (FLUX.1 at 1024 px: 57 blocks × `[1, 4352, 3072]` bf16 ≈ 1.4 GiB).
`OffloadedCheckpoint` is a drop-in `gradient_checkpointing_func` that copies each block's tensor
inputs to (pinned) CPU memory before running the block under torch's non-reentrant checkpoint,
so the device copy is freed as soon as the forward pass moves on; in backward the block's inputs
are copied back to the device for its recompute only — one block at a time. This is OneTrainer's
"CPU_OFFLOADED" checkpointing. The copies are autograd ops (`copy_`), so gradients flow through
them exactly: losses and gradients are bitwise those of plain checkpointing. Cost: one
device→host and one host→device copy of each block input per step (non-blocking from/to pinned
memory on CUDA).

The same class lets `lorakit.planner` simulate the offload on the meta device: `host="meta"` with
an `on_host` callback that tells the planner's memory meter those copies are not device memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


class OffloadedCheckpoint:
    """`gradient_checkpointing_func` for `ModelMixin.enable_gradient_checkpointing`.

    Called as `func(block, *args)` by diffusers; every tensor in `args` (nested tuples such as
    FLUX's rotary `(cos, sin)` included) is held on `host` while the step is between the block's
    forward and its backward. An input shared by several blocks (a time embedding, rotary
    tables) is copied once per forward pass. `context_fn` is passed on to torch's checkpoint.
    """

    def __init__(
        self,
        host: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        on_host: Callable[[torch.Tensor], None] | None = None,
        context_fn: Callable[[], Any] | None = None,
    ):
        self.host = torch.device(host)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.on_host = on_host
        self.context_fn = context_fn
        self._copies: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def _to_host(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        hit = self._copies.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        pin = self.pin_memory and x.device.type == "cuda" and self.host.type == "cpu"
        buf = torch.empty(x.shape, dtype=x.dtype, device=self.host, pin_memory=pin)
        buf.copy_(x, non_blocking=pin)  # differentiable: the gradient flows back to `x`
        self._copies[id(x)] = (weakref.ref(x), buf)
        weakref.finalize(x, self._copies.pop, id(x), None)  # the host copy is not held beyond x
        if self.on_host is not None:
            self.on_host(buf)
        return buf

    def __call__(self, block: Callable, *args: Any) -> Any:
        from torch.utils._pytree import tree_flatten, tree_unflatten
        from torch.utils.checkpoint import checkpoint

        leaves, spec = tree_flatten(args)
        devices = [x.device if isinstance(x, torch.Tensor) else None for x in leaves]
        held = [self._to_host(x) for x in leaves]

        def run(*held):
            back = []
            for x, device in zip(held, devices, strict=True):
                if isinstance(x, torch.Tensor):
                    x = torch.empty(x.shape, dtype=x.dtype, device=device).copy_(
                        x, non_blocking=True
                    )
                back.append(x)
            return block(*tree_unflatten(back, spec))

        kwargs: dict[str, Any] = {"use_reentrant": False}
        if self.context_fn is not None:
            kwargs["context_fn"] = self.context_fn
        return checkpoint(run, *held, **kwargs)
