"""Single-file loading derives from the same naming tables as `to_single_file` (`merge
--single-file`): original → diffusers by `names.FROM_SINGLE_FILE` (SD1.5 / SDXL: ldm UNet, VAE,
CLIP-L, OpenCLIP bigG), `sd3.names.read_transformer` (MMDiT) and `ldm_names.vae_from_ldm` (the
VAE of every family). Checked three ways: a tiny model written as a file loads back with
identical weights; on the same file the tables give exactly what diffusers' own single-file
converters give (kept here as the reference only); at REAL width (meta device) the tables map
every key both ways. Keys no table maps are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from test_real_key_coverage import SD35_MEDIUM

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.models import FAMILIES, load_model
from lorakit.models import ldm_names as ldm
from lorakit.models import single_file as sf
from lorakit.models.naming import from_original
from lorakit.models.sd3 import names as sd3_names
from lorakit.models.sd15 import names as sd15_names
from lorakit.models.sdxl import names as sdxl_names

READ_VAE = from_original(ldm.VAE_PREFIX, ldm.vae_from_ldm)


def _parts(family: str) -> dict:
    """component → (class, table converter) of what a `family` single file carries."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family in ("sd3", "flux"):
        out = {"vae": (AutoencoderKL, READ_VAE)}
        if family == "sd3":  # FLUX's transformer: see test_single_file_flow
            out["transformer"] = (SD3Transformer2DModel, sd3_names.read_transformer)
        return out
    names = sd15_names if family == "sd15" else sdxl_names
    classes = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    return {sub: (classes[sub], conv) for sub, conv in names.FROM_SINGLE_FILE.items()}


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {differ[:5]}"


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux"])
def tiny_file(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"names-{family}")
    fam = FAMILIES[family]
    built = fam.build_tiny(seed=0)
    fam.save(built, str(tmp / "folder"))
    save_file(fam.to_single_file(built), str(tmp / "model.safetensors"))
    return family, built, tmp / "folder", tmp / "model.safetensors"


def test_single_file_loads_identical_weights(tiny_file):
    family, built, folder, path = tiny_file
    _, loaded = load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
    for sub in (*_parts(family), "transformer") if family == "flux" else _parts(family):
        state = getattr(loaded, sub).state_dict()
        _same(state, getattr(built, sub).state_dict(), sub)
        # split fused weights got their own storage: the model can be saved (safetensors)
        storages = [v.untyped_storage().data_ptr() for v in state.values()]
        assert len(set(storages)) == len(storages), sub


def _diffusers_reference(cls, checkpoint, folder, sub):
    """What diffusers' own single-file converters make of the checkpoint (lorakit's loader
    before the tables)."""
    from diffusers import FromOriginalModelMixin
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    kw = dict(config=str(folder), subfolder=sub, local_files_only=True, torch_dtype=torch.float32)
    if issubclass(cls, FromOriginalModelMixin):
        return cls.from_single_file(dict(checkpoint), **kw)
    return create_diffusers_clip_model_from_ldm(cls, dict(checkpoint), **kw)


def test_tables_equal_diffusers_converters(tiny_file):
    family, _, folder, path = tiny_file
    checkpoint = sf.read_checkpoint(path)
    for sub, (cls, convert) in _parts(family).items():
        ours = sf.load_converted(cls, checkpoint, str(folder), sub, str(path), convert)
        ref = _diffusers_reference(cls, checkpoint, folder, sub)
        _same(ours.state_dict(), ref.state_dict(), f"{family} {sub}")


def _meta_components(family: str, config: dict | None = None):
    fam = FAMILIES[family]
    with torch.device("meta"):
        comps = dict(fam.build_real_frozen(drop_t5=True))
        if family == "sd3":
            from diffusers import SD3Transformer2DModel

            comps["transformer"] = (
                SD3Transformer2DModel(**config) if config else fam.build_real_denoiser()
            )
        else:
            comps["unet"] = fam.build_real_denoiser()
    return SimpleNamespace(**comps)


SD3_MEDIUM = SD35_MEDIUM | dict(dual_attention_layers=(), qk_norm=None, pos_embed_max_size=192)


@pytest.mark.parametrize(
    ("family", "config"),
    [("sd15", None), ("sdxl", None), ("sd3", None), ("sd3", SD35_MEDIUM), ("sd3", SD3_MEDIUM)],
    ids=["sd15", "sdxl", "sd35-large", "sd35-medium", "sd3-medium"],
)
def test_real_width_keys_map_both_ways(family, config):
    """The real architectures on the meta device: every weight written by `to_single_file` is read
    back by the tables (nothing left unread under a component's prefix: that would raise), to
    every parameter of the model, with its shape."""
    comps = _meta_components(family, config)
    checkpoint = FAMILIES[family].to_single_file(comps)
    assert any(k.startswith("model.diffusion_model.") for k in checkpoint)
    for sub, (_, convert) in _parts(family).items():
        model = getattr(comps, sub)
        state, got = model.state_dict(), convert(model, checkpoint)
        assert got.keys() == state.keys(), sub
        bad = [k for k in state if got[k].shape != state[k].shape]
        assert not bad, f"{sub}: {bad[:5]}"


def test_unknown_keys_are_refused_known_extras_are_not(tiny_file, tmp_path):
    family, _, folder, path = tiny_file
    checkpoint = sf.read_checkpoint(path)
    extra = {}
    if family != "flux":  # ldm-style files carry the noise schedule (not a weight); FLUX files
        extra["alphas_cumprod"] = torch.ones(3)  # have no prefix: every other key is the model's
    if family == "sd15":
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.ones(2)
    if family == "sdxl":
        extra["conditioner.embedders.1.model.logit_scale"] = torch.ones(())
    ok = tmp_path / "ok.safetensors"
    save_file(checkpoint | extra, str(ok))
    load_model(ModelConfig(name=str(ok), single_file_config=str(folder)))

    denoiser = {
        "sd15": "model.diffusion_model.input_blocks.1.1.extra.weight",
        "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.extra.weight",
        "sd3": "model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight",
        "flux": "double_blocks.0.img_attn.extra.weight",  # FLUX files have no prefix
    }[family]
    for unknown in (denoiser, "first_stage_model.encoder.extra.weight"):
        bad = tmp_path / "bad.safetensors"
        save_file(checkpoint | {unknown: torch.ones(2)}, str(bad))
        with pytest.raises(LorakitError, match="no naming table maps") as e:
            load_model(ModelConfig(name=str(bad), single_file_config=str(folder)))
        assert unknown.rsplit(".", 3)[-3] + ".extra.weight" in str(e.value)  # names the key


def _diffusers_converter(family: str, sub: str, model, checkpoint: dict) -> dict | None:
    """diffusers' own original → diffusers state-dict converter for `sub` (None: a plain
    prefix strip, CLIP-L)."""
    from diffusers.loaders import single_file_utils as su

    ck = dict(checkpoint)  # some of them pop keys
    if sub == "unet":
        return su.convert_ldm_unet_checkpoint(ck, dict(model.config))
    if sub == "vae":
        return su.convert_ldm_vae_checkpoint(ck, dict(model.config))
    if sub == "text_encoder_2":
        return su.convert_open_clip_checkpoint(model, ck, prefix=sdxl_names.OPENCLIP_PREFIX)
    if sub == "transformer":
        ck = {k: v for k, v in ck.items() if k.startswith("model.diffusion_model.")}
        return su.convert_sd3_transformer_checkpoint_to_diffusers(ck)
    return None


@pytest.mark.parametrize(
    ("family", "config"),
    [("sd15", None), ("sdxl", None), ("sd3", None), ("sd3", SD35_MEDIUM)],
    ids=["sd15", "sdxl", "sd35-large", "sd35-medium"],
)
def test_real_width_tables_match_diffusers_converters(family, config):
    """At real width (meta tensors, so no values): the tables and diffusers' converters give the
    same keys and shapes, and where both pass a checkpoint tensor through unchanged (a rename),
    the very same tensor — the same original key."""
    comps = _meta_components(family, config)
    checkpoint = FAMILIES[family].to_single_file(comps)
    stored = {id(v) for v in checkpoint.values()}
    for sub, (_, convert) in _parts(family).items():
        model = getattr(comps, sub)
        theirs = _diffusers_converter(family, sub, model, checkpoint)
        if theirs is None:
            continue
        ours = convert(model, checkpoint)
        assert ours.keys() == theirs.keys(), sub
        renamed = [k for k in ours if id(ours[k]) in stored and id(theirs[k]) in stored]
        assert renamed, sub
        assert all(ours[k] is theirs[k] for k in renamed), sub
        assert all(ours[k].shape == theirs[k].shape for k in ours), sub
