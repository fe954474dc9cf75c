"""`train.timestep_bias`: style moves the drawn timesteps towards noise, content towards the
clean image, for every family kind; `none` is the sampler as it was (same draws, same bits)."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.config import Config, TrainConfig
from lorakit.data.order import draw_noise
from lorakit.evaluate import heldout_draws
from lorakit.models import FAMILIES, flow

N = 4000


@pytest.fixture(scope="module")
def tiny():
    """family → (components, one latent [1, C, 8, 8]) of the tiny models (64 px)."""
    torch.set_num_threads(1)
    out = {}
    for name, fam in FAMILIES.items():
        comps = fam.build_tiny(0)
        with torch.no_grad():
            lat = fam.encode_images(comps, torch.zeros(1, 3, 64, 64))
        out[name] = (comps, lat)
    return out


def _draw(fam, comps, lat, bias: str, seed: int = 0, n: int = N, **train):
    gen = torch.Generator().manual_seed(seed)
    noise, t = fam.noise_and_timesteps(
        comps, lat.expand(n, *lat.shape[1:]), gen, TrainConfig(timestep_bias=bias, **train)
    )
    return noise, t


def _noise_level(t: torch.Tensor, steps: int) -> torch.Tensor:
    """Timesteps as a fraction of the way to pure noise: DDPM t / T, flow σ."""
    return t.double() / steps if not t.dtype.is_floating_point else t.double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_style_draws_more_noise_and_content_less_with_the_same_noise(family, tiny):
    fam = FAMILIES[family]
    comps, lat = tiny[family]
    steps = comps.scheduler.config.num_train_timesteps
    draws = {b: _draw(fam, comps, lat, b) for b in ("none", "style", "content")}
    level = {b: _noise_level(t, steps) for b, (_, t) in draws.items()}
    # the noise itself is drawn first and never changes with the bias
    assert torch.equal(draws["style"][0], draws["none"][0])
    assert torch.equal(draws["content"][0], draws["none"][0])
    none, style, content = (level[b].mean().item() for b in ("none", "style", "content"))
    assert style > none + 0.1 and content < none - 0.1, (family, content, none, style)
    if draws["none"][1].dtype.is_floating_point:  # flow: logit σ moved by ±ln 3, same draws
        base = draws["none"][1].double().clamp(1e-5, 1 - 1e-5)
        for bias, sign in (("style", 1), ("content", -1)):
            moved = torch.logit(draws[bias][1].double()) - torch.logit(base)
            inner = (base > 1e-3) & (base < 1 - 1e-3)  # away from the clamp at 1e-5
            assert torch.allclose(moved[inner], torch.full_like(moved[inner], sign * math.log(3)),
                                  atol=2e-4), (family, bias)  # fmt: skip
    else:  # DDPM: the T2I-Adapter cubic, t = ⌊(1 - u³)T⌋ / ⌊u³T⌋ with u ~ U(0, 1)
        t_style, t_content = draws["style"][1], draws["content"][1]
        assert t_style.dtype == t_content.dtype == torch.long
        assert int(t_content.min()) >= 0 and int(t_style.max()) <= steps - 1
        assert abs(t_style.double().mean().item() - 0.75 * steps) < 0.02 * steps
        assert abs(t_content.double().mean().item() - 0.25 * steps) < 0.02 * steps
        # P(t < T/2) = P(u³ < 1/2) = 2^(-1/3) for content, 1 - 2^(-1/3) for style
        half = 0.5 ** (1 / 3)
        assert abs((t_content < steps // 2).double().mean().item() - half) < 0.03
        assert abs((t_style < steps // 2).double().mean().item() - (1 - half)) < 0.03


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_none_is_the_unbiased_sampler_bit_for_bit(family, tiny):
    """`none` draws what the samplers drew before the bias existed, re-implemented here from
    their formulas with the same generator: DDPM noise then `randint(0, T)`; flow noise, then
    the sampler (the shift sampler with μ = ln(train.flow_shift))."""
    fam = FAMILIES[family]
    comps, lat = tiny[family]
    shape = (64, *lat.shape[1:])
    if family == "sd15":
        noise, t = _draw(fam, comps, lat, "none", seed=3, n=64, noise_offset=0.1)
        gen = torch.Generator().manual_seed(3)
        want_noise = torch.randn(shape, generator=gen)
        want_noise += 0.1 * torch.randn((64, shape[1], 1, 1), generator=gen)
        want_t = torch.randint(0, comps.scheduler.config.num_train_timesteps, (64,), generator=gen)
        assert torch.equal(noise, want_noise) and torch.equal(t, want_t)
        return
    for sampling in ("uniform", "logit_normal", "sigmoid", "shift"):
        cfg = dict(timestep_sampling=sampling, logit_mean=0.3, logit_std=0.9, flow_shift=2.0)
        noise, t = _draw(fam, comps, lat, "none", seed=3, n=64, **cfg)
        gen = torch.Generator().manual_seed(3)
        assert torch.equal(noise, torch.randn(shape, generator=gen))
        if sampling == "uniform":
            want = torch.rand((64,), generator=gen)
        elif sampling == "sigmoid":
            want = torch.sigmoid(0.9 * torch.randn((64,), generator=gen))
        else:
            want = torch.sigmoid(0.3 + 0.9 * torch.randn((64,), generator=gen))
        if sampling == "shift":
            want = 2.0 / (2.0 + (1 / want.clamp(1e-5, 1 - 1e-5) - 1))
        assert torch.equal(t, want.clamp(1e-5, 1 - 1e-5).float()), sampling


def test_training_draws_are_biased_and_held_out_draws_are_not(tiny):
    """`draw_noise` (the training loop's) follows train.timestep_bias; the held-out scores'
    draws ignore it, so runs trained with different biases are scored on the same draws."""
    fam = FAMILIES["sd15"]
    comps, lat = tiny["sd15"]
    lat8 = lat.expand(32, *lat.shape[1:])
    c_none, c_style = Config(), Config()
    c_style.train.timestep_bias = "style"
    _, t_none = draw_noise(fam, comps, lat8, c_none, 0)
    _, t_style = draw_noise(fam, comps, lat8, c_style, 0)
    assert t_style.double().mean() > t_none.double().mean() + 100
    held_none = heldout_draws(fam, comps, lat, c_none.train, 1234, 8)
    held_style = heldout_draws(fam, comps, lat, c_style.train, 1234, 8)
    for a, b in zip(held_none, held_style, strict=True):
        assert torch.equal(a, b)


def test_flow_bias_formula_is_the_logit_normal_mean_moved_by_ln3():
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    for sampling in ("logit_normal", "shift"):
        base = flow.sample_sigmas(N, gen(), sampling, 0.2, 1.0, mu=0.5)
        style = flow.sample_sigmas(N, gen(), sampling, 0.2, 1.0, mu=0.5, bias="style")
        content = flow.sample_sigmas(N, gen(), sampling, 0.2, 1.0, mu=0.5, bias="content")
        # the same as a logit-normal mean of 0.2 ± ln 3 (+ μ for `shift`)
        mean = 0.2 + (0.5 if sampling == "shift" else 0.0)
        for s, m in ((base, mean), (style, mean + math.log(3)), (content, mean - math.log(3))):
            assert abs(torch.logit(s.double()).mean().item() - m) < 0.05, (sampling, m)
        assert torch.allclose(style.double(), 3 * base.double() / (1 + 2 * base.double()),
                              atol=1e-6)  # fmt: skip
