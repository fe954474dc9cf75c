"""Pieces the families' `agreement.py` modules share (see `base.AgreementSupport` and
tests/test_agreement.py): the VAE normalisation that gives an image unit-RMS latents, LoRA target
lists of diffusers' shared block types, and deliberate training-side bugs in the helpers several
families train through (`flow.noisy_and_target`, `ddpm._training_scheduler`).

A fault is a function returning a context manager: inside it lorakit's training side has the
bug; the pipeline (diffusers' own code) is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.base import AgreementSetting

# Every Linear/Conv of diffusers' UNet blocks (all are in the SD families' fixed tables).
UNET_TARGETS = (
    "conv_in", "conv_out", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    "linear_1", "linear_2", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0",
    "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
# Every Linear of diffusers' joint (MM-DiT) blocks and their embedders / adaLN modulations.
JOINT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "linear_1",
    "linear_2",
)  # fmt: skip

# SD1.5/SDXL: epsilon prediction with SD's non-zero terminal SNR. At t = 999 the training input
# still holds 0.068·x0, and an ε error e becomes an x0 error of ~15e; from pure noise the
# sample's per-channel means follow the starting noise unless ε is learnt very precisely (the
# known "noise schedules are flawed" effect). Within the default budget some seeds then come
# back and some do not; noise offset (what it was invented for) and min-SNR-γ (weight on the
# high-noise steps) make all four come back, loosely in the default run, fully in the slow one.
_EPS = dict(min_snr_gamma=5.0, noise_offset=0.2, seeds=(0, 1, 2, 3))
EPSILON_DEFAULT = AgreementSetting(steps=160, threshold=0.55, layout_threshold=0.4, **_EPS)
EPSILON_SLOW = AgreementSetting(steps=400, threshold=0.95, layout_threshold=0.9, **_EPS)


@torch.no_grad()
def unit_normalisation(raw: torch.Tensor, centre: bool) -> tuple[float, float]:
    """(shift, scale) such that `(raw - shift) · scale` has RMS 1 — and mean 0 when `centre`
    (the flow families' VAEs carry a shift; SD's only a scale)."""
    shift = raw.mean().item() if centre else 0.0
    return shift, 1.0 / (raw - shift).pow(2).mean().sqrt().item()


def fit_vae_scale(vae, pixels: torch.Tensor, centre: bool) -> None:
    """Set an `AutoencoderKL`'s `scaling_factor` (and, when `centre`, `shift_factor`) so that
    `pixels`' latents come out with RMS 1 (and mean 0): the scale the noise schedules assume,
    as a real VAE's factors are fitted to real data."""
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
    shift, scale = unit_normalisation(raw, centre=centre)
    vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if centre else {}))


@contextlib.contextmanager
def patched(target: Any, attr: str, value: Any) -> Iterator[None]:
    """`target.attr = value` inside the block, the original restored after it."""
    original = getattr(target, attr)
    setattr(target, attr, value)
    try:
        yield
    finally:
        setattr(target, attr, original)


def flow_epsilon_target():
    """Flow families: ε (the noise) as the training target instead of the velocity noise - x0."""
    from lorakit.models import flow

    original = flow.noisy_and_target

    def noisy_and_target(latents, noise, sigmas):
        noisy, _ = original(latents, noise, sigmas)
        return noisy, noise.to(noisy.device).float()

    return patched(flow, "noisy_and_target", noisy_and_target)


def _ddpm_schedule(**changes):
    """The UNet families' training noise schedule (`ddpm._training_scheduler`) with config
    changes."""
    from diffusers import DDPMScheduler

    from lorakit.models import ddpm

    original = ddpm._training_scheduler

    def training_scheduler(c):
        return DDPMScheduler.from_config(original(c).config, **changes)

    return patched(ddpm, "_training_scheduler", training_scheduler)


def ddpm_v_prediction():
    """UNet families: v-prediction targets for an ε-prediction model."""
    return _ddpm_schedule(prediction_type="v_prediction")


def ddpm_linear_betas():
    """UNet families (the DDPM analogue of a wrong shift): noised with diffusers' default linear
    betas (1e-4 … 0.02) instead of the model's scaled-linear schedule."""
    return _ddpm_schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class UNetAgreement:
    """The `AgreementSupport` of an ε-prediction UNet family whose default tiny model memorises an
    image as it is (SD1.5, SDXL: `name` is the registry key): the VAE's `scaling_factor` set so
    the training image's latent has RMS 1; the pipeline returns the latents as the UNet sees
    them."""

    targets = UNET_TARGETS
    text_length = 0
    default = EPSILON_DEFAULT
    slow = EPSILON_SLOW
    faults = MappingProxyType({"target": ddpm_v_prediction, "schedule": ddpm_linear_betas})

    def __init__(self, name: str, default_tier: bool = True):
        self.name = name
        self.default_tier = default_tier

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from lorakit.models import FAMILIES

        comps = FAMILIES[self.name].build_tiny(seed=seed)
        fit_vae_scale(comps.vae, pixels, centre=False)
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        return latents
