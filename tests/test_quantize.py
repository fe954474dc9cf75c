"""Quantized frozen base (QLoRA), every family but SD1.5: clear errors where it cannot run, and a
CUDA run."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit.errors import ConfigError
from lorakit.export import read_adapter
from lorakit.models import FAMILIES
from lorakit.models.quantize import bnb_config, check_quantize, quantized_kwargs

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: quantizing allowed")


@no_cuda
def test_quantize_on_cpu_fails_up_front_with_a_config_error(tmp_path):
    out = tmp_path / "q"
    r = cli(
        "train", SAMPLES, *FAST, "--model", "tiny:flux", "--out", out, "--steps", 1,
        "--set", "model.quantize='nf4'", expect=None,
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "model.quantize" in r.output and "CUDA" in r.output
    assert "Traceback" not in r.output
    assert not list(out.glob("*.safetensors"))


def test_quantize_is_allowed_for_every_family_on_cuda_only():
    assert all(f.quantizable for f in FAMILIES.values())
    check_quantize("none", FAMILIES["sd15"])
    if not torch.cuda.is_available():
        for name in ("flux", "sdxl", "sd15"):
            with pytest.raises(ConfigError, match="CUDA"):
                check_quantize("int8", FAMILIES[name])


def test_nf4_on_a_conv_heavy_unet_says_fp8_is_smaller():
    """bitsandbytes leaves convolutions alone: SD1.5's UNet keeps 0.77 of its bf16 bytes under
    NF4 (planner rules, real architecture), fp8 0.50; SDXL's (87% Linear) is smaller under NF4,
    so it gets no advice."""
    from lorakit.models.quantize import bnb_advice

    text = bnb_advice("nf4", FAMILIES["sd15"])
    assert "0.77" in text and "model.quantize = 'fp8'" in text and "0.50" in text
    assert bnb_advice("int8", FAMILIES["sd15"])  # int8: 0.84 of bf16, above fp8 too
    assert bnb_advice("fp8", FAMILIES["sd15"]) == bnb_advice("none", FAMILIES["sd15"]) == ""
    assert bnb_advice("nf4", FAMILIES["sdxl"]) == ""  # the DiTs are Linear-only: smaller still


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the load would quantize")
def test_sdxl_folder_load_hands_nf4_to_diffusers_quantizer(tmp_path):
    """SDXL's UNet goes through diffusers' bitsandbytes quantizer when loaded with nf4 (the
    streamed read steps aside for a quantization config); without a GPU that quantizer stops
    with its own error, which is how far the CPU can check it. `pytest -m gpu` runs it."""
    fam = FAMILIES["sdxl"]
    fam.save(fam.build_tiny(seed=0), str(tmp_path / "m"))
    kw = dict(revision="", variant="", allow_pickle=False)
    with pytest.raises(RuntimeError, match="GPU"):
        fam.load(str(tmp_path / "m"), quantize="nf4", **kw)
    assert not getattr(fam.load(str(tmp_path / "m"), **kw).unet, "is_quantized", False)


def test_bitsandbytes_configs():
    nf4 = bnb_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("int8").load_in_8bit
    assert quantized_kwargs("none") == {}
    assert quantized_kwargs("nf4")["torch_dtype"] == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl", "sd15"])
def test_qlora_nf4_trains_two_steps_on_cuda(tmp_path, family):
    out = tmp_path / "q"
    cli(
        "train", SAMPLES, *FAST, "--model", f"tiny:{family}", "--out", out, "--steps", 2,
        "--lr", 1e-2, "--set", "model.quantize='nf4'", "--set", "train.device='cuda'",
        "--set", "train.mixed_precision='bf16'", "--set", "model.t5_max_length=16",
        "--set", "train.optimizer='adamw8bit'",
    )  # fmt: skip
    adapter, _ = read_adapter(out / "diffusers" / "pytorch_lora_weights.safetensors")
    assert any(w.up.abs().sum() > 0 for w in adapter.modules.values()), "LoRA was trained"


@pytest.mark.gpu
def test_quantized_transformer_is_4bit():
    from lorakit.config import ModelConfig
    from lorakit.models import FAMILIES

    fam = FAMILIES["flux"]
    comps = fam.load_configured(ModelConfig(name="tiny:flux", quantize="nf4"), "tiny")
    import bitsandbytes as bnb

    assert getattr(comps.transformer, "is_quantized", False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in comps.transformer.modules())
