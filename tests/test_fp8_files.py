"""ComfyUI's float8 single files, for every family with single files (`lorakit.models.fp8_files`):
plain `*_fp8_e4m3fn` files (weights stored as float8 e4m3), legacy scaled files (`scaled_fp8`
marker, `<layer>.scale_weight`, `<layer>.scale_input`) and the newer comfy_quant layout
(`<layer>.weight_scale`, `<layer>.comfy_quant`). The files are written here from the tiny models'
single-file state dicts, the way ComfyUI's converters write them (per-tensor scale = amax / 448)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from safetensors.torch import load_file, save_file

from lorakit.config import ModelConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.models import FAMILIES, load_model
from lorakit.models import single_file as sf
from lorakit.models.quantize import enable_fp8_storage

E4M3 = torch.float8_e4m3fn
SINGLE_FILE_FAMILIES = [n for n, f in FAMILIES.items() if f.single_file_configs() is not None]
SCALED_REL_ERROR = 0.05
"""Bound on ||dequantized - original|| / ||original|| of each denoiser weight of a scaled file
(e4m3 keeps 3 mantissa bits: at most 2^-4 relative rounding per normal value; measured on the
tiny models: 0.026 to 0.027 per family; the same weights cast to e4m3 without a scale: 0.028
to 0.033)."""


@pytest.fixture(scope="module", params=SINGLE_FILE_FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, its tiny diffusers folder (model.single_file_config), its bf16 single-file state,
    a temp dir)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"fp8-{name}")
    folder = tmp / "diffusers"
    cli("tiny-model", name, folder)
    fam = FAMILIES[name]
    state = fam.to_single_file(fam.build_tiny(seed=0))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}  # as released
    return name, folder, state, tmp


def _quantized(key: str, v: torch.Tensor) -> bool:
    """The tensors ComfyUI's converters store in float8: Linear / Conv weights."""
    return v.is_floating_point() and v.dim() >= 2 and key.endswith(".weight")


def plain(state):
    return {k: v.to(E4M3) if _quantized(k, v) else v for k, v in state.items()}


def rounded(state):
    """`plain(state)` widened back to bf16: the weights a plain fp8 file holds."""
    return {k: v.to(E4M3).to(v.dtype) if _quantized(k, v) else v for k, v in state.items()}


def scaled(state, layout="scaled_fp8"):
    """ComfyUI's scaled layout: weight / (amax / 448) stored as e4m3, the fp32 scale next to it
    (legacy: `.scale_weight` + `scaled_fp8` marker + some `.scale_input`; comfy_quant:
    `.weight_scale` + `.comfy_quant` JSON bytes)."""
    out = {}
    for k, v in state.items():
        if not _quantized(k, v):
            out[k] = v
            continue
        layer = k.removesuffix(".weight")
        scale = (v.float().abs().amax() / 448.0).clamp(min=1e-12)
        out[k] = (v.float() / scale).to(E4M3)
        if layout == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale.reshape(())
            out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[f"{layer}.weight_scale"] = scale.reshape(())
            conf = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if layout == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _denoiser(name, path, folder, **kw):
    fam, comps = load_model(ModelConfig(name=str(path), single_file_config=str(folder), **kw))
    assert fam.name == name
    return getattr(comps, fam.denoiser_name)


def test_every_e4m3_value_round_trips_through_bf16_exactly():
    """Why `model.quantize = "fp8"` on a plain fp8 file is lossless: e4m3 → bf16 → e4m3 gives
    the same byte for every e4m3 value (NaN aside); fp16 and fp32 too."""
    raw = torch.arange(256, dtype=torch.uint8)
    values = raw.view(E4M3)
    finite = ~values.float().isnan()
    for wide in (torch.bfloat16, torch.float16, torch.float32):
        back = values.to(wide).to(E4M3).view(torch.uint8)
        assert torch.equal(back[finite], raw[finite]), wide


def test_plain_fp8_file_loads_the_fp8_rounded_weights(tiny):
    name, folder, state, tmp = tiny
    path = _save(plain(state), tmp / "plain_fp8_e4m3fn.safetensors")
    # the generic step: same keys as the bf16 file, float8 widened to the file's bf16, exactly
    ck = sf.read_checkpoint(path, dequantize=True)
    expected = rounded(state)
    assert ck.keys() == expected.keys()
    assert all(ck[k].dtype == torch.bfloat16 and torch.equal(ck[k], expected[k]) for k in ck)
    # through the family's loader: its denoiser equals the one of the rounded bf16 file
    got = _denoiser(name, path, folder).state_dict()
    want = _denoiser(name, _save(expected, tmp / "rounded.safetensors"), folder).state_dict()
    assert got.keys() == want.keys()
    differ = [k for k in got if not torch.equal(got[k], want[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("layout", ["scaled_fp8", "comfy_quant"])
def test_scaled_file_loads_close_to_the_original(tiny, layout):
    name, folder, state, tmp = tiny
    path = _save(scaled(state, layout), tmp / f"{layout}.safetensors")
    ck = sf.read_checkpoint(path, dequantize=True)
    assert ck.keys() == state.keys()  # markers and scales gone
    assert all(ck[k].dtype == state[k].dtype for k in ck)
    got = _denoiser(name, path, folder).state_dict()
    want = _denoiser(name, _save(state, tmp / "bf16.safetensors"), folder).state_dict()
    assert got.keys() == want.keys()
    errors = {
        k: ((got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp(min=1e-12))
        for k in got
        if want[k].is_floating_point()
    }
    worst = max(errors, key=lambda k: errors[k])
    assert errors[worst] < SCALED_REL_ERROR, (worst, float(errors[worst]))
    assert errors[worst] > 0  # the weights really went through float8
    # the scale was applied exactly: weight.float() * scale, then rounded once to bf16
    key = next(k for k in state if _quantized(k, state[k]))
    file = load_file(str(path))
    layer = key.removesuffix(".weight")
    scale = file[layer + (".scale_weight" if layout == "scaled_fp8" else ".weight_scale")]
    assert torch.equal(ck[key], (file[key].float() * scale).to(torch.bfloat16))


def test_legacy_marker_under_the_model_prefix_and_row_scales(tmp_path):
    """`model.diffusion_model.scaled_fp8` (checkpoints with a prefix) and one scale per row."""
    w = torch.randn(8, 4)
    scale = w.abs().amax(dim=1) / 448
    state = {
        "model.diffusion_model.a.weight": (w / scale[:, None]).to(E4M3),
        "model.diffusion_model.a.scale_weight": scale,
        "model.diffusion_model.a.bias": torch.zeros(8),
        "model.diffusion_model.scaled_fp8": torch.empty(2, dtype=E4M3),
    }
    path = _save(state, tmp_path / "m.safetensors")
    ck = sf.read_checkpoint(path, dequantize=True)
    assert set(ck) == {"model.diffusion_model.a.weight", "model.diffusion_model.a.bias"}
    a = ck["model.diffusion_model.a.weight"]
    assert a.dtype == torch.float32
    assert ((a - w).norm() / w.norm()) < SCALED_REL_ERROR
    # without dequantize (split files the families read themselves): the file as it is
    assert "model.diffusion_model.scaled_fp8" in sf.read_checkpoint(path)


@pytest.mark.parametrize("layout", ["scaled_fp8", "comfy_quant"])
def test_scaled_file_missing_a_scale_is_refused(tmp_path, layout):
    name = "flux"
    fam = FAMILIES[name]
    state = scaled(fam.to_single_file(fam.build_tiny(seed=0)), layout)
    key = next(k for k in state if k.endswith((".scale_weight", ".weight_scale")))
    del state[key]
    layer = key.rsplit(".", 1)[0]
    path = _save(state, tmp_path / "broken_fp8_scaled.safetensors")
    with pytest.raises(LorakitError) as e:
        load_model(ModelConfig(name=str(path), single_file_config=str(tmp_path)))
    msg = str(e.value)
    assert str(path) in msg and f"'{layer}.weight'" in msg and "scaled-fp8" in msg
    assert "model.name" in msg


def test_unsupported_comfy_quant_format_is_refused(tmp_path):
    conf = json.dumps({"format": "nvfp4"}).encode()
    state = {
        "a.weight": torch.zeros(4, 4, dtype=E4M3),
        "a.weight_scale": torch.ones(()),
        "a.comfy_quant": torch.tensor(list(conf), dtype=torch.uint8),
    }
    path = _save(state, tmp_path / "m.safetensors")
    with pytest.raises(LorakitError, match="'a' in ComfyUI's 'nvfp4'"):
        sf.read_checkpoint(path, dequantize=True)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_modes_refuse_a_float8_file(tmp_path, monkeypatch, mode):
    """nf4/int8 run on CUDA only; pretend CUDA is there so the fp8-file refusal is reached."""
    name = "flux"
    fam = FAMILIES[name]
    folder = tmp_path / "diffusers"
    cli("tiny-model", name, folder)
    path = _save(plain(fam.to_single_file(fam.build_tiny(seed=0))), tmp_path / "f.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def read(*a, **k):
        raise AssertionError("the refusal must come from the header, before the file is read")

    monkeypatch.setattr(sf, "read_checkpoint", read)
    with pytest.raises(ConfigError) as e:
        load_model(ModelConfig(name=str(path), single_file_config=str(folder), quantize=mode))
    msg = str(e.value)
    assert str(path) in msg and f"model.quantize = '{mode}'" in msg
    assert "model.quantize = 'fp8'" in msg and "model.quantize = 'none'" in msg


def test_torch_without_float8_is_refused(tmp_path, monkeypatch):
    path = _save({"a.weight": torch.zeros(4, 4, dtype=E4M3)}, tmp_path / "m_fp8.safetensors")
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError) as e:
        sf.read_checkpoint(path, dequantize=True)
    msg = str(e.value)
    assert str(path) in msg and "no float8 dtypes" in msg and "'a.weight'" in msg
    assert "Upgrade torch" in msg


def test_quantize_fp8_stores_a_plain_file_back_bit_for_bit(tmp_path):
    """Every floating tensor of the file float8: after `enable_fp8_storage` each fp8-stored
    weight holds exactly the file's bytes (e4m3 → bf16 → e4m3 is lossless)."""
    name = "flux"
    fam = FAMILIES[name]
    folder = tmp_path / "diffusers"
    cli("tiny-model", name, folder)
    state = fam.to_single_file(fam.build_tiny(seed=0))
    all_fp8 = {k: v.to(E4M3) if v.is_floating_point() else v for k, v in state.items()}
    wide = {k: v.to(E4M3).float() if v.is_floating_point() else v for k, v in state.items()}
    model = _denoiser(name, _save(all_fp8, tmp_path / "fp8.safetensors"), folder)
    want = _denoiser(name, _save(wide, tmp_path / "wide.safetensors"), folder).state_dict()
    model.to(torch.bfloat16)
    enable_fp8_storage(model, torch.bfloat16)
    stored = {k: v for k, v in model.state_dict().items() if v.dtype == E4M3}
    assert len(stored) > 10
    for k, v in stored.items():
        assert torch.equal(v.view(torch.uint8), want[k].to(E4M3).view(torch.uint8)), k


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_cli_trains_on_an_fp8_file_with_quantize_fp8(tmp_path, name):
    fam = FAMILIES[name]
    folder = tmp_path / "diffusers"
    cli("tiny-model", name, folder)
    state = fam.to_single_file(fam.build_tiny(seed=0))
    path = _save(plain(state), tmp_path / f"{name}_fp8_e4m3fn.safetensors")
    out = tmp_path / "run"
    extra = ["--set", "model.t5_max_length=16", "--set", "train.batch_size=1"]
    cli("train", SAMPLES, *FAST, "--model", path, "--out", out, "--steps", 2,
        "--set", f"model.single_file_config='{folder}'",
        "--set", "model.quantize='fp8'", *(extra if name == "flux" else []))  # fmt: skip
    lora = load_file(str(out / "lorakit.safetensors"))
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
