"""Single-file `.safetensors` checkpoints (original ldm/SGM key names) for SD1.5 and SDXL."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from safetensors.torch import save_file
from single_file_writer import clip_to_ldm, to_original, vae_to_ldm

from lorakit.config import ModelConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.models import FAMILIES, load_model, resolve_family
from lorakit.models import single_file as sf

PARTS = {
    "sd15": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}
# Keys every real checkpoint of the family has (names checked against files from model sites).
REAL_KEYS = {
    "sd15": (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ),
    "sdxl": (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "first_stage_model.quant_conv.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.ln_final.weight",
    ),
}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def checkpoint(request, tmp_path_factory):
    """(family, tiny build, its diffusers folder, the same weights as one original-layout file)."""
    return _make(request.param, tmp_path_factory.mktemp(f"single-{request.param}"))


def _make(family, tmp):
    folder = tmp / "diffusers"
    cli("tiny-model", family, folder)
    built = FAMILIES[family].build_tiny(seed=0)
    path = tmp / f"tiny-{family}.safetensors"
    save_file(to_original(family, built), str(path))
    return family, built, folder, path


def _assert_same_weights(a, b, parts):
    for name in parts:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not differ, f"{name}: {differ[:5]}"


def test_file_has_original_key_names(checkpoint):
    family, _, _, path = checkpoint
    keys = set(sf.checkpoint_keys(path))
    assert set(REAL_KEYS[family]) <= keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    assert sf.detect_family(path) == family


def test_single_file_loads_identical_weights(checkpoint):
    family, built, folder, path = checkpoint
    cfg = ModelConfig(name=str(path), single_file_config=str(folder))
    fam, kind = resolve_family(cfg)
    assert (fam.name, kind) == (family, "single_file")
    fam, loaded = load_model(cfg)
    _assert_same_weights(built, loaded, PARTS[family])
    assert type(loaded.scheduler) is type(built.scheduler)
    # same tokenizers → same conditioning, bit for bit
    a = fam.encode_prompts(built, ["tdwl coffee cup", "a sun"])
    b = fam.encode_prompts(loaded, ["tdwl coffee cup", "a sun"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not m.training for m in fam.frozen_modules(loaded).values())


def test_single_file_family_mismatch_and_builtin_config_mismatch(checkpoint):
    family, _, folder, path = checkpoint
    other = "sdxl" if family == "sd15" else "sd15"
    with pytest.raises(ConfigError, match=f"is a {family} checkpoint"):
        load_model(ModelConfig(name=str(path), family=other, single_file_config=str(folder)))
    # The tiny file does not fit the built-in REAL configs: a clear error, not a traceback.
    with pytest.raises(LorakitError, match="same architecture"):
        load_model(ModelConfig(name=str(path)))


def test_cli_trains_sd15_from_a_single_file(tmp_path):
    _, _, folder, path = _make("sd15", tmp_path)
    out = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--model", path, "--out", out, "--steps", 2,
        "--set", f"model.single_file_config='{folder}'")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.ckpt", b"PK\x03\x04 pickle", "pickled checkpoint"),
        ("model.bin", b"\x80\x04 pickle", "pickled checkpoint"),
        ("notes.txt", b"hello", "not a .safetensors checkpoint"),
        ("broken.safetensors", b"\x00\x01garbage", "not a readable safetensors"),
    ],
)
def test_refused_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LorakitError, match=message):
        resolve_family(ModelConfig(name=str(path)))


def test_cli_refuses_a_pickle_without_traceback(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04 pickle")
    r = cli("train", SAMPLES, *FAST, "--model", path, "--out", tmp_path / "o", expect=1)
    assert "pickled checkpoint" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_a_lora_file_is_no_model(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LorakitError, match="match no family"):
        resolve_family(ModelConfig(name=str(path)))


def test_missing_config_folder_and_missing_tokenizer(tmp_path, checkpoint):
    _, _, _, path = checkpoint
    with pytest.raises(ConfigError, match="single_file_config"):
        load_model(ModelConfig(name=str(path), single_file_config=str(tmp_path / "nope")))
    # No tokenizer in the folder and none in the (offline) HF cache: explain, never download.
    with pytest.raises(LorakitError, match=r"model\.single_file_config") as e:
        sf.load_tokenizer(str(tmp_path), "tokenizer", "lorakit-test/not-cached", "x.safetensors")
    assert "does not download" in str(e.value)


def test_builtin_real_configs_load_real_sized_sd15_vae_and_clip():
    """The built-in configs (written to a temp folder, no network) load real-size SD1.5 VAE and
    CLIP-L weights stored under original key names, exactly."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.models.sd15 import SD15_VAE
    from lorakit.models.sd15 import names as fam_names
    from lorakit.models.text_encoders import CLIP_L_TEXT

    fam = FAMILIES["sd15"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**{k: v for k, v in SD15_VAE.items() if not k.startswith("_")})
    te = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    state = {**vae_to_ldm(vae), **clip_to_ldm(te, "cond_stage_model.transformer.")}
    read = fam_names.FROM_SINGLE_FILE
    with sf.config_folder(fam, "") as folder:
        got_vae = sf.load_converted(AutoencoderKL, state, folder, "vae", "real", read["vae"])
        got_te = sf.load_converted(
            CLIPTextModel, state, folder, "text_encoder", "x", read["text_encoder"]
        )
    for a, b in ((vae, got_vae), (te, got_te)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
