"""Processes and devices: the Accelerator's set-up, what lorakit supports under FSDP / DeepSpeed,
and the per-step flags every rank must agree on (`Consensus`).

FSDP2 shards the denoiser's parameters into DTensors: `full_tensor` gathers one (a collective),
`shard_like` shards a whole tensor the way a parameter is sharded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lorakit.config import Config, TrainConfig
from lorakit.errors import ConfigError


class Consensus:
    """The per-step flags (stop request, non-finite loss) without stalling the GPU. Under several
    processes every rank must act on the same stop request at the same step (or one waits forever
    in the next all-reduce), and all stop when any rank's loss is non-finite: `reduce(t, "max")`
    all-reduces the flags each micro-step (`reduce` None: one process, nothing to agree on).

    On CUDA the flags are copied to pinned memory without blocking and read one step later, so
    the host never waits for the GPU inside the loop (every rank reads the same reduced value at
    the same step, so they still agree). Elsewhere they are read at once.
    """

    def __init__(self, reduce, device: torch.device, lagged: bool | None = None):
        self.reduce = reduce
        self.lagged = device.type == "cuda" if lagged is None else lagged
        self.pending: tuple[torch.Tensor, Any, int] | None = None

    def check(self, signum: int, loss: torch.Tensor, step: int) -> tuple[int, int]:
        """(stop signal all ranks agree on, step whose loss was non-finite on some rank, or 0),
        as known by now: with the lag, the values of the previous call."""
        bad = (~torch.isfinite(loss.detach())).float()
        # new_full fills on the device: a torch.tensor(signum, device=...) copy would sync
        flags = torch.stack([bad.new_full((), float(signum)), bad])
        if self.reduce is not None:
            flags = self.reduce(flags, "max")
        if not self.lagged:
            return int(flags[0].item()), step if flags[1].item() else 0
        known = self.flush()
        host = torch.empty(2, dtype=flags.dtype, pin_memory=flags.is_cuda)
        host.copy_(flags, non_blocking=flags.is_cuda)
        event = None
        if flags.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (host, event, step)
        return known

    def flush(self) -> tuple[int, int]:
        """The values still in flight (the last step's), waiting for them; (0, 0) if none."""
        if self.pending is None:
            return 0, 0
        host, event, at = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return int(host[0]), at if host[1] else 0


def cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def cpu_fsdp(accelerator) -> None:
    """Run an FSDP accelerate config on the CPU too (gloo): accelerate 1.15 silently ignores FSDP
    on a CPU (it runs plain data parallel), which would leave lorakit's sharded code paths untested
    and print nothing. torch's FSDP2 (`fully_shard`) runs on CPU tensors; FSDP1 does not."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ConfigError(_FSDP1)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


_FSDP1 = (
    "The accelerate config selects FSDP version 1, which flattens parameters into shards that "
    "lorakit cannot read back as a LoRA (and which does not run on a CPU at all). Set "
    "`fsdp_version: 2` under fsdp_config in the accelerate config file (see "
    "presets/accelerate/fsdp.yaml), or use DDP (presets/accelerate/ddp.yaml)."
)


def check_distributed(accelerator, c: Config) -> None:
    """Refuse what lorakit does not support under FSDP / DeepSpeed (in the worker processes)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        problem = distributed_problem(c, "FSDP", accelerator.state.fsdp_plugin.fsdp_version)
    elif kind == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = (ds.get("zero_optimization") or {}).get("stage")
        problem = distributed_problem(
            c, "DeepSpeed", 2, ds.get("gradient_accumulation_steps"), zero_stage=stage
        )
    else:
        return
    if problem:
        raise ConfigError(problem)


def check_accelerate_config(c: Config, path: Path) -> None:
    """The same refusal before `lorakit train --accelerate-config` launches any process."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--accelerate-config '{path}' cannot be read as YAML ({e}).") from None
    kind = str(doc.get("distributed_type", "")).upper()
    fsdp = doc.get("fsdp_config") or {}
    name = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}.get(kind)
    ds = doc.get("deepspeed_config") or {}
    problem = name and distributed_problem(
        c,
        name,
        int(fsdp.get("fsdp_version", 1)),
        ds.get("gradient_accumulation_steps"),
        zero_stage=ds.get("zero_stage"),
    )
    if problem:
        raise ConfigError(f"{path}: {problem}")


def distributed_problem(
    c: Config,
    name: str,
    fsdp_version: int = 2,
    grad_accum: int | str | None = None,
    zero_stage: int | None = None,
) -> str | None:
    """One paragraph on what `c` asks that lorakit does not support under FSDP / DeepSpeed."""
    if name == "FSDP" and fsdp_version != 2:
        return _FSDP1
    problems = []
    if c.train.optimizer != "adamw":
        problems.append(
            f"train.optimizer = '{c.train.optimizer}' (under {name} only torch AdamW is "
            "supported: sharded 8-bit/factored optimizer states cannot be checkpointed); set "
            "--set train.optimizer='adamw'"
        )
    if c.lora.train_text_encoder:
        problems.append(
            "lora.train_text_encoder = true (the text encoders are not sharded or synchronised "
            f"under {name}); set it to false"
        )
    if c.sample.every_minutes:
        problems.append(
            "sample.every_minutes (a clock-based schedule: ranks would disagree on when to render "
            "and wait on each other forever); use sample.every (steps) instead"
        )
    if c.train.compile:
        problems.append(f"train.compile = true (untested under {name}); set it to false")
    if c.train.preserve_weight:
        problems.append(
            "train.preserve_weight > 0 (anti-bleed preservation runs a second backward pass per "
            "micro-batch: accelerate's DeepSpeed wrapper steps the optimizer at each backward, "
            "and it is untested under FSDP); set train.preserve_weight = 0"
        )
    if c.data.reg_folder:
        problems.append(
            "data.reg_folder (prior preservation runs a second backward pass per micro-batch, for "
            "the class images: accelerate's DeepSpeed wrapper steps the optimizer at each "
            "backward, and it is untested under FSDP); use DDP (presets/accelerate/ddp.yaml) or "
            "set data.reg_folder = ''"
        )
    if name == "DeepSpeed" and zero_stage not in (None, 0, 1, 2):
        problems.append(
            f"zero_stage = {zero_stage} in the accelerate config (ZeRO-3 partitions the weights, "
            "which lorakit's adapter export and checkpoints cannot read back); set zero_stage: 2 "
            "(presets/accelerate/deepspeed-zero2.yaml) or use FSDP (presets/accelerate/fsdp.yaml)"
        )
    if name == "DeepSpeed" and grad_accum not in (None, "auto", c.train.grad_accum):
        problems.append(
            f"gradient_accumulation_steps = {grad_accum} in the accelerate config differs from "
            f"train.grad_accum = {c.train.grad_accum}; make them equal"
        )
    if not problems:
        return None
    return (
        f"This run uses {name} through its accelerate config, which lorakit supports only for "
        f"plain LoRA training: {'; '.join(problems)}. Or run with DDP "
        "(presets/accelerate/ddp.yaml or --num-processes N), which supports everything."
    )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: all ranks, same order) or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` (a whole tensor of p's full shape) sharded the way parameter `p` is (FSDP2)."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)


def device_kwargs(t: TrainConfig) -> dict[str, Any]:
    """Accelerator arguments for the device. A DeepSpeed accelerate config on a machine without
    CUDA runs DeepSpeed on the CPU: accelerate 1.15 ignores DeepSpeed when `cpu=True` (or the
    config's `use_cpu: true`), and with `cpu=False` its `_prepare_backend` finds no device backend
    (None), so PartialState counts 1 process although DeepSpeed's `init_distributed` (falling
    back to gloo without oneCCL) joined 2 — DeepSpeed then rejects train_batch_size 1 != 1 × 1 × 2.
    Naming gloo makes accelerate initialise DeepSpeed's process group with it and count both."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not (deepspeed and "LOCAL_RANK" in os.environ and not torch.cuda.is_available()):
        return {"cpu": _use_cpu(t)}
    from accelerate.utils import InitProcessGroupKwargs

    os.environ["ACCELERATE_USE_CPU"] = "false"  # AcceleratorState would force cpu=True (DDP)
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def _use_cpu(t: TrainConfig) -> bool:
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device = 'cuda' but no CUDA GPU is visible to torch here. Check the driver and "
            "that a CUDA build of torch is installed, or set train.device = 'cpu'."
        )
    return t.device == "cpu" or not torch.cuda.is_available()


def check_precision(t: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu" and t.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision = 'fp16' needs a GPU; on the CPU use 'bf16' or 'no'."
        )


def unwrapped(accelerator, denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser without its DDP and `torch.compile` wrappers (same parameters): held-out
    scoring and previews run it in eval mode without grad, which the compiled training graph
    does not cover; through the compiled module each would trigger a compile of its own."""
    return accelerator.unwrap_model(denoiser, keep_torch_compile=False)
