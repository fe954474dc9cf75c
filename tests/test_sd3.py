"""SD3/3.5 family: module tables, latents, prompt encoding (with and without T5), diffusers round
trip of both export formats, local-folder loading and a real CLI training run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit.config import LoraConfigSection, ModelConfig, TrainConfig
from lorakit.export import read_adapter, write_adapter
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import FAMILIES
from lorakit.models import sd3 as s3
from lorakit.models.flow import sample_sigmas

FAM = FAMILIES["sd3"]


def _linear_names(module) -> set[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return {n for n, m in module.named_modules() if isinstance(m, kinds)}


def test_module_table_is_the_union_of_large_and_medium():
    table = FAM.known_modules("transformer")
    assert "transformer_blocks.37.attn.to_q" in table  # large: 38 blocks
    assert "transformer_blocks.12.attn2.to_q" in table  # medium: dual attention in 0-12
    assert "transformer_blocks.13.attn2.to_q" not in table
    assert "transformer_blocks.37.attn.to_add_out" not in table  # last block: context_pre_only
    assert "transformer_blocks.23.attn.to_add_out" in table  # (not last in large)
    assert "transformer_blocks.38.attn.to_q" not in table


def test_module_table_generator_matches_the_real_structure():
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    with init_empty_weights():  # real SD3.5 widths; 4 blocks keep it fast (names do not depend)
        real = SD3Transformer2DModel(
            attention_head_dim=64, caption_projection_dim=1536, in_channels=16,
            joint_attention_dim=4096, num_attention_heads=24, num_layers=4, out_channels=16,
            patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=16, qk_norm="rms_norm",
            sample_size=16, dual_attention_layers=(0, 1),
        )  # fmt: skip
    assert _linear_names(real) == s3.mmdit_modules(4, (0, 1))


@pytest.mark.slow
def test_module_tables_equal_the_full_sd35_architectures():
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    common = dict(
        attention_head_dim=64,
        in_channels=16,
        joint_attention_dim=4096,
        out_channels=16,
        patch_size=2,
        pooled_projection_dim=2048,
        qk_norm="rms_norm",
        sample_size=128,
    )
    with init_empty_weights():
        large = SD3Transformer2DModel(
            **common,
            caption_projection_dim=2432,
            num_layers=38,
            num_attention_heads=38,
            pos_embed_max_size=192,
        )
        medium = SD3Transformer2DModel(**common, caption_projection_dim=1536, num_layers=24,
                                       num_attention_heads=24, pos_embed_max_size=384,
                                       dual_attention_layers=tuple(range(13)))  # fmt: skip
    assert _linear_names(large) | _linear_names(medium) == set(FAM.known_modules("transformer"))


def test_tiny_build_follows_the_shape_rules_and_is_a_strict_subset():
    c = FAM.build_tiny(0)
    cfg = c.transformer.config
    assert cfg.joint_attention_dim == c.text_encoder_3.config.d_model
    proj = c.text_encoder.config.projection_dim + c.text_encoder_2.config.projection_dim
    assert cfg.pooled_projection_dim == proj
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim
    assert _linear_names(c.transformer) < FAM.known_modules("transformer")
    assert c.vae.config.latent_channels == 16 and c.vae.config.shift_factor == 0.0609
    assert not any(m.training for m in (c.transformer, c.text_encoder_3, c.vae))
    d = FAM.build_tiny(0)
    sa, sb = c.transformer.state_dict(), d.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_latents_use_shift_and_scale():
    c = FAM.build_tiny(0)
    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = FAM.encode_images(c, px)
    assert torch.allclose(lat, (c.vae.encode(px).latent_dist.mean - 0.0609) * 1.5305, atol=1e-6)


def test_prompt_encoding_three_encoders_and_dropped_t5():
    c = FAM.load_configured(ModelConfig(name="tiny:sd3", t5_max_length=24), "tiny")
    cond = FAM.encode_prompts(c, ["tdwl coffee cup", "a wave"])
    h, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
    assert h.shape == (2, 77 + 24, s3.TINY_T5_DIM) and pooled.shape == (2, 64)
    # CLIP-L and CLIP-G projected pooled outputs side by side
    ids = c.tokenizer(["tdwl coffee cup"], padding="max_length", max_length=77,
                      truncation=True, return_tensors="pt").input_ids  # fmt: skip
    assert torch.allclose(pooled[:1, :32], c.text_encoder(ids).text_embeds, atol=1e-6)
    assert h[:, 77:].abs().sum() > 0

    no_t5 = FAM.load_configured(
        ModelConfig(name="tiny:sd3", drop_t5=True, t5_max_length=24), "tiny"
    )
    assert no_t5.text_encoder_3 is None and "text_encoder_3" not in FAM.frozen_modules(no_t5)
    cond2 = FAM.encode_prompts(no_t5, ["tdwl coffee cup", "a wave"])
    assert cond2["encoder_hidden_states"].shape == h.shape
    assert cond2["encoder_hidden_states"][:, 77:].abs().sum() == 0, "T5 tokens are zeros"
    assert torch.equal(cond2["encoder_hidden_states"][:, :77], h[:, :77])


def test_noise_and_timesteps_shift_uses_the_scheduler_shift():
    c = FAM.build_tiny(0)
    lat = torch.zeros(4, 16, 8, 8)
    _, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(3), TrainConfig())
    gen = torch.Generator().manual_seed(3)
    torch.randn(lat.shape, generator=gen)
    assert torch.equal(sig, sample_sigmas(4, gen, "shift", 0.0, 1.0, math.log(3.0)))
    t = TrainConfig(flow_shift=1.0, timestep_sampling="uniform")
    _, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(3), t)
    assert sig.min() > 0 and sig.max() < 1


def _perturbed_adapter(comps, seed=0):
    lora = LoraConfigSection(rank=4, alpha=8.0, target_modules=list(FAM.default_targets))
    params = inject_lora(comps.transformer, lora, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return extract_adapter(FAM, comps, {"lorakit.family": "sd3"})


def test_exported_files_reload_in_diffusers_and_reproduce_the_transformer(tmp_path):
    trained = FAM.build_tiny(0)
    adapter = _perturbed_adapter(trained)
    assert any(".attn2." in p for _, p in adapter.modules)
    g = torch.Generator().manual_seed(1234)
    cond = FAM.encode_prompts(trained, ["tdwl coffee cup", "a wave"])
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        expected = FAM.predict(trained.transformer, x, t, cond)
    paths = {
        f: write_adapter(adapter, f, tmp_path / f / "a.safetensors") for f in ("kohya", "diffusers")
    }
    for fmt, path in paths.items():
        back, got = read_adapter(path)
        assert got == fmt and back.modules.keys() == adapter.modules.keys()
        assert all(
            torch.equal(back.modules[k].delta(), w.delta()) for k, w in adapter.modules.items()
        )
        assert back.metadata["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
        assert back.metadata["ss_base_model_version"] == "5-large"
    pipe = FAM.pipeline(FAM.build_tiny(0))
    with torch.no_grad():
        before = FAM.predict(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(paths["diffusers"]))
        after = FAM.predict(pipe.transformer, x, t, cond)
    assert (after - expected).abs().max().item() <= 1e-5
    assert (before - expected).abs().max().item() > 1e-3, "the adapter must change the model"


def test_local_folder_loads_identical_weights(tmp_path):
    folder = tmp_path / "tiny-sd3"
    cli("tiny-model", "sd3", folder)
    assert not list(folder.rglob("*.bin"))
    loaded = FAM.load(str(folder), revision="", variant="", allow_pickle=False)
    built = FAM.build_tiny(0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ea, eb = FAM.encode_prompts(loaded, ["tdwl cup"]), FAM.encode_prompts(built, ["tdwl cup"])
    assert all(torch.allclose(ea[k], eb[k], atol=1e-6) for k in ea)  # same tokens, same weights
    no_t5 = FAM.load(str(folder), revision="", variant="", allow_pickle=False, drop_t5=True)
    assert no_t5.text_encoder_3 is None


def test_cli_trains_tiny_sd3_and_writes_grids_and_both_formats(tmp_path):
    out = tmp_path / "run"
    cli(
        "train", SAMPLES, *FAST, "--model", "tiny:sd3", "--out", out, "--steps", 2,
        "--set", "sample.every=2", "--set", "sample.seeds=[0]", "--set", "train.batch_size=1",
        "--set", "model.drop_t5=true", "--set", "train.loss_weighting='cosmap'",
    )  # fmt: skip
    assert len(list((out / "samples").glob("step-*.png"))) == 2
    kohya, fmt = read_adapter(out / "lorakit.safetensors")
    diff, fmt2 = read_adapter(out / "diffusers" / "pytorch_lora_weights.safetensors")
    assert (fmt, fmt2) == ("kohya", "diffusers") and kohya.family == "sd3"
    assert kohya.modules.keys() == diff.modules.keys()


def test_sd35_preset_loads_and_its_cpu_settings_train_tiny_sd3(tmp_path):
    from lorakit import config as cfg
    from lorakit.train import train

    c = cfg.resolve(preset="sd35-16gb")
    assert c.model.quantize == "nf4" and c.model.drop_t5 and c.train.mixed_precision == "bf16"
    c = cfg.resolve(
        preset="sd35-16gb",
        sets=[
            "model.name='tiny:sd3'", "model.quantize='none'", "model.t5_max_length=16",
            "data.resolution=64", "train.steps=2", "train.device='cpu'", "sample.every=0",
            "train.mixed_precision='no'",
            "train.save_every=0", "train.optimizer_fallback=true",
            f"train.out='{tmp_path / 'run'}'",
        ],
    )  # fmt: skip
    result = train(c, SAMPLES)
    assert set(result.adapters) == {"kohya", "diffusers"}
    assert result.components.text_encoder_3 is None
