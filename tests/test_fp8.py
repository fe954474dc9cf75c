"""`model.quantize = "fp8"`: the frozen denoiser stored as float8 e4m3 (diffusers' layerwise
casting), computed in the training dtype, for every family, on the CPU too.

Measured on this CPU with the tiny models (fp32 compute):
- denoiser output, fp8 storage vs the fp32 base, same inputs: relative L2 error sd15 9.5 %,
  sdxl 7.4 %, sd3 0.6 %, flux 2.5 % (random tiny weights; asserted < 15 %);
- the exported LoRA after a 2-step CLI run on an fp8 base vs the same run on the fp32 base:
  relative L2 difference 2e-5 (sd3, flux) to 1.1e-4 (sdxl) (asserted < 10 %); the initial LoRA
  is identical (peft gives it the compute dtype, not fp8);
- bytes: every fp8-stored layer holds exactly half its bf16 bytes (a quarter of fp32); the whole
  tiny denoiser vs fp32: sd15/sdxl 0.25, sd3 0.30, flux 0.28 (the tiny models' embedders and
  final layers, which stay in the compute dtype, are a larger share than at real width, where
  every family comes to 0.50–0.506 of bf16: `test_real_denoiser_fp8_bytes_are_half_of_bf16`);
  the planner's count equals the byte meter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit.config import Config
from lorakit.errors import ConfigError
from lorakit.models import FAMILIES
from lorakit.models.quantize import check_quantize, fp8_layers
from lorakit.planner import weight_bytes

FP8 = torch.float8_e4m3fn
FAMS = sorted(FAMILIES)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _inputs(name: str, comps):
    """Fixed (noisy latents, timesteps, cond) for one `predict` of the tiny denoiser."""
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = fam.encode_images(comps, pixels)
    cond = dict(fam.encode_prompts(comps, ["a red logo on a white wall"]))
    cond.update(fam.image_conditioning(comps, (64, 64), (0, 0), (64, 64)))
    noise, t = fam.noise_and_timesteps(comps, latents, g, Config().train)
    return latents + noise * 0.5, t, cond


def _place(name: str, tmp_path):
    """Load + place as `lorakit train` does (`_load_model`, `_place_for_training`)."""
    from types import SimpleNamespace

    from lorakit import train as tr
    from lorakit.models import resolve_family
    from lorakit.spec import build_spec

    c = Config()
    c.model.name, c.model.quantize, c.train.device = f"tiny:{name}", "fp8", "cpu"
    spec = build_spec(c, resolve_family(c.model)[0])
    acc = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    comps = tr._load_model(c, spec, acc, tmp_path)
    tr._place_for_training(spec, comps, torch.device("cpu"))
    return c, spec, comps


@pytest.mark.parametrize("name", FAMS)
def test_fp8_storage_layers_bytes_and_output_agreement(name, tmp_path):
    c, spec, comps = _place(name, tmp_path)
    fam = FAMILIES[name]
    den = getattr(comps, fam.denoiser_name)
    layers = fp8_layers(den)
    assert layers, name
    for m in layers:  # (a) Linear/Conv stored in fp8
        assert m.weight.dtype == FP8, name
    ref = getattr(fam.build_tiny(seed=0), fam.denoiser_name).float().eval()
    # (b) bytes: fp8 layers are half their bf16 bytes, a quarter of fp32; the planner agrees
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    fp8_b = sum(_bytes(m) for m in layers)
    assert fp8_b * 2 == sum(_bytes(m) for m in fp8_layers(bf16))
    assert fp8_b * 4 == sum(_bytes(m) for m in fp8_layers(ref))
    assert weight_bytes(ref, 4, "fp8") == _bytes(den) + sum(b.nbytes for b in den.buffers())
    assert _bytes(den) < 0.9 * _bytes(ref), (name, _bytes(den), _bytes(ref))
    # (d) denoiser output vs the fp32 base
    noisy, t, cond = _inputs(name, comps)
    with torch.no_grad():
        want = fam.predict(ref, noisy, t, cond)
        got = fam.predict(den.eval(), noisy, t, cond)
    rel = ((got - want).norm() / want.norm()).item()
    assert got.dtype == want.dtype and 0 < rel < 0.15, (name, rel)
    # LoRA layers keep their own dtype (fp32), weights of the base stay fp8 after a forward
    from lorakit.train import _attach_lora

    _, params, _ = _attach_lora(c, spec, comps, torch.device("cpu"))
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    fam.predict(den, noisy, t, cond).float().square().mean().backward()
    # every lora_B gets a gradient through the fp8 layers — except where the fp32 base gives it
    # none either (Qwen-Image's last block: its text-stream outputs never reach the image)
    from dataclasses import replace

    from lorakit.lora import inject_lora

    ref_lora = copy.deepcopy(ref)
    inject_lora(ref_lora, replace(c.lora, target_modules=list(spec.targets)), c.train.seed)
    fam.predict(ref_lora, noisy, t, cond).float().square().mean().backward()
    unreached = {n for n, p in ref_lora.named_parameters() if p.requires_grad and p.grad is None}
    no_grad = {n for n, p in den.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == unreached, (name, sorted(no_grad ^ unreached)[:6])
    assert all(".lora_B." not in n for n in unreached) or name == "qwen-image", unreached
    with torch.no_grad():  # a checkpointed recompute that stops early leaves a layer in the
        fam.predict(den, noisy, t, cond)  # compute dtype until its next forward
    assert all(m.weight.dtype == FP8 for m in layers)


# The CLI run of one UNet and one DiT family in the default tier (the rest slow, to keep the
# default run under 8 minutes); every family's fp8 output and LoRA gradients are checked above.
@pytest.mark.parametrize(
    "name", [n if n in ("sd15", "flux") else pytest.param(n, marks=pytest.mark.slow) for n in FAMS]
)
def test_fp8_cli_run_exports_and_agrees_with_the_fp32_base(name, tmp_path):
    def run(out, *extra):
        args = ("train", SAMPLES, *FAST, "--model", f"tiny:{name}", "--steps", 2, "--out", out)
        cli(*args, *extra)
        from safetensors.torch import load_file

        return load_file(out / "lorakit.safetensors")

    fp8 = run(tmp_path / "fp8", "--set", "model.quantize='fp8'")
    base = run(tmp_path / "fp32")
    assert fp8.keys() == base.keys()
    num = den = 0.0
    for k in fp8:
        assert fp8[k].dtype == base[k].dtype
        num += (fp8[k].float() - base[k].float()).norm().item() ** 2
        den += base[k].float().norm().item() ** 2
    rel = (num / den) ** 0.5
    assert rel < 0.10, (name, rel)


def test_fp8_is_allowed_everywhere_and_refused_without_float8(monkeypatch):
    for fam in FAMILIES.values():
        check_quantize("fp8", fam)  # every family, CPU included
    from lorakit.config import validate

    c = Config()
    c.model.quantize, c.train.device = "fp8", "cpu"
    validate(c)  # the bitsandbytes-only CPU refusal lets fp8 through
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError) as e:
        check_quantize("fp8", FAMILIES["sd15"])
    msg = str(e.value)
    assert "float8" in msg and "model.quantize = 'none'" in msg and "\n" not in msg


def test_plan_counts_fp8_denoiser_weights_at_half_of_bf16():
    rows = {}
    for q in ("none", "fp8"):
        r = cli("plan", "--set", "model.name='tiny:sd15'", "--set", "train.mixed_precision='bf16'",
                "--set", f"model.quantize='{q}'", "--vram", 24)  # fmt: skip
        line = next(x for x in r.output.splitlines() if "denoiser weights" in x)
        rows[q] = float(line.split()[-1])
    assert abs(rows["fp8"] / rows["none"] - 0.5) < 0.05, rows


@pytest.mark.parametrize("name", FAMS)
def test_real_denoiser_fp8_bytes_are_half_of_bf16(name):
    """At real width fp8 storage halves the frozen denoiser: every family's Linear/Conv weights,
    the AdaLN modulations included (SD3 and FLUX.1 name them `norm1.linear`, which diffusers'
    "norm" skip pattern kept in bf16: FLUX.1-dev came to 0.64 of bf16, SD3.5 large 0.67)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        real = FAMILIES[name].build_real_denoiser()
    ratio = weight_bytes(real, 2, "fp8") / weight_bytes(real, 2, "none")
    assert 0.5 <= ratio < 0.52, (name, round(ratio, 3))
