"""Held-out loss: the training loss on a fixed validation subset with fixed noise and timesteps.

The noise and timesteps come from a private CPU generator seeded by `seed` (`eval.seed`), drawn
with the family's own `noise_and_timesteps` for every (image, repeat) pair in one go, so the same
latents and seed give the same draws for every checkpoint and every run: the numbers are
comparable. Each image is scored at `timesteps` draws and the loss is averaged over all pairs.

Nothing the training loop depends on is touched: no global RNG is consumed (the global torch,
CUDA, python and numpy states are also forked around the call), the denoiser is put in eval mode
(LoRA dropout off) and every module's train/eval flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from lorakit.config import TrainConfig


def heldout_indices(n_items: int, k: int) -> list[int]:
    """`k` image indices spread evenly over `n_items` (all of them when k ≥ n_items)."""
    if k <= 0 or n_items <= 0:
        return []
    if k >= n_items:
        return list(range(n_items))
    return [int(i) for i in np.linspace(0, n_items - 1, k).round().astype(int)]


@contextlib.contextmanager
def _preserved_rng():
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _weights_of(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for name, p in module.named_parameters():
        # skip LoRA, quantized (uint8) and fp8-stored weights: not the compute dtype
        if "lora_" not in name and p.dtype.is_floating_point and p.dtype.itemsize > 1:
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def heldout_draws(
    family: Any,
    components: Any,
    latents: torch.Tensor,
    train_cfg: TrainConfig,
    seed: int,
    timesteps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents `[N·timesteps, ...]` (each image `timesteps` times in a row, fp32 CPU), noise,
    timesteps) of the held-out scores: drawn for all (image, repeat) pairs at once from a
    generator seeded by `seed`, so fixed for a seed and the subset's shape. Without
    `train.timestep_bias`, so runs that bias training differently are scored alike."""
    gen = torch.Generator("cpu").manual_seed(seed)
    rep = latents.float().cpu().repeat_interleave(timesteps, dim=0)
    unbiased = replace(train_cfg, timestep_bias="none")
    noise, steps = family.noise_and_timesteps(components, rep, gen, unbiased)
    return rep, noise, steps


@torch.no_grad()
def heldout_loss(
    family: Any,
    components: Any,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    train_cfg: TrainConfig,
    seed: int,
    *,
    timesteps: int = 4,
    batch_size: int = 4,
) -> float:
    """Mean `family.loss` over `latents` `[N, ...]` (with `cond`, batch-first, N rows) × `timesteps`
    fixed noise draws each. Runs on the denoiser's device and dtype (autocast for fp16/bf16)."""
    n = latents.shape[0]
    if n == 0:
        raise ValueError("heldout_loss needs at least one latent")
    rep, noise, steps = heldout_draws(family, components, latents, train_cfg, seed, timesteps)
    device, dtype = _weights_of(denoiser)
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype in (torch.float16, torch.bfloat16)
        else contextlib.nullcontext()
    )
    flags = [(m, m.training) for m in denoiser.modules()]
    total, count = 0.0, 0
    try:
        denoiser.eval()
        with _preserved_rng(), autocast:
            for start in range(0, rep.shape[0], batch_size):
                sl = slice(start, start + batch_size)
                idx = torch.arange(rep.shape[0])[sl] // timesteps
                lat = rep[sl].to(device, dtype)
                c = {k: v[idx].to(device, dtype) for k, v in cond.items()}
                loss = family.loss(components, denoiser, lat, c, noise[sl], steps[sl], train_cfg)
                total += float(loss.float()) * lat.shape[0]
                count += lat.shape[0]
    finally:
        for m, flag in flags:
            m.training = flag
    return total / count


def eval_subset(records, k: int) -> list[int]:
    """A fixed validation subset of k training images, spread evenly over the set, all from the
    most common bucket (one batch shape); regularization images are never scored."""
    if k <= 0:
        return []
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        if not r.is_reg:
            by_bucket.setdefault(r.bucket, []).append(i)
    if not by_bucket:
        return []
    largest = max(by_bucket.values(), key=len)
    return [largest[j] for j in heldout_indices(len(largest), k)]


def score_heldout(
    family,
    comps,
    denoiser,
    cached,
    idx: list[int],
    encode_each_step: bool,
    t: TrainConfig,
    seed: int,
    timesteps: int,
) -> float:
    """Held-out loss of the current adapter on the records `idx` (`eval_subset`), conditioned
    on the cached embeddings (`cached`: a `data.cache.Cached`), or on captions encoded now when
    the run encodes them every step."""
    lat, cond = heldout_inputs(family, comps, cached, idx, encode_each_step)
    return heldout_loss(family, comps, denoiser, lat, cond, t, seed, timesteps=timesteps)


def heldout_inputs(family, comps, cached, idx: list[int], encode_each_step: bool, edit=None):
    """(latents `[k, C, h, w]`, conditioning dict) of the held-out records `idx`; `edit` maps
    each caption to the one conditioned on (the bleed score: the caption without the trigger,
    whose embedding the text cache holds too)."""
    lat = torch.stack([cached.latents[i] for i in idx])
    caps = [(edit or str)(cached.captions[i]) for i in idx]
    with torch.no_grad():
        if encode_each_step:
            cond = family.encode_prompts(comps, caps)
        else:
            cond = {k: torch.stack([v[cap] for cap in caps]) for k, v in cached.cond.items()}
        for k, v in cached.image_cond.items():
            cond[k] = torch.cat([v[i] for i in idx])
    return lat, cond


# -- the baseline score, computed once per content ------------------------------------------------

_NOT_SCORING = {  # train keys that do not change a held-out loss
    "out", "resume", "resume_changed_data", "overwrite", "steps", "save_every",
    "save_every_epochs", "keep_last", "log_every", "strict_memory", "compile",
    "timestep_bias", "preserve_weight", "preserve_prompt",  # unbiased draws, plain loss
}  # fmt: skip


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}|{tuple(t.shape)}".encode())
    flat = t.reshape(-1)
    n = flat.numel()
    part = flat if n <= 8192 else torch.cat([flat[:4096], flat[-4096:], flat[:: n // 4096]])
    part = part.to("cpu").contiguous()
    h.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")


def baseline_key(denoiser, lat, cond, train: TrainConfig, seed: int, timesteps: int) -> str:
    """Content key of a step-0 held-out score: the denoiser (every tensor's name, dtype, shape
    and a strided sample of its values — adapter weights included, so an adapter type that is
    not the identity at step 0 gets its own key), the held-out latents and conditioning, the
    loss settings, eval seed and timesteps, and the device type (CPU and CUDA kernels round
    differently). Hashing a sample, not all of a 12-billion-parameter transformer, keeps it a
    fraction of a second; the sample of every tensor still changes with any other base model."""
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256()
    for name, t in sorted(denoiser.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _tensor_digest(h, t)
    _tensor_digest(h, lat)
    for k in sorted(cond):
        h.update(k.encode())
        _tensor_digest(h, cond[k])
    scoring = {k: v for k, v in asdict(train).items() if k not in _NOT_SCORING}
    device = next((t.device.type for t in denoiser.parameters()), "cpu")
    h.update(json.dumps([scoring, seed, timesteps, device], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cached_baseline(folder, key: str, compute) -> tuple[float, bool]:
    """(score, whether it came from `folder`): `compute()` once per key, stored as JSON."""
    import json
    from pathlib import Path

    from lorakit.fileio import atomic_write_text

    path = Path(folder) / f"{key}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["heldout"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    atomic_write_text(path, json.dumps({"heldout": value}))
    return value, False
