"""FLUX.2 [klein]: every training convention checked against `Flux2KleinPipeline` itself (latent
normalisation, packing and ids, prompt encoding, shift), the BFL naming table against diffusers'
own converter, single files (good and bad), the exports in the loaders that read them, the module
table against the real 4B/9B architectures, and the presets. The denoiser call of a sampling step
(timestep, target, ids, text layers) and memorisation (a LoRA trained on one image samples it
back): tests/test_agreement.py, as for every family."""

from __future__ import annotations

import math
import shutil

import loaders
import pytest
import torch
from conftest import SAMPLES
from safetensors.torch import load_file, save_file

from lorakit.config import LoraConfigSection, TrainConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.export import loads_in, read_adapter, write_adapter
from lorakit.lora import canonical_name, extract_adapter, inject_lora, lora_layers
from lorakit.models import FAMILIES, flow
from lorakit.models import flux2_klein as kl
from lorakit.models.single_file import detect_family, load_single_file

FAM = FAMILIES["flux2-klein"]
RES = 64
TEXT = 32
"""Caption tokens in these tests (the real default, 512, only costs time here)."""


def _pipe_cls():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


@pytest.fixture(scope="module")
def comps():
    c = FAM.build_tiny(0)
    c.max_sequence_length = TEXT
    return c


def _pixels(b: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, RES, RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- latents, packing, ids, prompts: the pipeline's own computations on the same inputs ---------


def test_latents_are_the_pipelines_normalised_vae_latents(comps):
    px = _pixels(2)
    ours = FAM.encode_images(comps, px)
    assert ours.shape == (2, 32, RES // 8, RES // 8)
    pipe = FAM.pipeline(comps)
    with torch.no_grad():
        theirs = pipe._encode_vae_image(px, torch.Generator().manual_seed(0))  # [2, 128, 4, 4]
        raw = comps.vae.encode(px).latent_dist.mean
    assert torch.allclose(_pipe_cls()._patchify_latents(ours), theirs, atol=1e-6)
    # the batch-norm statistics are not (0, 1): leaving them out would be seen here
    assert (_pipe_cls()._patchify_latents(raw) - theirs).abs().max() > 0.1
    # the pipeline's decode path (un-normalise, unpatchify) inverts ours exactly
    assert torch.allclose(kl.denormalise(comps.vae, ours), raw, atol=1e-5)


def test_packing_and_position_ids_are_the_pipelines(comps):
    p = FAM.pipeline(comps)
    x = torch.randn(2, 32, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens, ids = kl.pack(x)
    assert tokens.shape == (2, 15, 128) and ids.shape == (2, 15, 4)
    # prepare_latents on the same (patchified) noise packs it and makes the same ids
    packed, latent_ids = p.prepare_latents(
        2, 32, 48, 80, torch.float32, "cpu", generator=None, latents=p._patchify_latents(x)
    )
    assert torch.equal(tokens, packed) and torch.equal(ids, latent_ids)
    assert ids[0, -1].tolist() == [0, 2, 4, 0], "(t, row, col, layer)"
    assert torch.equal(kl.unpack(tokens, 6, 10), x)
    # the pipeline's own unpacking of tokens (by ids) gives the same patches
    assert torch.equal(p._unpack_latents_with_ids(tokens, ids, 3, 5), p._patchify_latents(x))
    text_ids = p._prepare_text_ids(torch.zeros(1, 7, 4))
    assert text_ids[0, :, 3].tolist() == list(range(7)) and not text_ids[0, :, :3].any()


def test_prompt_embeddings_are_three_qwen3_layers_of_the_chat_template(comps):
    tok, te = comps.tokenizer, comps.text_encoder
    cond = FAM.encode_prompts(comps, ["tdwl coffee cup", "a sun"])
    emb = cond["encoder_hidden_states"]
    assert emb.shape == (2, TEXT, 3 * te.config.hidden_size)
    # by hand: the chat template with the empty think block, padded to the length, layers 9/18/27
    text = tok.apply_chat_template(
        [{"role": "user", "content": "tdwl coffee cup"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    enc = tok(text, return_tensors="pt", padding="max_length", max_length=TEXT, truncation=True)
    with torch.no_grad():
        hs = te(**enc, output_hidden_states=True).hidden_states
    want = torch.cat([hs[9], hs[18], hs[27]], dim=-1)
    assert torch.allclose(emb[:1], want, atol=1e-6)
    assert not torch.allclose(hs[27], hs[-1]), "layer 27 is a layer's output, not the final norm"


# --- the schedule's shift (the denoiser call of a step: tests/test_agreement.py) ---------------


def test_shift_is_the_pipelines_empirical_mu_at_its_default_steps(comps):
    """The `shift` sampler's μ shifts sigmas exactly as the pipeline's 50-step schedule does for
    the same image size (run one step, read the scheduler)."""
    pipe = FAM.pipeline(comps)

    def stop(p, i, t, kw):
        p._interrupt = True
        return kw

    with torch.no_grad():
        pipe(prompt="a", num_inference_steps=kl.SHIFT_STEPS, height=RES, width=RES,
             guidance_scale=1.0, output_type="latent", max_sequence_length=8,
             callback_on_step_end=stop)  # fmt: skip
    tokens = (RES // 16) ** 2
    base = torch.linspace(1.0, 1 / kl.SHIFT_STEPS, kl.SHIFT_STEPS, dtype=torch.float64)
    ours = flow.time_shift(base, kl.shift_mu(TrainConfig(), tokens))
    assert torch.allclose(ours.float(), pipe.scheduler.sigmas[: kl.SHIFT_STEPS], atol=1e-5)
    lat = torch.zeros(4096, 32, RES // 8, RES // 8)
    _, sig = FAM.noise_and_timesteps(comps, lat, torch.Generator().manual_seed(3), TrainConfig())
    m = sig.median().item()
    assert abs(math.log(m / (1 - m)) - kl.shift_mu(TrainConfig(), tokens)) < 0.1


# --- names and single files -----------------------------------------------------------------------


def test_bfl_table_agrees_with_diffusers_converter(comps):
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
    )

    bfl = FAM.to_single_file(comps)
    inner = 128
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * inner + 2 * 3 * inner, inner)
    assert "double_stream_modulation_img.lin.weight" in bfl and "img_in.weight" in bfl
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    sd = comps.transformer.state_dict()
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory, comps):
    """A diffusers folder of the tiny klein without its transformer (as a user keeps one for
    the text encoder, tokenizer, VAE and scheduler)."""
    folder = tmp_path_factory.mktemp("klein") / "tiny-klein"
    FAM.save(comps, str(folder))
    shutil.rmtree(folder / "transformer")
    return folder


@pytest.mark.parametrize("layout", ["bfl", "model.diffusion_model.", "diffusers"])
def test_bfl_single_file_loads_the_same_transformer(tmp_path, comps, config_folder, layout):
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    if layout == "diffusers":
        state = comps.transformer.state_dict()
    else:
        prefix = "" if layout == "bfl" else layout
        state = {prefix + k: v for k, v in FAM.to_single_file(comps).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert detect_family(path) == "flux2-klein", "not FLUX.1 although it has double_blocks."
    loaded = load_single_file(FAM, path, str(config_folder))
    a, b = loaded.transformer.state_dict(), comps.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.transformer.config.attention_head_dim == 32, "config read off the shapes"
    cond = FAM.encode_prompts(loaded, ["tdwl"])
    assert cond["encoder_hidden_states"].shape[-1] == 48


def test_wrong_family_file_is_refused_with_what_to_do(tmp_path, config_folder):
    flux1 = FAMILIES["flux"]
    path = tmp_path / "flux1-dev.safetensors"
    save_file(flux1.to_single_file(flux1.build_tiny(0)), str(path))
    with pytest.raises(ConfigError) as e:
        load_single_file(FAM, path, str(config_folder))
    msg = str(e.value)
    assert str(path) in msg and "is a flux checkpoint" in msg and "model.family" in msg


def test_flux2_dev_file_is_refused(tmp_path, comps, config_folder):
    state = FAM.to_single_file(comps)
    state["guidance_in.in_layer.weight"] = torch.zeros(128, 32)
    path = tmp_path / "flux2-dev.safetensors"
    save_file(state, str(path))
    with pytest.raises(LorakitError, match=r"FLUX\.2 \[dev\]") as e:
        load_single_file(FAM, path, str(config_folder))
    assert str(path) in str(e.value) and "flux-2-klein" in str(e.value)


def test_missing_text_encoder_names_the_file_and_the_fix(tmp_path, comps, config_folder):
    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file(FAM.to_single_file(comps), str(path))
    bare = tmp_path / "no-te"
    shutil.copytree(config_folder, bare)
    shutil.rmtree(bare / "text_encoder")
    with pytest.raises(LorakitError) as e:
        load_single_file(FAM, path, str(bare))
    msg = str(e.value)
    assert str(path) in msg and "text_encoder/" in msg and "model.single_file_config" in msg
    with pytest.raises(LorakitError, match="text_encoder/"):  # no folder at all: built-in configs
        load_single_file(FAM, path, "")


def test_comfyui_split_vae_and_text_encoder_files_load(tmp_path, comps, config_folder):
    """model.single_file_config = a folder with ComfyUI's split files (found by their keys), the
    tokenizer, and the tiny VAE's config (the real VAE's is built in; Qwen3's is read off the
    shapes)."""
    from lorakit.models.flux2_klein import names

    split = tmp_path / "comfy"
    shutil.copytree(config_folder / "tokenizer", split / "tokenizer")
    (split / "vae").mkdir()
    shutil.copy(config_folder / "vae" / "config.json", split / "vae" / "config.json")
    vae_file = names.vae_to_original(comps.vae)
    assert {
        "encoder.quant_conv.weight",
        "decoder.post_quant_conv.weight",
        "bn.running_var",
        "encoder.down.0.block.0.conv1.weight",
        "decoder.mid.attn_1.q.weight",
    } <= set(vae_file)
    assert vae_file["decoder.mid.attn_1.q.weight"].dim() == 4  # 1×1 conv, as BFL stores it
    vae_file.pop("bn.num_batches_tracked")  # BFL's files have no step counter
    save_file(vae_file, str(split / "flux2-vae.safetensors"))
    te = {k: v for k, v in comps.text_encoder.state_dict().items() if k != "lm_head.weight"}
    save_file(te, str(split / "qwen_3_4b.safetensors"))
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(FAM.to_single_file(comps), str(path))
    loaded = load_single_file(FAM, path, str(split))
    loaded.max_sequence_length = TEXT
    a, b = loaded.vae.state_dict(), comps.vae.state_dict()
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a if "num_batches" not in k
    )
    px = _pixels()
    assert torch.equal(FAM.encode_images(loaded, px), FAM.encode_images(comps, px))
    ea, eb = FAM.encode_prompts(loaded, ["tdwl cup"]), FAM.encode_prompts(comps, ["tdwl cup"])
    assert torch.allclose(ea["encoder_hidden_states"], eb["encoder_hidden_states"], atol=1e-6)


# --- exports: the files the loaders read ----------------------------------------------------------

TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "ff.linear_in", "ff_context.linear_out", "to_qkv_mlp_proj",
    "single_transformer_blocks.1.attn.to_out", "x_embedder", "double_stream_modulation_img.linear",
    "norm_out.linear", "proj_out",
]  # fmt: skip
CLAIMS = {
    ("kohya", "original"): {"comfyui"},
    ("kohya", "diffusers"): set(),
    ("diffusers", "-"): {"diffusers"},
    ("lycoris", "-"): set(),
}
"""Who reads which file: ComfyUI the BFL-named kohya file only (its diffusers-name map is
FLUX.1's), diffusers its own format. Forge cannot load a FLUX.2 model at all, so it is not
asked."""


def _trained(kind: str):
    c = FAM.build_tiny(0)
    targets = [t for t in TARGETS if not (kind == "dora" and t == "norm_out.linear")]
    cfg = LoraConfigSection(
        rank=4, alpha=8.0, target_modules=targets, type="lora" if kind == "dora" else kind,
        use_dora=kind == "dora", rank_pattern={"to_k": 2}, alpha_pattern={"add_v_proj": 3.0},
    )  # fmt: skip
    params = inject_lora(c.transformer, cfg, 0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = extract_adapter(FAM, c, {"lorakit.family": FAM.name})
    delta, magnitude = {}, {}
    for name, layer in lora_layers(c.transformer):
        cp = ("transformer", canonical_name(FAM.targets[0], name))
        with torch.no_grad():
            delta[cp] = layer.get_delta_weight("default").float()
            if kind == "dora":
                magnitude[cp] = layer.lora_magnitude_vector["default"].weight.detach().clone()
    return adapter, delta, magnitude


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_exports_load_in_comfyui_and_diffusers_at_the_trained_strength(tmp_path, kind):
    import test_export_matrix as tem

    base = FAM.build_tiny(0)
    weights = {
        ("transformer", n): m.weight.detach().clone()
        for n, m in base.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    model = loaders.build_model(FAM.name, weights, dict(base.transformer.config))
    adapter, delta, magnitude = _trained(kind)
    t = tem.Trained(adapter, delta, magnitude)
    for (fmt, naming), claims in CLAIMS.items():
        path = tmp_path / f"{fmt}-{naming}.safetensors"
        kwargs = {"naming": naming} if naming != "-" else {}
        if fmt in ("kohya", "diffusers") and kind != "lora":
            continue  # refused before writing (tests/test_export_matrix.py checks that)
        for dtype in ("fp32", "bf16") if kind == "lora" else ("fp32",):
            write_adapter(adapter, fmt, path, dtype=dtype, **kwargs)
            tensors = load_file(str(path))
            if "comfyui" in claims:
                tem.check_loader("comfyui", tensors, t, model, dtype)
            else:
                tem.check_not_loaded("comfyui", tensors, model)
            if "diffusers" in claims and kind == "lora":
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(tem, "fresh", lambda family: (FAM.build_tiny(0), model))
                    tem.check_diffusers(path, t, FAM.name, dtype)
        text = loads_in(fmt, FAM.name, "original" if naming == "-" else naming)
        named = {
            k for k, n in {"comfyui": "ComfyUI", "diffusers": "diffusers"}.items() if n in text
        }
        assert named == claims, (fmt, naming, text)


def test_kohya_file_uses_bfl_names_and_reads_back(tmp_path):
    adapter, _, _ = _trained("lora")
    path = write_adapter(adapter, "kohya", tmp_path / "k.safetensors")
    keys = set(load_file(str(path)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # q|k|v fused
    assert "lora_unet_single_blocks_1_linear2.alpha" in keys
    assert "lora_unet_double_stream_modulation_img_lin.lora_up.weight" in keys
    back, fmt = read_adapter(path)
    assert fmt == "kohya" and back.family == FAM.name
    assert back.modules.keys() == adapter.modules.keys()
    assert all(torch.allclose(back.modules[k].delta(), w.delta(), atol=1e-6)
               for k, w in adapter.modules.items())  # fmt: skip


# --- the real architectures, presets -----------------------------------------------------------


def _linear_names(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def test_module_table_is_the_real_9b_and_4b_is_a_subset():
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        real = FAM.build_real_denoiser()
        small = Flux2Transformer2DModel(**kl.KLEIN_4B_TRANSFORMER)
    assert _linear_names(real) == set(FAM.known_modules("transformer"))
    assert _linear_names(small) < FAM.known_modules("transformer")
    assert tuple(n for n, m in real.named_children() if isinstance(m, torch.nn.ModuleList)
                 ) == FAM.swap_blocks  # fmt: skip
    assert _linear_names(FAM.build_tiny(0).transformer) < FAM.known_modules("transformer")
    assert real.config.joint_attention_dim == 3 * kl.QWEN3_8B["hidden_size"]
    assert small.config.joint_attention_dim == 3 * kl.QWEN3_4B["hidden_size"]


@pytest.mark.parametrize("preset", ["flux2-klein-12gb", "flux2-klein-16gb", "flux2-klein-24gb"])
def test_preset_loads_and_its_cpu_settings_train_tiny_klein(tmp_path, preset):
    from lorakit import config as cfg
    from lorakit.train import train

    c = cfg.resolve(preset=preset)
    assert c.model.name.startswith("black-forest-labs/FLUX.2-klein-base")
    assert c.train.mixed_precision == "bf16" and c.train.gradient_checkpointing
    c = cfg.resolve(
        preset=preset,
        sets=[
            "model.name='tiny:flux2-klein'", "model.quantize='none'", "model.t5_max_length=16",
            "data.resolution=64", "train.steps=2", "train.batch_size=1", "train.device='cpu'",
            "train.mixed_precision='no'", "train.offload_activations=false",
            "sample.every=0", "train.save_every=0", "train.optimizer_fallback=true",
            f"train.out='{tmp_path / 'run'}'",
        ],
    )  # fmt: skip
    result = train(c, SAMPLES)
    assert set(result.adapters) == {"kohya", "diffusers"}
    assert all(math.isfinite(v) for v in result.losses.values())


def test_tiny_model_folder_loads_identical_components(tmp_path):
    from conftest import cli

    folder = tmp_path / "tiny-klein"
    cli("tiny-model", "flux2-klein", folder)
    assert not list(folder.rglob("*.bin"))
    loaded = FAM.load(str(folder), revision="", variant="", allow_pickle=False)
    built = FAM.build_tiny(0)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.is_distilled is False and loaded.scheduler.config.use_dynamic_shifting
    loaded.max_sequence_length = built.max_sequence_length = TEXT
    ea, eb = FAM.encode_prompts(loaded, ["tdwl cup"]), FAM.encode_prompts(built, ["tdwl cup"])
    assert torch.allclose(ea["encoder_hidden_states"], eb["encoder_hidden_states"], atol=1e-6)


def test_variant_metadata_names_the_klein_size_and_names_the_family():
    from types import SimpleNamespace

    from lorakit.export.validate import family_hint

    def comps(layers):
        return SimpleNamespace(
            transformer=SimpleNamespace(config=SimpleNamespace(num_layers=layers))
        )

    assert FAM.variant_metadata(comps(5))["modelspec.architecture"] == "flux-2-klein-4b/lora"
    assert FAM.variant_metadata(comps(8))["ss_base_model_version"] == "flux2_klein_9b"
    assert FAM.variant_metadata(comps(1)) == {}
    for meta in FAM.variant_metadata(comps(8)).items():
        assert family_hint(dict([meta])) == FAM.name, meta
    assert family_hint({"ss_base_model_version": "flux1"}) == "flux"


def test_plan_tells_klein_4b_from_9b_by_the_model_name():
    """`lorakit plan` plans the published width the name says (`Family.real_model`)."""
    from lorakit import config as cfg
    from lorakit import planner

    keys = {
        name: planner.planner_key(cfg.resolve(preset=name))
        for name in ("flux2-klein-16gb", "flux2-klein-24gb")
    }
    assert planner._family(keys["flux2-klein-16gb"]).real_label == "FLUX.2 klein 4B"
    assert keys["flux2-klein-24gb"] == "flux2-klein"  # 9B: the registered default
    n = {k: sum(p.numel() for p in planner.build_denoiser(v).parameters()) for k, v in keys.items()}
    assert 3.5e9 < n["flux2-klein-16gb"] < 4.5e9 and 8.5e9 < n["flux2-klein-24gb"] < 9.5e9, n
    d4 = planner.build_frozen(keys["flux2-klein-16gb"])["text_encoder"].config.hidden_size
    assert d4 == 2560 and planner._family(keys["flux2-klein-16gb"]).plan_arch.text_dim == 3 * d4
    c = cfg.resolve(sets=["model.name='/models/FLUX.2-klein-base-4B'"])
    assert planner.planner_key(c).endswith("@FLUX.2 klein 4B")


@pytest.mark.parametrize("layout", ["plain", "scaled_fp8"])
def test_split_files_in_their_subfolders_and_in_fp8_load(tmp_path, comps, config_folder, layout):
    """The one split-file convention (`single_file.split_file`), as for Qwen-Image and Z-Image:
    ComfyUI's Qwen3 and VAE files alone in text_encoder/ and vae/; fp8 files (plain e4m3, or
    scaled with per-layer scales) are widened as they are read."""
    from test_fp8_files import SCALED_REL_ERROR, plain, scaled

    from lorakit.models.flux2_klein import names

    quantize = plain if layout == "plain" else scaled
    split = tmp_path / "comfy"
    shutil.copytree(config_folder / "tokenizer", split / "tokenizer")
    (split / "vae").mkdir()
    (split / "text_encoder").mkdir()
    shutil.copy(config_folder / "vae" / "config.json", split / "vae" / "config.json")
    vae_file = names.vae_to_original(comps.vae)
    vae_file.pop("bn.num_batches_tracked")
    save_file(quantize(vae_file), str(split / "vae" / "flux2-vae.safetensors"))
    te = {k: v for k, v in comps.text_encoder.state_dict().items() if k != "lm_head.weight"}
    save_file(quantize(te), str(split / "text_encoder" / "qwen_3_4b.safetensors"))
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(FAM.to_single_file(comps), str(path))
    loaded = load_single_file(FAM, path, str(split))
    for name in ("vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(comps, name).state_dict()
        for k in b:
            if "num_batches" in k:
                continue
            err = (a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp(min=1e-12)
            assert err < SCALED_REL_ERROR, (name, k, err.item())
