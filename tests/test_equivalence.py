"""Exported files reproduce the trained model in diffusers' own loader (both formats)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, SAMPLES, cli

from lorakit import config as cfg
from lorakit.models import FAMILIES
from lorakit.train import train


def _fixed_input():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    h = torch.randn(2, 77, 32, generator=g)
    return x, t, h


@torch.no_grad()
def _unet_out(unet):
    unet.eval()
    x, t, h = _fixed_input()
    return unet(x, t, h).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("eq")
    c = cfg.resolve(
        preset="tiny-cpu",
        sets=[
            f"train.out='{out}'",
            "train.steps=8",
            "train.lr=1e-2",
            "train.optimizer='adamw'",
            "sample.every=0",
            "train.save_every=0",
            f"sample.prompts='{PROMPTS}'",
            # a conv LoRA (proj_in/proj_out are 1x1 convs in SD1.5) next to the linear ones
            "lora.target_modules=['to_q','to_k','to_v','to_out.0','proj_in','proj_out']",
        ],
    )
    return train(c, SAMPLES)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_load_lora_weights_reproduces_trained_unet(trained, fmt):
    from diffusers import StableDiffusionPipeline

    expected = _unet_out(trained.components.unet)
    base = FAMILIES["sd15"].build_tiny(seed=0)
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    before = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(trained.adapters[fmt]))
    after = _unet_out(pipe.unet)
    assert (after - expected).abs().max().item() <= 1e-5
    assert (before - expected).abs().max().item() > 1e-3, "the adapter must change the model"


def test_local_diffusers_folder_path(tmp_path):
    """`lorakit tiny-model` writes a normal diffusers folder; training from it goes through
    from_pretrained and diffusers' own pipeline loads it with the exported LoRA."""
    from diffusers import StableDiffusionPipeline

    from lorakit.export import read_adapter
    from lorakit.lora import apply_adapter

    folder = tmp_path / "tiny-sd15"
    cli("tiny-model", "sd15", folder)
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin")), "safetensors only"

    fam = FAMILIES["sd15"]
    loaded = fam.load(str(folder), revision="", variant="", allow_pickle=False)
    built = fam.build_tiny(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    out = tmp_path / "run"
    cli(
        "train", SAMPLES, "--preset", "tiny-cpu", "--model", folder, "--out", out, "--steps", 3,
        "--lr", 1e-2, "--set", "sample.every=0", "--set", "train.save_every=0",
        "--set", "train.optimizer='adamw'",
    )  # fmt: skip
    adapter, fmt = read_adapter(out / "lorakit.safetensors")
    assert fmt == "kohya" and adapter.metadata["lorakit.base_model"] == str(folder)

    ours = fam.load(str(folder), revision="", variant="", allow_pickle=False)
    apply_adapter(fam, ours, adapter)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(str(out / "lorakit.safetensors"))
    assert (_unet_out(pipe.unet) - _unet_out(ours.unet)).abs().max().item() <= 1e-5
