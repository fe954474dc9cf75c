"""FLUX.1 family: packing, ids, module tables, diffusers round trip of both export formats,
local-folder loading, schnell (no guidance) and a real CLI training run."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit.config import LoraConfigSection, TrainConfig
from lorakit.export import read_adapter, write_adapter
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import FAMILIES
from lorakit.models import flux as fx
from lorakit.models.flow import flux_mu, sample_sigmas

FAM = FAMILIES["flux"]


def _linear_names(module) -> set[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return {n for n, m in module.named_modules() if isinstance(m, kinds)}


def test_pack_unpack_round_trip_is_exact_and_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = fx.pack_latents(x)
    assert packed.shape == (2, 3 * 5, 64)
    assert torch.equal(fx.unpack_latents(packed, 6, 10), x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    # diffusers unpacks from pixel sizes: latent 6×10 = 48×80 px at vae_scale_factor 8
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), x)


def test_position_ids():
    from diffusers import FluxPipeline

    ids = fx.image_ids(6, 10)
    assert ids.shape == (15, 3)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    assert ids[:, 0].abs().sum() == 0 and ids[-1].tolist() == [0.0, 2.0, 4.0]
    assert torch.equal(fx.text_ids(7), torch.zeros(7, 3))


def test_module_table_matches_real_structure_and_tiny_is_a_strict_subset():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    table = FAM.known_modules("transformer")
    assert len([n for n in table if n.endswith("norm1.linear")]) == 19
    assert len([n for n in table if n.endswith(".proj_mlp")]) == 38
    assert "single_transformer_blocks.37.attn.to_q" in table
    assert "single_transformer_blocks.0.attn.to_out.0" not in table  # single blocks: proj_out
    with init_empty_weights():  # real widths do not change names; 2+3 blocks keep this fast
        real = FluxTransformer2DModel(
            num_layers=2, num_single_layers=3, attention_head_dim=128, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    assert _linear_names(real) == fx.flux_modules(2, 3)
    tiny = FAM.build_tiny(0)
    names = _linear_names(tiny.transformer)
    assert names < table
    te = {n if n.startswith("text_model.") else "text_model." + n
          for n in _linear_names(tiny.text_encoder)}  # fmt: skip
    assert {n for n in te if ".layers." in n} < FAM.known_modules("text_encoder")


@pytest.mark.slow
def test_module_table_equals_the_full_flux1_architecture():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        real = FluxTransformer2DModel(
            attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
            num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
            pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    assert _linear_names(real) == set(FAM.known_modules("transformer"))


def test_tiny_build_is_deterministic_frozen_and_eval():
    a, b = FAM.build_tiny(0), FAM.build_tiny(0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not getattr(a, name).training
    assert a.transformer.config.in_channels == 4 * a.vae.config.latent_channels
    assert sum(a.transformer.config.axes_dims_rope) == a.transformer.config.attention_head_dim
    assert a.vae.config.shift_factor and a.vae.config.latent_channels == 16
    ids = a.tokenizer_2(["coffee cup"], padding="max_length", max_length=8).input_ids[0]
    assert ids[2] == 1 and ids[3:] == [0] * 5, "T5: words, </s>, then <pad>"


def test_latents_use_shift_and_scale():
    c = FAM.build_tiny(0)
    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = FAM.encode_images(c, px)
    mean = c.vae.encode(px).latent_dist.mean
    assert lat.shape == (1, 16, 8, 8)
    assert torch.allclose(lat, (mean - 0.1159) * 0.3611, atol=1e-6)


def test_noise_and_timesteps_use_the_resolution_dependent_shift():
    c = FAM.build_tiny(0)
    lat = torch.zeros(3, 16, 128, 128)  # 1024 px → 4096 tokens → μ = 1.15
    noise, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(9), TrainConfig())
    gen = torch.Generator().manual_seed(9)
    torch.randn(lat.shape, generator=gen)
    assert torch.equal(sig, sample_sigmas(3, gen, "shift", 0.0, 1.0, flux_mu(4096)))
    assert noise.shape == lat.shape


def _perturbed_adapter(fam, comps, seed=0):
    lora = LoraConfigSection(rank=4, alpha=8.0, target_modules=[*fam.default_targets, "proj_mlp"])
    params = inject_lora(comps.transformer, lora, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return extract_adapter(fam, comps, {"lorakit.family": fam.name})


def _fixed_inputs(comps, b=2):
    g = torch.Generator().manual_seed(1234)
    cond = FAM.encode_prompts(comps, ["tdwl coffee cup", "a teal wave"][:b])
    x = torch.randn(b, 16, 8, 8, generator=g)
    return x, torch.tensor([0.3, 0.8][:b]), dict(cond, guidance=torch.full((b,), 3.5))


def test_exported_files_reload_in_diffusers_and_reproduce_the_transformer(tmp_path):
    trained = FAM.build_tiny(0)
    adapter = _perturbed_adapter(FAM, trained)
    x, t, cond = _fixed_inputs(trained)
    with torch.no_grad():
        expected = FAM.predict(trained.transformer, x, t, cond)
    paths = {
        fmt: write_adapter(adapter, fmt, tmp_path / fmt / "a.safetensors")
        for fmt in ("kohya", "diffusers")
    }
    # both files read back to the same adapter
    for fmt, path in paths.items():
        back, got_fmt = read_adapter(path)
        assert got_fmt == fmt and back.family == "flux"
        assert back.modules.keys() == adapter.modules.keys()
        for k, w in adapter.modules.items():
            assert torch.equal(back.modules[k].delta(), w.delta()), (fmt, k)
    from safetensors import safe_open

    with safe_open(str(paths["kohya"]), "pt") as f:
        meta = f.metadata()
        assert "lora_unet_single_blocks_0_linear1.alpha" in f.keys()  # BFL names, fused
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"

    pipe = FAM.pipeline(FAM.build_tiny(0))
    with torch.no_grad():
        before = FAM.predict(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(paths["diffusers"]))
        after = FAM.predict(pipe.transformer, x, t, cond)
    assert (after - expected).abs().max().item() <= 1e-5
    assert (before - expected).abs().max().item() > 1e-3, "the adapter must change the model"


def test_schnell_has_no_guidance_embedding_and_still_trains_a_loss():
    c = fx.tiny_flux(0, guidance_embeds=False)
    assert Flux_modelspec(c) == "flux-1-schnell/lora"
    assert _linear_names(c.transformer) < FAM.known_modules("transformer")
    assert not any("guidance_embedder" in n for n in _linear_names(c.transformer))
    x, t, cond = _fixed_inputs(c)
    loss = FAM.loss(c, c.transformer, x, cond, torch.randn_like(x), t, TrainConfig())
    assert torch.isfinite(loss)
    # dev: the guidance value reaches the model
    d = FAM.build_tiny(0)
    with torch.no_grad():
        a = FAM.predict(d.transformer, x, t, dict(cond, guidance=torch.ones(2)))
        b = FAM.predict(d.transformer, x, t, dict(cond, guidance=torch.full((2,), 4.0)))
    assert (a - b).abs().max() > 1e-4


def Flux_modelspec(c) -> str:
    return FAM.modelspec_for(c)


def test_t5_max_length_option_sets_the_sequence_length():
    from lorakit.config import ModelConfig

    c = FAM.load_configured(ModelConfig(name="tiny:flux", t5_max_length=32), "tiny")
    cond = FAM.encode_prompts(c, ["tdwl"])
    assert cond["encoder_hidden_states"].shape == (1, 32, fx.TINY_FLUX_T5_DIM)
    assert cond["pooled_projections"].shape == (1, 32)


def test_local_folder_loads_identical_weights(tmp_path):
    folder = tmp_path / "tiny-flux"
    cli("tiny-model", "flux", folder)
    assert (folder / "model_index.json").is_file() and not list(folder.rglob("*.bin"))
    loaded = FAM.load(str(folder), revision="", variant="", allow_pickle=False)
    built = FAM.build_tiny(0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    prompts = ["tdwl coffee cup"]
    ea, eb = FAM.encode_prompts(loaded, prompts), FAM.encode_prompts(built, prompts)
    assert all(torch.allclose(ea[k], eb[k], atol=1e-6) for k in ea), "tokenizers round-trip"


def test_cli_trains_tiny_flux_and_writes_grids_and_both_formats(tmp_path, monkeypatch):
    import lorakit.train as tr
    from lorakit import sampling

    seen = []  # (spec, embeddings) of every preview grid's prompt encoding

    def spy_encode(pipe, spec):
        embeds = sampling.encode_prompt_rows(pipe, spec)
        seen.append((spec, embeds))
        return embeds

    monkeypatch.setattr(tr, "encode_prompt_rows", spy_encode)
    out = tmp_path / "run"
    cli(
        "train", SAMPLES, *FAST, "--model", "tiny:flux", "--out", out, "--steps", 2,
        "--set", "sample.every=2", "--set", "sample.seeds=[0]", "--set", "train.batch_size=1",
        "--set", "model.t5_max_length=16",
    )  # fmt: skip
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step-000000.png",
        "step-000002.png",
    ]
    kohya, fmt = read_adapter(out / "lorakit.safetensors")
    diff, fmt2 = read_adapter(out / "diffusers" / "pytorch_lora_weights.safetensors")
    assert (fmt, fmt2) == ("kohya", "diffusers") and kohya.family == "flux"
    assert kohya.modules.keys() == diff.modules.keys()
    assert any(p.startswith("single_transformer_blocks.") for _, p in kohya.modules)

    # Previews condition FLUX as training did: T5 padded to the run's 16 tokens, not the
    # pipeline's default 512 (FLUX attends to the padding, so the length changes the image).
    assert seen and all(spec.text_length == 16 for spec, _ in seen)
    assert {e["prompt_embeds"].shape[1] for _, rows in seen for e in rows} == {16}
    # The adapter records it, and `lorakit sample` renders with it: from the bare file (its
    # metadata) and from the run folder (its config).
    assert kohya.metadata["lorakit.text_length"] == diff.metadata["lorakit.text_length"] == "16"
    specs = []
    real_render = sampling.render_cells
    monkeypatch.setattr(
        sampling,
        "render_cells",
        lambda pipe, spec, *a: specs.append(spec) or real_render(pipe, spec, *a),
    )
    for source in (out / "lorakit.safetensors", out):
        cli("sample", source, "--steps", 1, "--seeds", "0", "--out", tmp_path / "s.png")
    assert [s.text_length for s in specs] == [16, 16]


@pytest.mark.parametrize("preset", ["flux-12gb", "flux-16gb", "flux-24gb"])
def test_preset_loads_and_its_cpu_settings_train_tiny_flux(tmp_path, preset):
    from lorakit import config as cfg
    from lorakit.train import train

    c = cfg.resolve(preset=preset)
    assert c.train.mixed_precision == "bf16"
    if preset == "flux-12gb":  # fp8 runs on the CPU too; the tiny model has 2 blocks to swap
        assert c.model.quantize == "fp8" and c.train.block_swap > 0 and c.train.stream_encoders
        keep = ["train.block_swap=1"]
    else:  # everything but the CUDA-only quantization, at tiny size
        assert c.model.quantize in ("nf4", "int8")
        keep = ["model.quantize='none'"]
    c = cfg.resolve(
        preset=preset,
        sets=[
            "model.name='tiny:flux'", *keep, "model.t5_max_length=16",
            "data.resolution=64", "train.steps=2", "train.batch_size=1", "train.device='cpu'",
            "train.mixed_precision='no'",
            "sample.every=0", "train.save_every=0", "train.optimizer_fallback=true",
            f"train.out='{tmp_path / 'run'}'",
        ],
    )  # fmt: skip
    result = train(c, SAMPLES)
    assert set(result.adapters) == {"kohya", "diffusers"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_non_square_buckets_pack_into_whole_latent_patches(tmp_path):
    """Found on the GPU: at 64 px the automatic 8-px bucket step gave a 56×72 bucket whose 7×9
    latents cannot be packed 2×2. FLUX buckets are multiples of 16 px."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(56, 72), (56, 72), (72, 56), (72, 56)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("tdwl, a flat shape")
    out = tmp_path / "run"
    cli("train", data, *FAST, "--model", "tiny:flux", "--out", out, "--steps", 2,
        "--set", "train.batch_size=2", "--set", "model.t5_max_length=16")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()
