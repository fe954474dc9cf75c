"""Optimizers behind the one `train.optimizer` setting.

    adamw            torch AdamW (fp32 state: 2 × the trainable parameters)
    adamw8bit        bitsandbytes AdamW8bit (8-bit state, about a quarter of AdamW's)
    paged_adamw8bit  bitsandbytes PagedAdamW8bit (8-bit state in CUDA unified memory, paged out
                     under memory pressure); on a CPU there is no paging: AdamW8bit, with a warning
    lion8bit         bitsandbytes Lion8bit (one 8-bit state tensor; usually wants 3–10× lower lr)
    adafactor        transformers' Adafactor with the fixed `train.lr` (no relative step, no
                     parameter scaling), so the LR schedule applies as for the others
    prodigy          Prodigy (`prodigyopt` package) — it estimates the step size itself; set
                     train.lr to 1.0 (the scale of its estimate), not to an AdamW-style 1e-4

Every optimizer's `state_dict()` holds only tensors, numbers, strings, tuples and dicts, which
lorakit/checkpoint.py stores without pickle (bitsandbytes nests its quantisation state in a
`__bnb_optimizer_quant_state__` dict and hands every parameter of ≥ 4096 elements the same
`qmap1`/`qmap2` tensors, stored once; Prodigy keeps its running estimate `d` as floats in the
param groups), so a resumed run continues bit-identically on CPU. tests/test_real_size.py checks
this at LoRA sizes past every threshold that changes the state's form.
"""

from __future__ import annotations

import torch

from lorakit.config import Config, TrainConfig
from lorakit.errors import LorakitError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "adafactor", "prodigy")
_BNB = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}


def build_optimizer(
    params, t: TrainConfig, device: torch.device, lr: float | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by `t.optimizer` over `params`, at `lr` (default `t.lr`)."""
    lr = t.lr if lr is None else lr
    name = t.optimizer
    if name in _BNB:
        problem = bnb_8bit_problem(device.type)
        if problem is None:
            import bitsandbytes as bnb

            if name == "paged_adamw8bit" and device.type != "cuda":
                # bitsandbytes would warn and fall back itself; say it once, in our words
                print(
                    "warning: paged optimizers need CUDA; on this "
                    f"{device.type.upper()} paged_adamw8bit runs as adamw8bit (same math)."
                )
                name = "adamw8bit"
            return getattr(bnb.optim, _BNB[name])(params, lr=lr, weight_decay=t.weight_decay)
        if not t.optimizer_fallback:
            raise LorakitError(
                f"train.optimizer = '{name}' cannot run on this machine: {problem}. Fix the "
                "bitsandbytes install (`pip install -U bitsandbytes`; run `python -m "
                "bitsandbytes` for a diagnosis), or use --set train.optimizer=adamw, or allow "
                "the fallback with --set train.optimizer_fallback=true."
            )
        print(f"warning: 8-bit {name} unavailable ({problem}); using torch AdamW as allowed.")
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=t.weight_decay,
        )
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise LorakitError(
                "train.optimizer = 'prodigy' needs the `prodigyopt` package, which is not "
                "installed here. Install it with `pip install prodigyopt`, or choose another "
                "optimizer (--set train.optimizer=adamw)."
            ) from None
        return Prodigy(params, lr=lr, weight_decay=t.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    raise LorakitError(
        f"train.optimizer = '{name}' is not an optimizer lorakit knows; use one of "
        f"{', '.join(OPTIMIZERS)}."
    )


_BNB_PROBLEM: dict[str, str | None] = {}


def bnb_8bit_problem(device_type: str) -> str | None:
    """None when bitsandbytes' 8-bit AdamW really steps a tensor here, else why not."""
    if device_type not in _BNB_PROBLEM:
        try:
            import bitsandbytes as bnb

            p = torch.nn.Parameter(torch.ones(64, 64, device=device_type))  # ≥ 4096: 8-bit state
            opt = bnb.optim.AdamW8bit([p], lr=0.1)
            p.grad = torch.ones_like(p)
            opt.step()
            state = opt.state[p]
            ok = state["state1"].dtype == torch.uint8 and not torch.equal(
                p.detach(), torch.ones_like(p)
            )
            _BNB_PROBLEM[device_type] = None if ok else "the 8-bit step did not update the weights"
        except Exception as e:  # any failure means: not usable here
            _BNB_PROBLEM[device_type] = (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
    return _BNB_PROBLEM[device_type]


def scaled_lr(c: Config, world: int) -> float:
    """train.lr under train.lr_scaling, with k = global batch = batch × grad_accum × processes."""
    k = c.train.batch_size * c.train.grad_accum * world
    return {"none": 1.0, "linear": float(k), "sqrt": k**0.5}[c.train.lr_scaling] * c.train.lr


def build_lr_schedule(optimizer, t: TrainConfig, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process, hence the factor.
    return get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.warmup_steps * num_processes,
        num_training_steps=t.steps * num_processes,
    )
