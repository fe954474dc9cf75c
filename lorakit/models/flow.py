"""Rectified-flow (flow-matching) training helpers shared by SD3.5 and FLUX.1.

Conventions (both families):
- a "timestep" is a sigma σ in [0, 1]: σ = 0 is the clean latent, σ = 1 pure noise;
- noisy input `x_σ = (1 - σ) · x0 + σ · noise`, training target (velocity) `noise - x0`;
- sigmas are drawn per sample, on CPU, from the seeded generator the loop passes in.

Timestep samplers (`train.timestep_sampling`), with z ~ N(0, 1):
- `uniform`:      σ = u, u ~ U(0, 1)
- `logit_normal`: σ = sigmoid(logit_mean + logit_std · z)  (SD3 paper, diffusers' `logit_normal`)
- `sigmoid`:      σ = sigmoid(logit_std · z)  (kohya's `sigmoid`; the logit-normal centred at 0)
- `shift`:        σ = shift(sigmoid(logit_mean + logit_std · z)) where
                  shift(σ) = e^μ / (e^μ + (1/σ - 1)), i.e. `s·σ / (1 + (s - 1)·σ)` with s = e^μ.
                  μ = ln(train.flow_shift) when that is set; otherwise the family's default:
                  SD3 the scheduler's constant `shift` (3.0), FLUX the resolution-dependent μ of
                  `FluxPipeline` (`calculate_shift`: linear in the image token count between
                  (256 tokens, 0.5) and (4096 tokens, 1.15)).

Timestep bias (`train.timestep_bias`, applied after any sampler above, same draws):
- `none`:    σ unchanged (bit-identical to no bias);
- `style`:   logit σ' = logit σ + ln 3, i.e. σ' = 3σ / (1 + 2σ): more high-noise steps, where
             composition, layout and colour are decided (median 0.5 → 0.75);
- `content`: logit σ' = logit σ - ln 3, i.e. σ' = σ / (3 - 2σ): more low-noise steps, where
             detail and texture are refined (median 0.5 → 0.25).
  For the logit-normal samplers this is their mean moved by ±ln 3 ≈ ±1.10 (`shift`: the shift
  multiplied by 3^±1).

Loss weighting (`train.loss_weighting`, diffusers' `compute_loss_weighting_for_sd3`):
`none` → 1, `sigma_sqrt` → σ⁻², `cosmap` → 2 / (π · (1 - 2σ + 2σ²)).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lorakit.data.masks import active_weights, masked_mse
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.config import TrainConfig

SAMPLERS = ("uniform", "logit_normal", "sigmoid", "shift")
BIAS_LOGIT = {"none": 0.0, "style": math.log(3.0), "content": -math.log(3.0)}
"""`train.timestep_bias` → how far it moves logit σ (see the module docstring)."""
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# Keeps σ away from exactly 0 (σ⁻² weighting) and 1 (the shift formula's 1/σ).
_EPS = 1e-5


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift exponent μ (diffusers `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ → e^μ / (e^μ + (1/σ - 1)); equals the constant shift `s·σ/(1+(s-1)σ)` for s = e^μ."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    sampling: str,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mu: float = 0.0,
    bias: str = "none",
) -> torch.Tensor:
    """`[batch]` float32 sigmas in (0, 1) on CPU (see the module docstring for the formulas);
    `bias` is `train.timestep_bias`."""
    if sampling == "uniform":
        sigmas = torch.rand((batch,), generator=generator)
    elif sampling == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn((batch,), generator=generator))
    elif sampling == "sigmoid":
        sigmas = torch.sigmoid(logit_std * torch.randn((batch,), generator=generator))
    elif sampling == "shift":
        base = torch.sigmoid(logit_mean + logit_std * torch.randn((batch,), generator=generator))
        sigmas = time_shift(base.clamp(_EPS, 1 - _EPS), mu)
    else:
        raise ValueError(f"unknown timestep sampling '{sampling}'; choose from {SAMPLERS}")
    if bias != "none":  # a transform of the same draws: the generator is consumed as without
        sigmas = time_shift(sigmas.clamp(_EPS, 1 - _EPS), BIAS_LOGIT[bias])
    return sigmas.clamp(_EPS, 1 - _EPS).float()


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights `[B]` for sigmas `[B]`."""
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"unknown loss weighting '{scheme}'; choose from {WEIGHTINGS}")


def noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x_σ = (1-σ)·x0 + σ·noise` and the velocity target `noise - x0` (σ `[B]` broadcast)."""
    s = sigmas.to(latents.device, torch.float32).view(-1, *([1] * (latents.dim() - 1)))
    x0, n = latents.float(), noise.to(latents.device).float()
    noisy = (1.0 - s) * x0 + s * n
    return noisy.to(latents.dtype), (n - x0)


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, scheme: str
) -> torch.Tensor:
    """Mean over the batch of `w(σ) · mean((pred - target)²)`; fp32 scalar. Under
    `data.masks.loss_mask` the per-sample mean is the mask-weighted one (`masks.masked_mse`)."""
    weights = active_weights()
    if weights is not None:
        per_sample = masked_mse(pred, target, weights)
    else:
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * loss_weights(sigmas, scheme).to(per_sample.device)).mean()


# --- shared by the flow families' components ------------------------------------------------------


def encode_flow_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` → `(mean - shift_factor) * scaling_factor`, `[B, 16, H/8, W/8]`."""
    pixels = pixels.to(vae.device, vae.dtype)
    mean = vae.encode(pixels).latent_dist.mean
    return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def shift_mu(train: TrainConfig, default_shift: float) -> float:
    """μ = ln(shift) of the `shift` sampler: `train.flow_shift` when set, else the default."""
    return math.log(train.flow_shift or default_shift)


def check_flow_sampler(scheduler: str, family: str) -> None:
    if scheduler not in ("default", "euler"):
        raise LorakitError(
            f"sample.scheduler = '{scheduler}' does not apply to {family} (a flow-matching model "
            "sampled with its FlowMatchEuler scheduler). Set sample.scheduler = 'default'."
        )


def meta_inputs(
    batch: int,
    h: int,
    w: int,
    dtype: torch.dtype,
    latent_channels: int,
    text_tokens: int,
    text_dim: int,
    pooled_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-device (latents `[B, C, h, w]`, sigmas `[B]` = 0.5, cond with
    `encoder_hidden_states` `[B, tokens, D]` and `pooled_projections` `[B, P]`) for the planner."""
    meta = dict(device="meta", dtype=dtype)
    lat = torch.empty(batch, latent_channels, h, w, **meta)
    cond = {"encoder_hidden_states": torch.empty(batch, text_tokens, text_dim, **meta)}
    cond["pooled_projections"] = torch.empty(batch, pooled_dim, **meta)
    t = torch.full((batch,), 0.5, device="meta")
    return lat, t, cond
