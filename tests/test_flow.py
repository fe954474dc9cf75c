"""Flow-matching helpers (SD3/FLUX): targets, timestep samplers and loss weights vs formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit import config as cfg
from lorakit.errors import ConfigError
from lorakit.models import flow

N = 40_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noisy_input_and_velocity_target_follow_the_rectified_flow_formulas():
    x0 = torch.randn(3, 16, 4, 4, generator=_gen(1))
    noise = torch.randn(3, 16, 4, 4, generator=_gen(2))
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = flow.noisy_and_target(x0, noise, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        assert torch.allclose(noisy[i], (1 - s) * x0[i] + s * noise[i], atol=1e-6)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(target, noise - x0, atol=1e-6)


def test_uniform_sampler_statistics():
    s = flow.sample_sigmas(N, _gen(), "uniform")
    assert s.shape == (N,) and s.dtype == torch.float32
    assert s.min() > 0 and s.max() < 1
    assert abs(s.mean().item() - 0.5) < 0.01
    assert abs(s.var().item() - 1 / 12) < 0.003


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_sampler_has_normal_logits(mean, std):
    s = flow.sample_sigmas(N, _gen(3), "logit_normal", logit_mean=mean, logit_std=std)
    logits = torch.logit(s.double())
    assert abs(logits.mean().item() - mean) < 0.03
    assert abs(logits.std().item() - std) < 0.03


def test_sigmoid_sampler_is_centred_logit_normal_with_the_given_scale():
    s = flow.sample_sigmas(N, _gen(4), "sigmoid", logit_mean=2.0, logit_std=1.3)
    logits = torch.logit(s.double())
    assert abs(logits.mean().item()) < 0.03, "sigmoid sampling ignores logit_mean"
    assert abs(logits.std().item() - 1.3) < 0.03
    assert abs(s.median().item() - 0.5) < 0.01


def test_shift_sampler_is_the_exact_shift_of_the_logit_normal_draws():
    base = flow.sample_sigmas(1000, _gen(5), "logit_normal", 0.2, 0.9)
    for shift in (1.0, 3.0, 0.5):
        shifted = flow.sample_sigmas(1000, _gen(5), "shift", 0.2, 0.9, mu=math.log(shift))
        expected = shift * base / (1 + (shift - 1) * base)
        assert torch.allclose(shifted, expected, atol=1e-6), shift
    # a shift > 1 moves mass towards noise
    assert flow.sample_sigmas(N, _gen(6), "shift", mu=math.log(3.0)).mean() > 0.6


def test_time_shift_formula_and_flux_mu():
    s = torch.linspace(0.01, 0.99, 50)
    mu = 0.83
    assert torch.allclose(flow.time_shift(s, mu), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    # diffusers' calculate_shift: (256 tokens, 0.5) to (4096 tokens, 1.15), linear
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(64 * 64) == pytest.approx(1.15)  # 1024 px: 128×128 latent → 64×64 tokens
    assert flow.flux_mu(2176) == pytest.approx(0.825)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 1024, 3000):
        assert flow.flux_mu(n) == pytest.approx(calculate_shift(n))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = torch.linspace(0.05, 0.95, 19)
    ours = flow.loss_weights(s, scheme)
    theirs = compute_loss_weighting_for_sd3(scheme, s)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_weighted_mse_is_per_sample_mean_times_weight():
    pred = torch.randn(2, 4, 3, 3, generator=_gen(7))
    target = torch.randn(2, 4, 3, 3, generator=_gen(8))
    s = torch.tensor([0.2, 0.7])
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(flow.weighted_mse(pred, target, s, "none"), per.mean())
    assert torch.allclose(flow.weighted_mse(pred, target, s, "sigma_sqrt"), (per / s**2).mean())


def test_unknown_sampler_and_weighting_are_rejected():
    with pytest.raises(ValueError):
        flow.sample_sigmas(2, _gen(), "cosine")
    with pytest.raises(ValueError):
        flow.loss_weights(torch.ones(2) / 2, "snr")


def test_flow_config_keys_are_typed_and_checked():
    c = cfg.resolve(
        sets=["train.timestep_sampling='logit_normal'", "train.loss_weighting='cosmap'"]
    )
    assert c.train.timestep_sampling == "logit_normal" and c.train.loss_weighting == "cosmap"
    with pytest.raises(ConfigError, match="timestep_sampling"):
        cfg.resolve(sets=["train.timestep_sampling='cosine'"])
    with pytest.raises(ConfigError, match="logit_std"):
        cfg.resolve(sets=["train.logit_std=0"])
    with pytest.raises(ConfigError, match=r"model.quantize.*CUDA"):
        cfg.resolve(sets=["model.quantize='nf4'", "train.device='cpu'"])
