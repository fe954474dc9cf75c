"""DDPM (epsilon / v-prediction) training maths shared by the UNet families (SD1.5, SDXL).

Conventions (both families):
- timesteps: integers in [0, T) (T = num_train_timesteps, 1000), drawn per sample, on CPU, from
  the seeded generator the loop passes in: uniformly (`train.timestep_bias = none`), or with
  u ~ U(0, 1) by the cubic of T2I-Adapter (arXiv 2302.08453, §3.4; diffusers' T2I-Adapter
  script): `style` t = ⌊(1 - u³)·T⌋ clamped to T - 1 (more high-noise steps, where composition
  and colour are decided; mean ≈ 3T/4), `content` t = ⌊u³·T⌋ (more low-noise steps, where
  detail is refined; mean ≈ T/4);
- noisy input from the model's DDPM noise schedule (`DDPMScheduler.add_noise`), target `noise`
  (epsilon) or `scheduler.get_velocity(latents, noise, t)` (v-prediction), read from the
  scheduler config's `prediction_type`;
- optional noise offset (`noise += offset * randn(B, C, 1, 1)`) and min-SNR-γ weighting
  (`w = min(SNR, γ) / SNR` for epsilon, `min(SNR, γ) / (SNR + 1)` for v-prediction).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorakit.data.masks import active_weights, masked_mse
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.config import TrainConfig

SCALED_LINEAR_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
"""The real SD1.5 scheduler config (PNDM, scaled-linear betas, epsilon target); SDXL trains on
the same noise schedule."""

_SAMPLERS = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def ddpm_noise_and_timesteps(
    components: Any, latents: torch.Tensor, generator: torch.Generator, train: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise `[B, C, H, W]` (+ noise offset `[B, C, 1, 1]`) and integer timesteps `[B]`, seeded;
    `train.timestep_bias` picks their distribution (module docstring)."""
    b, ch = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if train.noise_offset:
        noise += train.noise_offset * torch.randn((b, ch, 1, 1), generator=generator)
    steps = components.scheduler.config.num_train_timesteps
    if train.timestep_bias == "none":
        return noise, torch.randint(0, steps, (b,), generator=generator)
    cube = torch.rand((b,), generator=generator, dtype=torch.float64) ** 3
    scaled = (1.0 - cube if train.timestep_bias == "style" else cube) * steps
    return noise, scaled.long().clamp(0, steps - 1)


def ddpm_loss(
    predict,
    components: Any,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    train: TrainConfig,
) -> torch.Tensor:
    """Epsilon / v-prediction MSE (from the scheduler config), optionally min-SNR-γ weighted;
    per sample mask-weighted under `data.masks.loss_mask` (`masks.masked_mse`).
    `predict(denoiser, noisy, timesteps, cond)` is the family's denoiser call."""
    sched = _training_scheduler(components)
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise LorakitError(
            f"The model's scheduler has prediction_type '{kind}'; lorakit trains SD1.5/SDXL "
            "models with 'epsilon' or 'v_prediction' targets."
        )
    pred = predict(denoiser, noisy, timesteps, cond)
    weights = active_weights()  # train.masked_loss: `data.masks.loss_mask` around the call
    if not train.min_snr_gamma and weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    if weights is not None:
        per_sample = masked_mse(pred, target, weights)
        if not train.min_snr_gamma:
            return per_sample.mean()
    else:
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
            dim=tuple(range(1, pred.dim()))
        )
    return (per_sample * min_snr_weights(sched, timesteps, train.min_snr_gamma, kind)).mean()


def preview_scheduler(scheduler, name: str):
    """The model's own scheduler (`default`) or a sampler built from its config."""
    if name == "default":
        return scheduler
    import diffusers

    return getattr(diffusers, _SAMPLERS[name]).from_config(scheduler.config)


def min_snr_weights(sched, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) for a DDPM schedule, per sample."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if kind == "v_prediction" else clipped / snr


def _training_scheduler(c: Any):
    """DDPM noise schedule from the model's scheduler config (the sampler may differ)."""
    cached = getattr(c, "_ddpm", None)
    if cached is None:
        from diffusers import DDPMScheduler

        cached = DDPMScheduler.from_config(c.scheduler.config)
        c._ddpm = cached  # type: ignore[attr-defined]
    return cached


def load_scheduler(name: str, common: dict[str, Any]):
    """The scheduler class the model names in its config (PNDM for SD1.5), DDPM otherwise."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(name, subfolder="scheduler", **common)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    return cls.from_config(config)


def meta_inputs(
    batch: int,
    h: int,
    w: int,
    dtype: torch.dtype,
    latent_channels: int,
    text_tokens: int,
    text_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-device (latents `[B, C, h, w]`, timesteps `[B]` long = 500, cond with
    `encoder_hidden_states` `[B, tokens, D]`) for the planner; families add their own keys."""
    meta = dict(device="meta", dtype=dtype)
    lat = torch.empty(batch, latent_channels, h, w, **meta)
    cond = {"encoder_hidden_states": torch.empty(batch, text_tokens, text_dim, **meta)}
    t = torch.full((batch,), 500, device="meta", dtype=torch.long)
    return lat, t, cond
