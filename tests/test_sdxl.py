"""The SDXL family: fixed module tables vs the real architecture, conditioning, loss, diffusers
interop (load_lora_weights of both export formats), local folders and the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit.config import LoraConfigSection, ModelConfig, TrainConfig
from lorakit.export import EXPORTERS, write_adapter
from lorakit.lora import extract_adapter, inject_lora, lora_layers
from lorakit.models import FAMILIES, resolve_family, text_encoders
from lorakit.models import sdxl as sdxl_mod

FAM = FAMILIES["sdxl"]
LINEAR_CONV = (torch.nn.Linear, torch.nn.Conv2d)


def _targetable(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, LINEAR_CONV)}


@pytest.fixture(scope="module")
def tiny():
    return FAM.build_tiny(seed=0)


def test_unet_table_equals_the_real_sdxl_unet():
    """The fixed table is every Linear/Conv of the real SDXL base UNet (built on the meta device
    from the real config), and nothing else."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in sdxl_mod.SDXL_UNET.items() if not k.startswith("_")}
    with init_empty_weights():
        real = UNet2DConditionModel(**config)
    assert _targetable(real) == FAM.known_modules("unet")
    assert len(FAM.known_modules("unet")) > 700


@pytest.mark.parametrize(
    ("component", "config_name", "cls_name"),
    [
        ("text_encoder", "CLIP_L_TEXT", "CLIPTextModel"),
        ("text_encoder_2", "OPENCLIP_BIGG_TEXT", "CLIPTextModelWithProjection"),
    ],
)
def test_text_encoder_tables_match_the_real_encoders(component, config_name, cls_name):
    import transformers
    from accelerate import init_empty_weights

    from lorakit.lora import canonical_name

    target = next(t for t in FAM.targets if t.component == component)
    config = transformers.CLIPTextConfig(**getattr(text_encoders, config_name))
    with init_empty_weights():
        real = getattr(transformers, cls_name)(config)
    names = {
        canonical_name(target, n)
        for n in _targetable(real)
        if n.rsplit(".", 2)[-2:][0] in ("self_attn", "mlp")
    }
    assert names == FAM.known_modules(component)
    assert len(names) == 6 * config.num_hidden_layers


def test_tiny_is_a_strict_subset_with_sdxl_shape_rules(tiny):
    table = FAM.known_modules("unet")
    names = _targetable(tiny.unet)
    assert names < table
    assert {"add_embedding.linear_1", "down_blocks.0.resnets.0.conv1"} <= names
    assert not any(n.startswith("down_blocks.0.attentions") for n in names), "SDXL level 0"
    cfg = tiny.unet.config
    te1, te2 = tiny.text_encoder.config, tiny.text_encoder_2.config
    assert cfg.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert (
        cfg.projection_class_embeddings_input_dim
        == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    )
    for comp in ("text_encoder", "text_encoder_2"):
        enc = getattr(tiny, comp)
        assert not enc.training and enc.config.dropout == 0.0
    # seeded: a second build is identical
    again = FAM.build_tiny(seed=0)
    a, b = tiny.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_encoding_matches_the_diffusers_pipeline(tiny):
    prompts = ["tdwl coffee cup", "a sun over the sea"]
    cond = FAM.encode_prompts(tiny, prompts)
    d1, d2 = tiny.text_encoder.config.hidden_size, tiny.text_encoder_2.config.hidden_size
    assert cond["encoder_hidden_states"].shape == (2, 77, d1 + d2)
    assert cond["text_embeds"].shape == (2, tiny.text_encoder_2.config.projection_dim)
    embeds, _, pooled, _ = FAM.pipeline(tiny).encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["text_embeds"], pooled)
    assert not cond["text_embeds"].requires_grad
    # the training variant keeps autograd alive (for text-encoder LoRA)
    tiny.text_encoder_2.text_projection.weight.requires_grad_(True)
    try:
        assert FAM.encode_prompts_train(tiny, prompts)["text_embeds"].requires_grad
    finally:
        tiny.text_encoder_2.text_projection.weight.requires_grad_(False)


@pytest.mark.parametrize(
    ("original", "crop", "target"),
    [((1024, 768), (0, 0), (1024, 1024)), ((333, 500), (12, 40), (256, 384))],
)
def test_add_time_ids_from_crop_records(tiny, original, crop, target):
    ids = FAM.image_conditioning(tiny, original, crop, target)["time_ids"]
    expected = torch.tensor([[original[0], original[1], crop[0], crop[1], target[0], target[1]]])
    assert ids.shape == (1, 6) and ids.dtype == torch.float32
    assert torch.equal(ids, expected.float())
    pipe = FAM.pipeline(tiny)
    theirs = pipe._get_add_time_ids(
        original,
        crop,
        target,
        dtype=torch.float32,
        text_encoder_projection_dim=tiny.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ids, theirs)


def _batch(tiny, b=2):
    g = torch.Generator().manual_seed(7)
    cond = FAM.encode_prompts(tiny, ["tdwl coffee cup", "a sun"][:b])
    cond["time_ids"] = torch.cat(
        [
            FAM.image_conditioning(tiny, (64 + 8 * i, 64), (i, 0), (64, 64))["time_ids"]
            for i in range(b)
        ]
    )
    return torch.randn(b, 4, 8, 8, generator=g), cond


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_targets_and_min_snr(prediction):
    from diffusers import EulerDiscreteScheduler

    comps = FAM.build_tiny(seed=0)
    comps.scheduler = EulerDiscreteScheduler.from_config(
        comps.scheduler.config, prediction_type=prediction
    )
    latents, cond = _batch(comps)
    train = TrainConfig(min_snr_gamma=5.0, noise_offset=0.1)
    noise, t = FAM.noise_and_timesteps(comps, latents, torch.Generator().manual_seed(1), train)
    loss = FAM.loss(comps, comps.unet, latents, cond, noise, t, train)

    a = comps.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    with torch.no_grad():
        pred = FAM.predict(comps.unet, noisy, t, cond)
    snr = (a / (1 - a)).flatten()
    w = snr.clamp(max=5.0) / (snr if prediction == "epsilon" else snr + 1)
    expected = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_predict_without_time_ids_explains(tiny):
    latents, cond = _batch(tiny)
    del cond["time_ids"]
    with pytest.raises(Exception, match="image_conditioning"):
        FAM.predict(tiny.unet, latents, torch.tensor([1, 2]), cond)


@torch.no_grad()
def _unet_out(unet, tiny_for_cond):
    latents, cond = _batch(tiny_for_cond)
    return FAM.predict(unet.eval(), latents, torch.tensor([10, 700]), cond)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A LoRA on attention projections AND proj_in/proj_out (linear in SDXL), alpha != rank,
    with random non-zero weights (as after training), written in both formats."""
    comps = FAM.build_tiny(seed=0)
    cfg = LoraConfigSection(
        rank=4,
        alpha=8.0,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
    )
    inject_lora(comps.unet, cfg, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(comps.unet):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    adapter = extract_adapter(FAM, comps, {"ss_steps": "1"})
    out = tmp_path_factory.mktemp("sdxl-adapter")
    files = {
        fmt: write_adapter(
            adapter, fmt, EXPORTERS[fmt].default_path(out, "brand"), naming="diffusers"
        )
        for fmt in ("kohya", "diffusers")
    }
    return comps, adapter, files


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_sdxl_pipeline_loads_both_formats(trained_adapter, fmt):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    comps, _, files = trained_adapter
    expected = _unet_out(comps.unet, comps)
    base = FAM.build_tiny(seed=0)
    pipe = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
        scheduler=base.scheduler,
    )  # fmt: skip
    before = _unet_out(pipe.unet, base)
    pipe.load_lora_weights(str(files[fmt]))
    after = _unet_out(pipe.unet, base)
    assert (after - expected).abs().max().item() <= 1e-5
    assert (before - expected).abs().max().item() > 1e-3, "the adapter must change the model"
    with safe_open(str(files[fmt]), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in keys


def test_local_diffusers_folder_gives_identical_weights(tmp_path, tiny):
    folder = tmp_path / "tiny-sdxl"
    cli("tiny-model", "sdxl", folder)
    assert not list(folder.rglob("*.bin")), "safetensors only"
    fam, kind = resolve_family(ModelConfig(name=str(folder)))
    assert (fam.name, kind) == ("sdxl", "local")
    loaded = fam.load(str(folder), revision="", variant="", allow_pickle=False)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(tiny, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    # from_pretrained picks another attention kernel than the constructor: equal up to fp32 noise
    a, b = FAM.encode_prompts(loaded, ["a sun"]), FAM.encode_prompts(tiny, ["a sun"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_pipeline_renders_a_64px_image(tiny):
    img = FAM.pipeline(tiny, "euler")(
        "tdwl coffee cup", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 64, 64, 3)


@pytest.mark.slow  # the family contract test trains tiny:sdxl through the CLI already
def test_cli_trains_tiny_sdxl(tmp_path):
    out = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--model", "tiny:sdxl", "--out", out, "--steps", 3,
        "--lr", 5e-3, "--set", "sample.every=3")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))
    # the trained UNet is reproduced by diffusers' SDXL pipeline from the kohya file
    from lorakit.export import read_adapter

    adapter, _ = read_adapter(out / "lorakit.safetensors")
    assert adapter.family == "sdxl" and any(c == "unet" for c, _ in adapter.modules)
