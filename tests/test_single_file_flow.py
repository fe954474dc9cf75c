"""Single-file `.safetensors` checkpoints for SD3/3.5 (`joint_blocks.*`) and FLUX.1
(`double_blocks.*` / `single_blocks.*`): the transformer (and an embedded VAE) come from the file,
text encoders, tokenizers and scheduler from `model.single_file_config`."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from safetensors.torch import save_file
from single_file_writer import (
    flux_transformer_to_original,
    sd3_transformer_to_original,
    vae_to_ldm,
)

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.models import FAMILIES, load_model, resolve_family
from lorakit.models import single_file as sf

PARTS = {
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
}
# Keys of real files (SD3.5 large from stabilityai, FLUX.1-dev transformer from BFL).
REAL_KEYS = {
    "sd3": (
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
        "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
        "model.diffusion_model.x_embedder.proj.weight",
        "model.diffusion_model.pos_embed",
        "first_stage_model.decoder.conv_in.weight",
    ),
    "flux": (
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight",
        "guidance_in.in_layer.weight",
        "final_layer.adaLN_modulation.1.weight",
    ),
}


def _write(family, tmp, with_vae: bool):
    built = FAMILIES[family].build_tiny(seed=0)
    if family == "sd3":
        state = sd3_transformer_to_original(built.transformer)
    else:
        state = flux_transformer_to_original(built.transformer)
    if with_vae:
        state |= vae_to_ldm(built.vae)
    path = tmp / f"tiny-{family}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return built, path


@pytest.fixture(scope="module", params=["sd3", "flux"])
def checkpoint(request, tmp_path_factory):
    """(family, tiny build, its diffusers folder, the transformer (+VAE) as one original file)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"single-{family}")
    folder = tmp / "diffusers"
    cli("tiny-model", family, folder)
    built, path = _write(family, tmp, with_vae=family == "sd3")
    return family, built, folder, path


def _assert_same_weights(a, b, parts):
    for name in parts:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not differ, f"{name}: {differ[:5]}"


def test_file_has_original_key_names_and_is_detected(checkpoint):
    family, _, _, path = checkpoint
    keys = set(sf.checkpoint_keys(path))
    assert set(REAL_KEYS[family]) <= keys
    assert not any(k.startswith(("transformer.", "transformer_blocks.")) for k in keys)
    assert sf.detect_family(path) == family
    fam, kind = resolve_family(ModelConfig(name=str(path)))
    assert (fam.name, kind) == (family, "single_file")


def test_single_file_loads_identical_weights_and_conditioning(checkpoint):
    family, built, folder, path = checkpoint
    fam, loaded = load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
    assert fam.name == family
    _assert_same_weights(built, loaded, PARTS[family])
    assert type(loaded.scheduler) is type(built.scheduler)
    assert loaded.scheduler.config.shift == built.scheduler.config.shift
    a = fam.encode_prompts(built, ["tdwl coffee cup", "a sun"])
    b = fam.encode_prompts(loaded, ["tdwl coffee cup", "a sun"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not loaded.transformer.training
    assert not any(p.requires_grad for p in loaded.transformer.parameters())


def test_flux_transformer_only_file_takes_the_vae_from_the_folder(checkpoint):
    family, built, folder, path = checkpoint
    if family != "flux":
        pytest.skip("FLUX files hold the transformer alone; the SD3 file here has a VAE")
    assert not any(k.startswith("first_stage_model.") for k in sf.checkpoint_keys(path))
    _, loaded = load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
    _assert_same_weights(built, loaded, ("vae",))


def test_sd3_drop_t5_applies_to_single_files(checkpoint):
    family, _, folder, path = checkpoint
    if family != "sd3":
        pytest.skip("SD3 only")
    _, loaded = load_model(
        ModelConfig(name=str(path), single_file_config=str(folder), drop_t5=True)
    )
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None


def test_without_a_config_folder_the_error_asks_for_one(checkpoint):
    _, _, _, path = checkpoint
    with pytest.raises(LorakitError, match=r"model\.single_file_config") as e:
        load_model(ModelConfig(name=str(path)))
    assert "text_encoder" in str(e.value)


def test_a_config_folder_of_another_size_is_a_clear_error(checkpoint, tmp_path):
    _, _, folder, path = checkpoint
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg_path = other / "transformer" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["num_layers"] += 1  # the file has one block fewer than this config
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(LorakitError, match="same architecture"):
        load_model(ModelConfig(name=str(path), single_file_config=str(other)))


def test_bfl_converter_equals_diffusers_on_the_real_inner_dim():
    """Our FLUX converter reads inner_dim from the config; at FLUX.1's inner_dim (3072, the value
    diffusers hard-codes) it must give exactly what diffusers' converter gives. Small tensors with
    the real row counts where the split depends on them, one block of each kind."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from lorakit.models.flux.names import transformer_from_original

    g = torch.Generator().manual_seed(0)
    inner, cols = 3072, 2

    def t(*shape):
        return torch.randn(*shape, generator=g)

    ck = {}
    for name in ("time_in", "vector_in", "guidance_in"):
        for layer in ("in_layer", "out_layer"):
            ck |= {f"{name}.{layer}.weight": t(4, cols), f"{name}.{layer}.bias": t(4)}
    for name in ("txt_in", "img_in", "final_layer.linear"):
        ck |= {f"{name}.weight": t(4, cols), f"{name}.bias": t(4)}
    ck |= {"final_layer.adaLN_modulation.1.weight": t(8, cols)}
    ck |= {"final_layer.adaLN_modulation.1.bias": t(8)}
    d = "model.diffusion_model.double_blocks.0."
    for s in ("img", "txt"):
        ck |= {f"{d}{s}_attn.qkv.weight": t(9, cols), f"{d}{s}_attn.qkv.bias": t(9)}
        for n in ("_mod.lin", "_mlp.0", "_mlp.2", "_attn.proj"):
            ck |= {f"{d}{s}{n}.weight": t(4, cols), f"{d}{s}{n}.bias": t(4)}
        for n in ("query_norm", "key_norm"):
            ck[f"{d}{s}_attn.norm.{n}.scale"] = t(2)
    s = "model.diffusion_model.single_blocks.0."
    ck |= {f"{s}linear1.weight": t(7 * inner, cols), f"{s}linear1.bias": t(7 * inner)}
    for n in ("modulation.lin", "linear2"):
        ck |= {f"{s}{n}.weight": t(4, cols), f"{s}{n}.bias": t(4)}
    ck |= {f"{s}norm.query_norm.scale": t(2), f"{s}norm.key_norm.scale": t(2)}

    ours = transformer_from_original(dict(ck), num_layers=1, num_single_layers=1, inner_dim=inner)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(ck))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_trains_tiny_flux_from_a_single_file(checkpoint, tmp_path):
    family, _, folder, path = checkpoint
    if family != "flux":
        pytest.skip("one family through the CLI is enough")
    out = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--model", path, "--out", out, "--steps", 2,
        "--set", f"model.single_file_config='{folder}'",
        "--set", "model.t5_max_length=16", "--set", "train.batch_size=1")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()
