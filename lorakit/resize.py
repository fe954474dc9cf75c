"""`lorakit resize`: lower the rank of each LoRA by truncated SVD of its ΔW.

For a module with `ΔW = up @ down * alpha / r` (conv: `down` flattened to `[r, in·kh·kw]`):
`ΔW = U S Vᵀ`; rank R keeps the R largest singular values, new `up = U_R S_R^½`,
`down = S_R^½ V_Rᵀ`, alpha = R (scale 1), which is the best rank-R approximation in Frobenius
norm. Retained energy per module = Σ_{i<R} s_i² / Σ s_i² (1.0 = exact). `--energy E` picks,
per module, the smallest R whose retained energy ≥ E. Computed from the factors (QR of up and
downᵀ, then an r×r SVD), never the dense ΔW, so it is cheap for real model sizes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lorakit.errors import LorakitError
from lorakit.lora import Adapter, LoraWeights


def _svd(w: LoraWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    down = w.down.double().reshape(w.rank, -1)  # [r, in']
    up = w.up.double().reshape(w.up.shape[0], w.rank)  # [out, r]
    qu, ru = torch.linalg.qr(up)  # up = qu ru
    qd, rd = torch.linalg.qr(down.T)  # downᵀ = qd rd
    core = ru @ rd.T * (w.alpha / w.rank)  # ΔW = qu core qdᵀ
    u, s, vh = torch.linalg.svd(core)
    return qu @ u, s, vh @ qd.T


def resize_module(
    w: LoraWeights, rank: int | None = None, energy: float | None = None
) -> tuple[LoraWeights, float, float]:
    """→ (resized LoRA, retained Frobenius energy in [0, 1], total energy ‖ΔW‖²)."""
    u, s, vh = _svd(w)
    total = float((s**2).sum())
    cum = (s**2).cumsum(0) / total if total > 0 else torch.ones_like(s)
    # ΔW has at most min(rank, out, in') singular values: a LoRA wider than its module (rank
    # 64 on a 32-wide layer) resized to 48 keeps all 32
    if rank is not None:
        r = max(1, min(rank, w.rank, s.numel()))
    else:
        r = int((cum < energy - 1e-12).sum()) + 1
        r = min(r, w.rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    if w.down.dim() == 4:
        up = up[:, :, None, None]
        down = down.reshape(r, *w.down.shape[1:])
    kept = float(cum[r - 1]) if total > 0 else 1.0
    return LoraWeights(down.contiguous(), up.contiguous(), float(r)), kept, total


def resize_adapter(
    adapter: Adapter, rank: int | None = None, energy: float | None = None
) -> tuple[Adapter, dict[str, float], float]:
    """→ (resized adapter, retained energy per module `component.path`, overall energy)."""
    if (rank is None) == (energy is None):
        raise LorakitError("Give exactly one of --rank R or --energy E.")
    if rank is not None and rank < 1:
        raise LorakitError(f"--rank must be ≥ 1 (got {rank}).")
    if energy is not None and not 0 < energy <= 1:
        raise LorakitError(f"--energy must be in (0, 1] (got {energy}).")
    from lorakit.export.validate import check_adapter

    check_adapter(adapter)  # the rules every reader applies, also for adapters built in code
    modules, per, num, den = {}, {}, 0.0, 0.0
    for key, w in adapter.modules.items():
        if not isinstance(w, LoraWeights) or getattr(w, "magnitude", None) is not None:
            raise LorakitError(
                f"Module '{key[0]}.{key[1]}' is not a plain LoRA; resize handles LoRA only."
            )
        new, kept, e = resize_module(w, rank, energy)
        modules[key] = new
        per[f"{key[0]}.{key[1]}"] = kept
        num, den = num + kept * e, den + e
    meta = dict(adapter.metadata)
    meta["lorakit.resized"] = f"rank {rank}" if rank is not None else f"energy {energy}"
    ranks = sorted({w.rank for w in modules.values()})
    meta["ss_network_dim"] = str(ranks[-1])
    return replace(adapter, modules=modules, metadata=meta), per, (num / den if den else 1.0)
