"""Live progress on a terminal; model-name resolution errors; GPU/slow checks (marked)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from rich.console import Console

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.models import resolve_family
from lorakit.progress import Reporter


def test_live_progress_bar_on_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140)
    with Reporter(10, console=console) as rep:
        assert rep.live
        rep.update(5, 0.1234, 1e-4, epoch=1)
        rep.last_checkpoint = "runs/x/checkpoints/step-000010"
        rep.last_grid = "runs/x/samples/step-000010.png"
        rep.update(10, 0.0987, 5e-5, epoch=2)
    text = buf.getvalue()
    assert "10/10" in text and "0.0987" in text and "5.00e-05" in text and "it/s" in text
    assert "epoch 2" in text and "GiB" in text
    assert "step-000010" in text and "step-000010.png" in text


def test_plain_reporter_prints_eta_epoch_and_memory(capsys):
    with Reporter(4, console=Console(file=io.StringIO()), live=False) as rep:
        rep.update(2, 0.5, 1e-3, epoch=3)
    line = capsys.readouterr().out
    assert "step 2/4" in line and "epoch 3" in line and "eta" in line and "peak mem" in line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "No base model"),
        ("tiny:sdxl9", "tiny:sd15"),
        ("not a model!", "neither an existing folder"),
    ],
)
def test_model_name_errors(name, message):
    with pytest.raises(LorakitError, match=message):
        resolve_family(ModelConfig(name=name))


def test_local_folder_without_index_and_foreign_pipeline(tmp_path):
    with pytest.raises(LorakitError, match=r"model_index\.json"):
        resolve_family(ModelConfig(name=str(tmp_path)))
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(LorakitError, match="KandinskyPipeline"):
        resolve_family(ModelConfig(name=str(tmp_path)))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    fam, kind = resolve_family(ModelConfig(name=str(tmp_path)))
    assert (fam.name, kind) == ("sd15", "local")


def test_unreachable_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    # Offline here: the hub path must fail with a message, not a traceback, and write nothing.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("train", SAMPLES, *FAST, "--model", "lorakit-test/does-not-exist",
            "--out", tmp_path / "o", expect=1)  # fmt: skip
    assert "lorakit-test/does-not-exist" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision_8bit(tmp_path, precision):
    out = tmp_path / "r"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 4, "--set", "train.device='cuda'",
        "--set", f"train.mixed_precision='{precision}'", "--set", "train.optimizer='adamw8bit'",
        "--set", "train.optimizer_fallback=false", "--set", "sample.every=2")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()
    assert len(list((out / "samples").glob("*.png"))) == 3


@pytest.mark.slow
def test_real_sd15_unet_architecture_lora_step_on_cpu():
    """The full-size SD1.5 UNet (random weights): LoRA injects into the real module names and
    every one of them is in the fixed export table."""
    from diffusers import UNet2DConditionModel

    from lorakit.config import LoraConfigSection
    from lorakit.lora import inject_lora, lora_layers
    from lorakit.models import FAMILIES

    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
    )
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
               "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut"]  # fmt: skip
    inject_lora(unet, LoraConfigSection(rank=4, alpha=4.0, target_modules=targets), seed=0)
    names = {n for n, _ in lora_layers(unet)}
    table = FAMILIES["sd15"].known_modules("unet")
    assert names <= table
    attention = {n for n in table if "attentions" in n}
    assert attention <= names, "the table lists no attention module the real UNet lacks"
    out = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 768)).sample
    out.float().pow(2).mean().backward()
