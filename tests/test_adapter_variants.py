"""Adapter variants (LoRA, rsLoRA, DoRA, LoHa, LoKr) and per-module rank/alpha patterns: each
trains 2 steps on tiny SD1.5, is saved, and the saved file reproduces the trained UNet."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, PROMPTS, SAMPLES, cli
from safetensors.torch import load_file

from lorakit import config as cfg
from lorakit.errors import ConfigError
from lorakit.export import read_adapter
from lorakit.lora import LoraWeights, LycorisWeights, apply_adapter
from lorakit.models import FAMILIES
from lorakit.train import train

VARIANTS = {
    "lora": ([], ["kohya", "diffusers"]),
    "rslora": (["lora.use_rslora=true"], ["kohya", "diffusers"]),
    "dora": (["lora.use_dora=true"], ["lycoris"]),
    "loha": (["lora.type='loha'"], ["lycoris"]),
    "lokr": (["lora.type='lokr'"], ["lycoris"]),
}
PATTERNS = ["lora.rank_pattern={ to_k = 2 }", "lora.alpha_pattern={ 'attn2\\.to_v' = 3.0 }"]


def _fixed_input():
    g = torch.Generator().manual_seed(1234)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 32, generator=g),
    )


@torch.no_grad()
def _unet_out(unet):
    unet.eval()
    return unet(*_fixed_input()).sample


def _train(tmp_path, variant: str):
    sets, formats = VARIANTS[variant]
    c = cfg.resolve(
        preset="tiny-cpu",
        sets=[
            f"train.out='{tmp_path / variant}'", "train.steps=2", "train.lr=2e-2",
            "train.optimizer='adamw'", "sample.every=0", "train.save_every=0",
            "train.warmup_steps=0", "eval.images=0", "eval.palette_colors=0",
            f"sample.prompts='{PROMPTS}'", f"export.formats={formats!r}", *sets, *PATTERNS,
        ],
    )  # fmt: skip
    return train(c, SAMPLES)


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory):
    return request.param, _train(tmp_path_factory.mktemp("variants"), request.param)


def _fresh_unet():
    return FAMILIES["sd15"].build_tiny(seed=0)


def test_saved_file_applied_reproduces_the_trained_unet(trained):
    variant, result = trained
    expected = _unet_out(result.components.unet)
    for fmt, path in result.adapters.items():
        adapter, read_fmt = read_adapter(path)
        assert read_fmt == fmt
        kinds = {type(w).__name__ for w in adapter.modules.values()}
        if variant in ("loha", "lokr"):
            assert kinds == {"LycorisWeights"}
            assert {w.kind for w in adapter.modules.values()} == {variant}
        else:
            assert kinds == {"LoraWeights"}
            has_mag = {w.magnitude is not None for w in adapter.modules.values()}
            assert has_mag == {variant == "dora"}
        base = _fresh_unet()
        before = _unet_out(base.unet)
        apply_adapter(FAMILIES["sd15"], base, adapter)
        after = _unet_out(base.unet)
        assert (after - expected).abs().max().item() <= 1e-5, (variant, fmt)
        assert (before - expected).abs().max().item() > 1e-4, "the adapter must change the model"


def test_rank_and_alpha_patterns_land_in_the_saved_file(trained):
    variant, result = trained
    fmt = "lycoris" if "lycoris" in result.adapters else "kohya"
    adapter, _ = read_adapter(result.adapters[fmt])
    seen_k = seen_v = 0
    for (_, path), w in adapter.modules.items():
        if path.endswith("to_k"):
            assert w.rank == 2 or (variant == "lokr" and "lokr_w2" in w.tensors), path
            seen_k += 1
        if path.endswith("attn2.to_v"):
            seen_v += 1
            scale = w.alpha / w.rank
            want = 3.0 / (math.sqrt(4) if variant == "rslora" else 4)
            if not (variant == "lokr" and "lokr_w2" in w.tensors):  # scale baked into w2
                assert scale == pytest.approx(want), (path, w.alpha, w.rank)
    assert seen_k and seen_v
    if variant == "rslora":  # default modules: alpha' = alpha·√r so alpha'/r = alpha/√r
        q = next(w for (c, p), w in adapter.modules.items() if p.endswith("attn1.to_q"))
        assert q.alpha == pytest.approx(8.0 * math.sqrt(4))


def test_lycoris_file_keys(trained):
    variant, result = trained
    if "lycoris" not in result.adapters:
        pytest.skip("plain LoRA: kohya format")
    keys = list(load_file(result.adapters["lycoris"]))
    suffixes = {k.split(".", 1)[1] for k in keys}
    want = {
        "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    }.get(variant)
    if want:
        assert suffixes == want
    else:
        assert "alpha" in suffixes and suffixes <= {
            "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"
        }  # fmt: skip
    assert all(k.startswith("lora_unet_") for k in keys)


# kohya files with per-module alphas are not checked here: diffusers 0.42's SD1.5 kohya
# converter builds alpha_pattern keys that match no module (…processor.to_v_lora.down.weight)
# and loads them at the default strength — a diffusers limitation, see the report.
@pytest.mark.parametrize("fmt", ["diffusers"])
def test_diffusers_loads_lora_and_rslora(trained, fmt):
    variant, result = trained
    if variant not in ("lora", "rslora"):
        pytest.skip("diffusers' SD1.5 loader drops kohya dora_scale and has no LoHa/LoKr")
    from diffusers import StableDiffusionPipeline

    expected = _unet_out(result.components.unet)
    b = _fresh_unet()
    pipe = StableDiffusionPipeline(
        vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
        scheduler=b.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(str(result.adapters[fmt]))
    assert (_unet_out(pipe.unet) - expected).abs().max().item() <= 1e-5


def test_cli_trains_loha_with_a_rank_pattern(tmp_path):
    out = tmp_path / "loha"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 2, "--set", "lora.type='loha'",
        "--set", "export.formats=['lycoris']",
        "--set", "lora.rank_pattern={ to_q = 2 }")  # fmt: skip
    tensors = load_file(out / "lorakit.lycoris.safetensors")  # the lycoris file's own name
    q = [v for k, v in tensors.items() if k.endswith("to_q.hada_w1_b")]
    assert q and all(t.shape[0] == 2 for t in q)
    assert (out / "config.toml").read_text().count("rank_pattern") == 1
    assert isinstance(read_adapter(out / "lorakit.lycoris.safetensors")[0].modules.popitem()[1],
                      LycorisWeights)  # fmt: skip


@pytest.mark.parametrize(
    "sets, words",
    [
        (["lora.type='loha'"], "export.formats"),
        (["lora.use_dora=true", "export.formats=['diffusers']"], "lycoris"),
        (["lora.type='lokr'", "lora.use_dora=true", "export.formats=['lycoris']"], "use_dora"),
        (["lora.rank_pattern={ '(' = 2 }"], "regular"),
        (["lora.rank_pattern={ to_q = 'x' }"], "table mapping names to an integer"),
    ],
)
def test_bad_variant_settings_are_config_errors(sets, words):
    with pytest.raises(ConfigError, match=words):
        cfg.resolve(preset="tiny-cpu", sets=sets)


def test_lora_weights_default_has_no_magnitude():
    w = LoraWeights(torch.zeros(2, 3), torch.zeros(4, 2), 2.0)
    assert w.magnitude is None
