"""Z-Image family: conventions checked against `ZImagePipeline`'s own code, caption padding, the
naming table against diffusers' converter, exports against ComfyUI's key map, single files
(ComfyUI's split files), clear errors, presets and the planner. The denoiser call of a sampling
step (list inputs, t = 1 - σ, negated output), the schedule's shift and memorisation (a LoRA
trained on one image samples it back): tests/test_agreement.py, as for every family."""

from __future__ import annotations

import math

import loaders
import pytest
import torch
from conftest import SAMPLES, cli
from safetensors.torch import load_file, save_file
from test_export_matrix import Trained, check_loader, expected

from lorakit.config import LoraConfigSection, ModelConfig, TrainConfig
from lorakit.errors import LorakitError
from lorakit.export import loads_in, read_adapter, write_adapter
from lorakit.lora import canonical_name, extract_adapter, inject_lora, lora_layers
from lorakit.models import FAMILIES, load_model
from lorakit.models import z_image as zi
from lorakit.models.flow import flux_mu, sample_sigmas
from lorakit.models.z_image import names as zn

FAM = FAMILIES["z-image"]


def _linear_names(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


# -- structure ----------------------------------------------------------------------------------


def test_module_table_is_the_real_architecture_and_tiny_is_a_subset():
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        real = ZImageTransformer2DModel(**zi.Z_IMAGE_TRANSFORMER)
    assert _linear_names(real) == set(FAM.known_modules("transformer"))
    assert sum(p.numel() for p in real.parameters()) == pytest.approx(6.15e9, rel=0.01)
    table = FAM.known_modules("transformer")
    assert len([n for n in table if n.endswith("attention.to_q")]) == 34  # 30 + 2 + 2 blocks
    assert "context_refiner.0.adaLN_modulation.0" not in table  # context refiner: no adaLN
    c = FAM.build_tiny(0)
    assert _linear_names(c.transformer) < table
    # swap_blocks: the ModuleLists of repeated blocks, in the order forward runs them
    assert all(isinstance(getattr(real, n), torch.nn.ModuleList) for n in FAM.swap_blocks)
    assert [len(getattr(real, n)) for n in FAM.swap_blocks] == [2, 2, 30]


def test_tiny_build_is_deterministic_frozen_and_follows_the_shape_rules():
    a, b = FAM.build_tiny(0), FAM.build_tiny(0)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not getattr(a, name).training
    tc = a.transformer.config
    assert tc.dim == tc.n_heads * sum(tc.axes_dims)
    assert tc.cap_feat_dim == a.text_encoder.config.hidden_size
    assert a.vae.config.latent_channels == tc.in_channels == 16
    assert type(a.text_encoder).__name__ == "Qwen3Model"


# -- conventions, against the pipeline ---------------------------------------------------------


def test_latents_are_what_the_pipeline_decodes():
    c = FAM.build_tiny(0)
    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = FAM.encode_images(c, px)
    mean = c.vae.encode(px).latent_dist.mean
    assert lat.shape == (1, 16, 8, 8)
    assert torch.allclose(lat, (mean - 0.1159) * 0.3611, atol=1e-6)
    # ZImagePipeline decodes `latents / scaling_factor + shift_factor`: the exact inverse (up to
    # fp32 rounding of the round trip: 1.2e-7 measured, which allclose's default tolerance
    # rejects where the latent is near 0)
    back = lat / c.vae.config.scaling_factor + c.vae.config.shift_factor
    assert torch.allclose(back, mean, rtol=0, atol=1e-6)
    pipe = FAM.pipeline(c)  # its latent grid: 2·(H // 16) = H / 8 for the 16-px multiples
    grid = pipe.prepare_latents(1, 16, 64, 64, torch.float32, "cpu", None)
    assert grid.shape == lat.shape


def test_prompt_features_are_the_pipelines_and_padding_never_reaches_the_model():
    c = FAM.build_tiny(0)
    prompts = ["tdwl coffee cup", "a teal wave over the sea with a sun, flat vector poster"]
    cond = FAM.encode_prompts(c, prompts)
    assert cond["cap_feats"].shape == (2, 512, zi.TINY_TEXT_DIM)
    theirs, _ = FAM.pipeline(c).encode_prompt(list(prompts), do_classifier_free_guidance=False)
    ours = zi.unpad_captions(cond)
    assert [len(f) for f in ours] == [len(f) for f in theirs] and len(ours[0]) < len(ours[1])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    # the chat template with enable_thinking=True (no empty think block) and hidden_states[-2]
    text = c.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], tokenize=False, add_generation_prompt=True,
        enable_thinking=True,
    )  # fmt: skip
    assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    ids = c.tokenizer(text, return_tensors="pt").input_ids
    hidden = c.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    assert torch.allclose(ours[0], hidden, atol=1e-5)

    # A batch of two different lengths (each padded to 512) gives per sample what the sample
    # gives alone, padded to another length: predict unpads before the transformer.
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        both = FAM.predict(c.transformer, x, t, cond)
        c.max_sequence_length = 48
        for i, p in enumerate(prompts):
            alone = FAM.encode_prompts(c, [p])
            assert alone["cap_feats"].shape[1] == 48
            one = FAM.predict(c.transformer, x[i : i + 1], t[i : i + 1], alone)
            assert (one[0] - both[i]).abs().max().item() < 1e-5
        # what padding would do if it reached the model (the check above can fail)
        leaked = FAM.predict(c.transformer, x, t, {"cap_feats": cond["cap_feats"]})
    assert (leaked - both).abs().max().item() > 1e-3


def test_sampler_shift_is_the_schedulers():
    c = FAM.build_tiny(0)
    lat = torch.zeros(4096, 16, 8, 8)
    _, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(0), TrainConfig())
    m = sig.median().item()
    assert m / (1 - m) == pytest.approx(3.0, rel=0.05)  # shift(½) = 3/4 for a static shift 3
    # a dynamic-shift config: FLUX's μ from the image token count, as ZImagePipeline passes it
    from diffusers import FlowMatchEulerDiscreteScheduler

    c.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    lat = torch.zeros(3, 16, 128, 128)
    _, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(9), TrainConfig())
    gen = torch.Generator().manual_seed(9)
    torch.randn(lat.shape, generator=gen)
    assert torch.equal(sig, sample_sigmas(3, gen, "shift", 0.0, 1.0, flux_mu(4096)))
    cfg = TrainConfig(flow_shift=6.0)
    assert FAM.shift_mu(c, lat, cfg) == pytest.approx(math.log(6.0))


def test_frames_axis_passes_through_predict():
    c = FAM.build_tiny(0)
    cond = FAM.encode_prompts(c, ["tdwl"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    with torch.no_grad():
        four = FAM.predict(c.transformer, x, t, cond)
        five = FAM.predict(c.transformer, x[:, :, None], t, cond)
    assert five.shape == (1, 16, 1, 8, 8) and torch.equal(five[:, :, 0], four)


# -- names: the table against diffusers' single-file converter ----------------------------------


def test_naming_table_round_trips_and_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import (
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    c = FAM.build_tiny(0)
    original = zn.transformer_to_original(c.transformer)
    assert "layers.0.attention.qkv.weight" in original and "x_embedder.weight" in original
    assert "noise_refiner.0.attention.q_norm.weight" in original
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in original.items()}
    )
    ours = zn.read_transformer({"model.diffusion_model." + k: v for k, v in original.items()}, 2, 1)
    sd = c.transformer.state_dict()
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]) for k in sd)


# -- exports: ComfyUI's key map (tests/loaders.py), diffusers ------------------------------------

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2",
           "noise_refiner.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0",
           "adaLN_modulation.1", "all_x_embedder.2-1", "linear", "cap_embedder.1"]  # fmt: skip


def _trained(kind: str = "lora"):
    c = FAM.build_tiny(0)
    cfg = LoraConfigSection(
        rank=4, alpha=8.0, target_modules=TARGETS, type="lora" if kind == "dora" else kind,
        use_dora=kind == "dora", rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3.0},
    )  # fmt: skip
    params = inject_lora(c.transformer, cfg, 0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = extract_adapter(FAM, c, {"lorakit.family": "z-image"})
    delta, magnitude = {}, {}
    for name, layer in lora_layers(c.transformer):
        cp = ("transformer", canonical_name(FAM.targets[0], name))
        with torch.no_grad():
            delta[cp] = layer.get_delta_weight("default").float()
            if kind == "dora":
                magnitude[cp] = layer.lora_magnitude_vector["default"].weight.detach().clone()
    return adapter, Trained(adapter, delta, magnitude)


def _loader_model():
    c = FAM.build_tiny(0)
    weights = {
        ("transformer", n): m.weight.detach().clone()
        for n, m in c.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return loaders.build_model("z-image", weights, dict(c.transformer.config))


@pytest.mark.parametrize(
    "fmt,naming,kind",
    [("kohya", "original", "lora"), ("kohya", "diffusers", "lora"), ("diffusers", "-", "lora"),
     ("lycoris", "-", "lora"),
     ("lycoris", "-", "loha"), ("lycoris", "-", "dora")],
)  # fmt: skip
def test_exports_load_in_comfyui_at_the_trained_strength(tmp_path, fmt, naming, kind):
    adapter, t = _trained(kind)
    kw = {"naming": naming} if naming != "-" else {}
    path = write_adapter(adapter, fmt, tmp_path / "a.safetensors", **kw)
    tensors = load_file(str(path))
    if (fmt, naming) == ("kohya", "original"):
        assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in tensors  # fused, original
        assert "lora_unet_x_embedder.alpha" in tensors
    model = _loader_model()
    check_loader("comfyui", tensors, t, model, "fp32", expected(model, t))
    assert "ComfyUI" in loads_in(fmt, "z-image", naming if naming != "-" else "original")
    back, _ = read_adapter(path)
    assert back.family == "z-image" and back.modules.keys() == adapter.modules.keys()
    for k, w in adapter.modules.items():
        assert torch.allclose(back.modules[k].delta(), w.delta(), atol=1e-6), k


def test_diffusers_loads_the_diffusers_file_and_community_files_are_read(tmp_path):
    adapter, t = _trained()
    path = write_adapter(adapter, "diffusers", tmp_path / "d" / "pytorch_lora_weights.safetensors")
    pipe = FAM.pipeline(FAM.build_tiny(0))
    pipe.load_lora_weights(str(path))
    from peft.tuners.lora import LoraLayer

    got = {("transformer", n): sum(m.get_delta_weight(a).float() for a in m.lora_A)
           for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}  # fmt: skip
    assert got.keys() == t.delta.keys()
    assert all(torch.allclose(got[k], t.delta[k], atol=1e-5) for k in got)
    # ai-toolkit's `diffusion_model.<diffusers path>` and musubi-tuner's `lora_unet_<diffusers
    # path with _>` files (the layouts ComfyUI and diffusers read) are read back exactly
    sd = load_file(str(path))
    ai = {"diffusion_model." + k.removeprefix("transformer."): v for k, v in sd.items()}
    save_file(ai, str(tmp_path / "ai.safetensors"))
    musubi = {}
    for (_, p), w in adapter.modules.items():
        key = "lora_unet_" + p.replace(".", "_")
        musubi |= {f"{key}.lora_down.weight": w.down, f"{key}.lora_up.weight": w.up,
                   f"{key}.alpha": torch.tensor(w.alpha)}  # fmt: skip
    save_file(musubi, str(tmp_path / "musubi.safetensors"))
    for name in ("ai", "musubi"):
        back, _ = read_adapter(tmp_path / f"{name}.safetensors", family="z-image")
        assert back.modules.keys() == adapter.modules.keys(), name
        for k, w in adapter.modules.items():
            assert torch.allclose(back.modules[k].delta(), w.delta(), atol=1e-6), (name, k)
    # and ComfyUI loads the musubi layout? No: it needs original or diffusers names (kohya's
    # `lora_unet_` means an original weight name there) — lorakit export converts it
    res = loaders.load("comfyui", _loader_model(), musubi)
    assert res.unread


def test_inspect_resize_and_merge_single_file_on_the_comfyui_file(tmp_path):
    """The kohya file with fused qkv: `inspect` names it, `resize` keeps its modules (rank ≤ 2),
    `merge --single-file` writes the original layout that loads back as the merged model."""
    adapter, _ = _trained()
    path = write_adapter(adapter, "kohya", tmp_path / "a.safetensors")
    r = cli("inspect", path)
    assert "family:      z-image" in r.output
    cli("resize", path, "--rank", 2, "--out", tmp_path / "small.safetensors")
    small, _ = read_adapter(tmp_path / "small.safetensors")
    assert small.modules.keys() == adapter.modules.keys()
    assert max(w.rank for w in small.modules.values()) <= 2
    cli("merge", path, "--base", "tiny:z-image", "--out", tmp_path / "m", "--single-file")
    single = tmp_path / "m.safetensors"
    assert "layers.0.attention.qkv.weight" in load_file(str(single))
    merged = FAM.build_tiny(0)
    from lorakit.merge import merge_into

    merge_into(FAM, merged, [(adapter, 1.0)])
    back = zn.read_transformer(load_file(str(single)), 2, 1)
    want = merged.transformer.state_dict()
    assert all(torch.allclose(back[k].float(), want[k], atol=1e-6) for k in want)


# -- single files --------------------------------------------------------------------------------


def _split_folder(tmp_path, comps):
    """ComfyUI's split files: diffusion model, Qwen3 (`model.` prefix + an LM head) and the VAE
    (ldm names), plus the tokenizer folder lorakit needs besides."""
    from lorakit.models import ldm_names

    folder = tmp_path / "cfg"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "vae").mkdir()
    te = {"model." + k: v.contiguous() for k, v in comps.text_encoder.state_dict().items()}
    te["lm_head.weight"] = comps.text_encoder.embed_tokens.weight.clone()
    save_file(te, str(folder / "text_encoder" / "qwen_3_4b.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v.contiguous()
           for k, v in ldm_names.vae_to_ldm(comps.vae).items()}  # fmt: skip
    save_file(vae, str(folder / "vae" / "ae.safetensors"))
    comps.tokenizer.save_pretrained(str(folder / "tokenizer"))
    for sub, model in (("transformer", comps.transformer), ("vae", comps.vae)):
        model.save_config(str(folder / sub))  # tiny configs (the built-in ones are the 6B's)
    comps.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    dm = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file(FAM.to_single_file(comps), str(dm))
    return dm, folder


def test_comfyui_split_files_load_identical_weights(tmp_path):
    built = FAM.build_tiny(0)
    dm, folder = _split_folder(tmp_path, built)
    assert any(k.startswith("layers.0.attention.qkv") for k in load_file(str(dm)))
    fam, comps = load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
    assert fam is FAM
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(comps, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert comps.scheduler.config.shift == 3.0
    e1, e2 = FAM.encode_prompts(comps, ["tdwl"]), FAM.encode_prompts(built, ["tdwl"])
    assert torch.equal(e1["cap_feats"], e2["cap_feats"])
    # a transformer file saved by diffusers (its own names) loads too
    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(built.transformer.state_dict(), str(diffusers_file))
    _, comps = load_model(ModelConfig(name=str(diffusers_file), single_file_config=str(folder)))
    a, b = comps.transformer.state_dict(), built.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_wrong_files_and_a_missing_text_encoder_are_one_clear_paragraph(tmp_path):
    built = FAM.build_tiny(0)
    dm, folder = _split_folder(tmp_path, built)
    # the text-encoder file passed as the model
    te_file = folder / "text_encoder" / "qwen_3_4b.safetensors"
    with pytest.raises(LorakitError) as e:
        load_model(ModelConfig(name=str(te_file), family="z-image", single_file_config=str(folder)))
    msg = str(e.value)
    assert str(te_file) in msg and "Qwen3 text encoder" in msg and "diffusion_models" in msg
    # another family's single file
    flux_file = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(flux_file))
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is a flux checkpoint.*model.family = 'flux'"):
        load_model(ModelConfig(name=str(flux_file), family="z-image"))
    # no text encoder next to the diffusion model
    (folder / "text_encoder" / "qwen_3_4b.safetensors").unlink()
    with pytest.raises(LorakitError) as e:
        load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
    msg = str(e.value)
    assert str(dm) in msg and "text_encoder/" in msg and "qwen_3_4b.safetensors" in msg
    assert "\n" not in msg and "vae/" not in msg.split("Set")[0]  # only what is missing
    # no folder at all: every separate part named at once, before the transformer is read
    with pytest.raises(LorakitError) as e:
        load_model(ModelConfig(name=str(dm)))
    msg = str(e.value)
    assert "model.single_file_config is not set" in msg
    assert all(f"{p}/ with" in msg for p in ("vae", "text_encoder", "tokenizer"))


def test_tiny_model_folder_round_trips(tmp_path):
    folder = tmp_path / "tiny-z"
    cli("tiny-model", "z-image", folder)
    assert (folder / "model_index.json").is_file() and not list(folder.rglob("*.bin"))
    fam, loaded = load_model(ModelConfig(name=str(folder)))
    built = FAM.build_tiny(0)
    assert fam is FAM
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    prompts = ["tdwl coffee cup, flat"]
    ea, eb = FAM.encode_prompts(loaded, prompts), FAM.encode_prompts(built, prompts)
    assert torch.equal(ea["cap_mask"], eb["cap_mask"])
    assert torch.allclose(ea["cap_feats"], eb["cap_feats"], atol=1e-6), "tokenizer round trip"


# -- presets and the planner ----------------------------------------------------------------------

PRESETS = ["z-image-12gb", "z-image-16gb", "z-image-24gb"]


@pytest.mark.parametrize(
    "preset", [PRESETS[1], *(pytest.param(p, marks=pytest.mark.slow) for p in PRESETS[::2])]
)
def test_preset_loads_and_its_cpu_settings_train_tiny_z_image(tmp_path, preset):
    from lorakit import config as cfg
    from lorakit.train import train

    c = cfg.resolve(preset=preset)
    assert c.model.name == "Tongyi-MAI/Z-Image-Turbo" and c.train.mixed_precision == "bf16"
    c = cfg.resolve(
        preset=preset,
        sets=[
            "model.name='tiny:z-image'", "model.quantize='none'", "data.resolution=64",
            "train.steps=2", "train.batch_size=1", "train.device='cpu'",
            "train.mixed_precision='no'", "sample.every=0", "train.save_every=0",
            "train.optimizer_fallback=true", "model.t5_max_length=64",
            f"train.out='{tmp_path / 'run'}'",
        ],
    )  # fmt: skip
    result = train(c, SAMPLES)
    assert set(result.adapters) >= {"kohya"}
    assert all(math.isfinite(v) for v in result.losses.values())


@pytest.mark.slow
def test_plan_answers_for_the_real_model():
    r = cli("plan", "--preset", "z-image-16gb")
    assert "training plan" in r.output


@pytest.mark.parametrize("layout", ["plain", "scaled_fp8"])
def test_split_files_at_the_top_level_and_in_fp8_load(tmp_path, layout):
    """The one split-file convention (`single_file.split_file`), as for Qwen-Image and klein:
    ComfyUI's Qwen3 and VAE files lying in model.single_file_config itself are recognised by
    their keys; fp8 files (plain e4m3, or scaled) are widened as they are read."""
    from test_fp8_files import SCALED_REL_ERROR, plain, scaled

    built = FAM.build_tiny(0)
    dm, folder = _split_folder(tmp_path, built)
    quantize = plain if layout == "plain" else scaled
    for sub in ("text_encoder", "vae"):
        (src,) = (folder / sub).glob("*.safetensors")
        save_file(quantize(load_file(str(src))), str(folder / src.name))
        src.unlink()
    _, comps = load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
    for name in ("vae", "text_encoder"):
        a, b = getattr(comps, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in b:
            err = (a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)
            assert err < SCALED_REL_ERROR, (name, k, err.item())
