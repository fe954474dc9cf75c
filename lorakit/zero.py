"""DeepSpeed ZeRO-1/2 optimizer state in lorakit's own (no-pickle) checkpoint format.

ZeRO-1/2 (`deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer`) flattens each param
group's trainable parameters into one padded 1-D buffer `bit16_groups_flat[g]` (the model's
parameters become views into it, at `round_robin_bit16_offsets[g]`), cuts it into one equal slice
per data-parallel rank, and gives the wrapped torch optimizer only this rank's slice as a flat fp32
master copy (`single_partition_of_fp32_groups[g]`, a clone — not a view). The torch optimizer's
state (AdamW: `step`, `exp_avg`, `exp_avg_sq`, each flat [partition_size]) therefore covers one
slice of every LoRA tensor.

`gather_state` all-gathers those slices and cuts them back into per-parameter tensors, giving
exactly the layout of a plain torch `optimizer.state_dict()` over the original parameter list (so a
checkpoint is the same whatever ran it: 1 process, DDP, FSDP2 or ZeRO with any number of ranks).
`scatter_state` is the inverse. DeepSpeed's own `save_checkpoint` pickles (torch.save); lorakit
never unpickles, so it is not used. LoRA optimizer state is tiny (2 × the LoRA), so every rank
holding the whole state for a moment costs nothing.

ZeRO-3 (parameters partitioned too) is not supported: lorakit refuses it before training.
"""

from __future__ import annotations

from typing import Any

import torch


def zero_optimizer(optimizer) -> Any | None:
    """The DeepSpeedZeroOptimizer inside accelerate's wrapper, or None (not ZeRO-1/2)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if hasattr(inner, "single_partition_of_fp32_groups") else None


def _slices(zero, g: int):
    """(original index within the group, offset in the flat buffer, shape) of group g's params."""
    rr_index = zero.round_robin_bit16_indices[g]
    for j in range(len(zero.bit16_groups[g])):
        k = rr_index[j]
        meta = zero.round_robin_bit16_meta[g][k]
        yield j, zero.round_robin_bit16_offsets[g][k], meta.shape


def _rank(zero, g: int) -> tuple[int, int]:
    import torch.distributed as dist

    group = zero.real_dp_process_group[g]
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def gather_state(optimizer) -> dict[str, Any]:
    """The whole optimizer state as a torch `state_dict()` over the original parameters.

    A collective: every rank must call it, in the same order. Tensors in "state" have the
    parameters' shapes (e.g. exp_avg of a [4, 320] lora_down is [4, 320]); "step" stays the
    optimizer's scalar tensor."""
    import torch.distributed as dist

    zero = zero_optimizer(optimizer)
    base = zero.optimizer
    state: dict[int, dict[str, Any]] = {}
    groups = []
    first = 0
    for g, group in enumerate(base.param_groups):
        flat_numel = zero.bit16_groups_flat[g].numel()
        _, world = _rank(zero, g)
        part = zero.single_partition_of_fp32_groups[g]
        own = base.state.get(part, {})
        whole: dict[str, Any] = {}
        for key, value in sorted(own.items()):
            if isinstance(value, torch.Tensor) and value.numel() == part.numel() > 1:
                pieces = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(pieces, value.contiguous(), group=zero.real_dp_process_group[g])
                whole[key] = torch.cat(pieces)[:flat_numel]
            else:
                whole[key] = value.clone() if isinstance(value, torch.Tensor) else value
        n = len(zero.bit16_groups[g])
        if whole:
            for j, offset, shape in _slices(zero, g):
                state[first + j] = {
                    key: v.narrow(0, offset, shape.numel()).view(shape).clone()
                    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == flat_numel
                    else (v.clone() if isinstance(v, torch.Tensor) else v)
                    for key, v in whole.items()
                }
        groups.append(
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": list(range(first, first + n)),
            }
        )
        first += n
    return {"state": state, "param_groups": groups}


def scatter_state(optimizer, saved: dict[str, Any]) -> None:
    """Load a whole state (from `gather_state` or a plain torch optimizer) into this rank's ZeRO
    partition, and refresh the fp32 master partition from the (already restored) parameters."""
    zero = zero_optimizer(optimizer)
    base = zero.optimizer
    first = 0
    for g, group in enumerate(base.param_groups):
        rank, world = _rank(zero, g)
        flat = zero.bit16_groups_flat[g]
        part = zero.single_partition_of_fp32_groups[g]
        size = flat.numel() // world
        saved_group = saved["param_groups"][g]
        for k, v in saved_group.items():
            if k != "params":
                group[k] = v
        own: dict[str, Any] = {}
        entries = [saved["state"].get(first + j) for j in range(len(zero.bit16_groups[g]))]
        if all(e is not None for e in entries) and entries:
            for key, sample in entries[0].items():
                if isinstance(sample, torch.Tensor) and sample.dim() > 0:
                    whole = torch.zeros(flat.numel(), dtype=sample.dtype, device=part.device)
                    for j, offset, shape in _slices(zero, g):
                        whole.narrow(0, offset, shape.numel()).copy_(entries[j][key].reshape(-1))
                    own[key] = whole.narrow(0, rank * size, size).clone()
                else:
                    own[key] = sample.clone() if isinstance(sample, torch.Tensor) else sample
            base.state[part] = own
        first += len(zero.bit16_groups[g])
    zero.refresh_fp32_params()  # the master copy is a clone of the params, not a view
