"""`model.fp8_matmul`: the fp8-stored Linear layers multiply in fp8 (`torch._scaled_mm` on the
stored e4m3 weights), for every family. On the CPU `quantize.scaled_mm` computes the same fp8
products widened (torch's CPU `_scaled_mm` is a reference kernel, far too slow to train with);
the first test checks it against torch's kernel with the layouts both passes use.

Measured on this CPU with the tiny models (fp32 compute, `model.quantize = "fp8"` on both sides,
so the only difference is the fp8 matmul): denoiser output relative L2 error 0.67 % (sd3) to
4.9 % (z-image), asserted < 8 %; the LoRA gradient after one backward 3.9 % (sd15) to 12.7 %
(sdxl), asserted < 20 % (a wrong scale gives 100 % and more); one layer alone: 2.4 % on its
output, 5.0 % on its input gradient (e5m2 keeps 2 mantissa bits). The speed is a GPU
question (fp8 tensor cores): `benchmarks/gpu_session.sh` holds the row; no GPU has run it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from test_fp8 import _inputs, _place

from lorakit.config import Config, validate
from lorakit.errors import ConfigError
from lorakit.models import FAMILIES, quantize
from lorakit.models.quantize import _Fp8FrozenLinear, check_fp8_matmul, enable_fp8_matmul

FAMS = sorted(FAMILIES)


def test_one_layer_matches_the_widened_product_within_fp8_rounding(monkeypatch):
    torch.manual_seed(0)
    w8 = (torch.randn(64, 32) * 0.05).to(torch.float8_e4m3fn)
    x = torch.randn(3, 5, 32, requires_grad=True)
    # torch's own kernel (CPU reference) with the arguments the forward and backward pass
    # gives `scaled_mm`: the fallback computes the same numbers, and the layouts are valid
    fallback, seen = quantize.scaled_mm, []

    def both(a, b, scale_a, out_dtype):
        one = torch.ones((), dtype=torch.float32)
        kernel = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=one, out_dtype=out_dtype)
        ours = fallback(a, b, scale_a, out_dtype)
        seen.append((a.dtype, (ours - kernel).abs().max().item(), kernel.abs().max().item()))
        return ours

    monkeypatch.setattr(quantize, "scaled_mm", both)
    y = _Fp8FrozenLinear.apply(x, w8)
    want = x.detach() @ w8.float().t()
    assert y.shape == want.shape and y.dtype == x.dtype
    rel = ((y.detach() - want).norm() / want.norm()).item()
    assert 0 < rel < 0.05, rel  # 0.024 measured: the input is rounded to e4m3
    g = torch.randn_like(y)
    y.backward(g)
    gw = g @ w8.float()
    rel_g = ((x.grad - gw).norm() / gw.norm()).item()
    assert 0 < rel_g < 0.1, rel_g  # 0.050 measured: the gradient is rounded to e5m2
    assert [a for a, *_ in seen] == [torch.float8_e4m3fn, torch.float8_e5m2]
    assert all(diff <= 1e-5 * top for _, diff, top in seen), seen
    with pytest.raises(ValueError, match="column-major"):
        fallback(w8, w8, torch.ones(()), torch.float32)  # a row-major mat2


@pytest.mark.parametrize("name", FAMS)
def test_every_family_multiplies_in_fp8_and_agrees_with_fp8_storage(name, tmp_path, monkeypatch):
    c, spec, comps = _place(name, tmp_path)
    fam = FAMILIES[name]
    den = getattr(comps, fam.denoiser_name).eval()
    noisy, t, cond = _inputs(name, comps)
    with torch.no_grad():
        want = fam.predict(den, noisy, t, cond)
    switched = enable_fp8_matmul(den)
    assert switched > 0, name
    calls = []
    real = quantize.scaled_mm

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(quantize, "scaled_mm", counting)
    with torch.no_grad():
        got = fam.predict(den, noisy, t, cond)
    assert len(calls) >= switched, (name, len(calls), switched)  # each switched layer ran fp8
    rel = ((got - want).norm() / want.norm()).item()
    assert got.dtype == want.dtype and 0 < rel < 0.08, (name, rel)
    assert all(
        m.weight.dtype == torch.float8_e4m3fn for m in den.modules() if type(m) is torch.nn.Linear
        and m.in_features % 16 == 0 and m.out_features % 16 == 0 and hasattr(m, "compute_dtype")
    )  # fmt: skip
    # the LoRA's gradient through fp8 matmuls vs through the widened weights
    from lorakit.train import _attach_lora

    def lora_grad(model_comps):
        _, params, _ = _attach_lora(c, spec, model_comps, torch.device("cpu"))
        d = getattr(model_comps, fam.denoiser_name)
        fam.predict(d, noisy, t, cond).float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    fast = lora_grad(comps)
    _, _, plain = _place(name, tmp_path / "plain")
    slow = lora_grad(plain)
    rel_g = ((fast - slow).norm() / slow.norm()).item()
    assert 0 < rel_g < 0.2, (name, rel_g)


def test_cli_run_with_fp8_matmul_trains_and_exports(tmp_path):
    from safetensors.torch import load_file

    def run(out, *extra):
        args = ("train", SAMPLES, *FAST, "--model", "tiny:flux", "--steps", 2, "--out", out)
        cli(*args, "--set", "model.quantize='fp8'", *extra)
        return load_file(out / "lorakit.safetensors")

    fast = run(tmp_path / "fast", "--set", "model.fp8_matmul=true")
    plain = run(tmp_path / "plain")
    assert fast.keys() == plain.keys()
    num = sum((fast[k].float() - plain[k].float()).norm() ** 2 for k in fast) ** 0.5
    den = sum(plain[k].float().norm() ** 2 for k in plain) ** 0.5
    assert 0 < (num / den).item() < 0.1


def test_bad_combinations_are_refused_naming_the_keys(monkeypatch):
    c = Config()
    c.model.fp8_matmul = True
    with pytest.raises(ConfigError, match=r"model.quantize = 'fp8'"):
        validate(c)
    c.model.quantize, c.train.block_swap = "fp8", 4
    with pytest.raises(ConfigError, match=r"train.block_swap = 0"):
        validate(c)
    c.train.block_swap = 0
    validate(c)
    # a GPU without fp8 tensor cores (an RTX 3090: 8.6), refused before loading
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ConfigError, match=r"compute capability 8.6.*model.fp8_matmul = false"):
        check_fp8_matmul(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    check_fp8_matmul(torch.device("cuda"))
    check_fp8_matmul(torch.device("cpu"))
