"""Qwen-Image family: every training convention against `QwenImagePipeline`'s own code on the
same inputs (packing, latent normalisation, prompt encoding and its padding, the schedule's
shift), module tables, single-file loading, bad inputs, the presets and a CLI run with previews.
The denoiser call of a sampling step and memorisation (a LoRA trained on one image samples it
back): tests/test_agreement.py, as for every family."""

from __future__ import annotations

import json
import math
from functools import cache

import pytest
import torch
from conftest import FAST, SAMPLES, cli
from safetensors.torch import load_file, save_file

from lorakit.config import ModelConfig, TrainConfig
from lorakit.errors import LorakitError
from lorakit.models import FAMILIES, load_model
from lorakit.models import qwen_image as qi
from lorakit.models.flow import flux_mu, sample_sigmas

FAM = FAMILIES["qwen-image"]
CAPTIONS = ["tdwl coffee cup", "a teal wave over the sea, flat illustration, bold shapes"]


@cache
def tiny():
    return FAM.build_tiny(0)


def _linear_names(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


# --- conventions against the pipeline's own code -----------------------------------------------


def test_pack_unpack_match_the_pipeline():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = qi.pack_latents(x)
    assert packed.shape == (2, 15, 64)
    # prepare_latents draws [B, 1, C, h, w] and packs that; unpack returns [B, C, 1, h, w]
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x[:, None], 2, 16, 6, 10))
    assert torch.equal(qi.unpack_latents(packed, 6, 10), x)
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 48, 80, 8)[:, :, 0], x)
    assert qi.img_shapes(2, 6, 10) == [[(1, 3, 5)]] * 2


def test_latents_are_the_per_channel_normalisation_the_pipeline_decodes():
    c = tiny()
    px = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = FAM.encode_images(c, px)
    assert lat.shape == (1, 16, 8, 6)
    mean = c.vae.encode(px[:, :, None]).latent_dist.mean
    # the pipeline's decode input: latents / (1 / std) + mean
    std = 1.0 / torch.tensor(c.vae.config.latents_std).view(1, 16, 1, 1, 1)
    mu = torch.tensor(c.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    assert torch.allclose(lat[:, :, None] / std + mu, mean, atol=1e-5)
    assert c.vae.config.latents_std[0] == 2.8184  # the released per-channel values


def test_prompts_are_the_pipelines_embeddings_padded_to_a_fixed_length():
    """encode_prompts = QwenImagePipeline.encode_prompt (template, 34 prefix states dropped,
    last hidden state), padded with zeros/mask 0 to max_sequence_length; each caption's
    embedding is the same whatever it is batched with (so cached captions stack)."""
    c = tiny()
    cond = FAM.encode_prompts(c, CAPTIONS)
    e, m = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
    assert e.shape == (2, 512, qi.TINY_TEXT_DIM) and m.shape == (2, 512)
    pipe = FAM.pipeline(c)
    ref, ref_mask = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=512)
    n = ref.shape[1]
    assert torch.equal(e[:, :n], ref) and torch.equal(m[:, :n], ref_mask.float())
    assert not e[:, n:].any() and not m[:, n:].any()
    # the template prefix: 34 tokens, whose hidden states the pipeline drops
    template = pipe.prompt_template_encode
    assert len(c.tokenizer(template.split("{}")[0]).input_ids) == qi.PROMPT_PREFIX_TOKENS
    ids = c.tokenizer(template.format(CAPTIONS[0]), return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = c.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    length = int(m[0].sum())
    assert length == ids.shape[1] - 34
    assert torch.allclose(e[0, :length], hidden[34:], atol=1e-5)
    alone = FAM.encode_prompts(c, CAPTIONS[:1])
    assert torch.allclose(alone["encoder_hidden_states"], e[:1], atol=1e-5)
    assert torch.equal(alone["encoder_hidden_states_mask"], m[:1])


def test_padding_never_changes_the_prediction():
    """The padded, stacked cond gives the transformer's output on the pipeline's own (unpadded /
    pad-to-longest) embeddings; garbage in the padded positions changes nothing either."""
    c = tiny()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    cond = FAM.encode_prompts(c, CAPTIONS)
    ref, ref_mask = FAM.pipeline(c).encode_prompt(CAPTIONS, device="cpu")
    with torch.no_grad():
        ours = FAM.predict(c.transformer, x, t, cond)
        theirs = c.transformer(
            hidden_states=qi.pack_latents(x), timestep=t, encoder_hidden_states=ref,
            encoder_hidden_states_mask=ref_mask, img_shapes=qi.img_shapes(2, 8, 8),
            return_dict=False,
        )[0]  # fmt: skip
        noisy_pad = dict(cond)
        pad = cond["encoder_hidden_states_mask"] == 0
        noisy_pad["encoder_hidden_states"] = torch.where(
            pad[..., None], torch.randn_like(cond["encoder_hidden_states"]),
            cond["encoder_hidden_states"],
        )  # fmt: skip
        garbage = FAM.predict(c.transformer, x, t, noisy_pad)
        # and a caption alone (its mask all ones: no mask at all, as the pipeline passes it)
        single = FAM.encode_prompts(c, CAPTIONS[:1])
        one = FAM.predict(c.transformer, x[:1], t[:1], single)
    assert (ours - qi.unpack_latents(theirs, 8, 8)).abs().max().item() <= 1e-5
    assert (garbage - ours).abs().max().item() <= 1e-5
    assert (one - ours[:1]).abs().max().item() <= 1e-5
    hidden, mask = qi.trim_text(single["encoder_hidden_states"],
                                single["encoder_hidden_states_mask"])  # fmt: skip
    assert mask is None and hidden.shape[1] == int(single["encoder_hidden_states_mask"].sum())


def test_noise_and_timesteps_use_qwen_images_dynamic_shift():
    c = tiny()
    assert c.scheduler.config.max_image_seq_len == 8192 and c.scheduler.config.max_shift == 0.9
    lat = torch.zeros(3, 16, 128, 128)  # 1024 px → 4096 tokens → μ = 0.5 + 0.4·3840/7936
    noise, sig = FAM.noise_and_timesteps(c, lat, torch.Generator().manual_seed(9), TrainConfig())
    gen = torch.Generator().manual_seed(9)
    torch.randn(lat.shape, generator=gen)
    mu = flux_mu(4096, 256, 8192, 0.5, 0.9)
    assert abs(mu - 0.69355) < 1e-4
    assert torch.equal(sig, sample_sigmas(3, gen, "shift", 0.0, 1.0, mu))
    assert noise.shape == lat.shape
    # the constant `train.flow_shift` replaces it
    _, fixed = FAM.noise_and_timesteps(
        c, lat, torch.Generator().manual_seed(9), TrainConfig(flow_shift=3.0)
    )
    gen = torch.Generator().manual_seed(9)
    torch.randn(lat.shape, generator=gen)
    assert torch.allclose(fixed, sample_sigmas(3, gen, "shift", 0.0, 1.0, math.log(3.0)))


# --- module tables, tiny model, loading -----------------------------------------------------------


def test_module_table_matches_the_real_structure():
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    table = FAM.known_modules("transformer")
    assert len(table) == 6 + 60 * 14
    with init_empty_weights():  # real widths, 2 blocks: the names of every block are the same
        real = QwenImageTransformer2DModel(**dict(qi.QWEN_IMAGE_TRANSFORMER, num_layers=2))
    assert _linear_names(real) == qi._names.qwen_image_modules(2)
    assert _linear_names(tiny().transformer) < table
    for suffix in FAM.default_targets:
        assert sum(n.endswith("." + suffix) for n in table) == 60, suffix
    assert FAM.swap_blocks == ("transformer_blocks",)
    assert isinstance(getattr(tiny().transformer, FAM.swap_blocks[0]), torch.nn.ModuleList)


def test_local_folder_and_single_files_load_identical_weights(tmp_path):
    folder = tmp_path / "tiny"
    cli("tiny-model", "qwen-image", folder)
    assert (folder / "model_index.json").is_file() and not list(folder.rglob("*.bin"))
    built = tiny()
    loaded = FAM.load(str(folder), revision="", variant="", allow_pickle=False)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    e1 = FAM.encode_prompts(loaded, CAPTIONS)["encoder_hidden_states"]
    assert torch.allclose(e1, FAM.encode_prompts(built, CAPTIONS)["encoder_hidden_states"])
    # ComfyUI's diffusion-model file: diffusers names, bare or under model.diffusion_model.
    state = FAM.to_single_file(built)
    for prefix in ("", "model.diffusion_model."):
        path = tmp_path / f"qwen_image{prefix[:5]}.safetensors"
        save_file({prefix + k: v for k, v in state.items()}, str(path))
        fam, comps = load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
        assert fam is FAM
        got = comps.transformer.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()) and got.keys() == state.keys()
        x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.rand(1)
        cond = FAM.encode_prompts(comps, CAPTIONS[:1])
        with torch.no_grad():
            same = FAM.predict(comps.transformer, x, t, cond)
            diff = (same - FAM.predict(built.transformer, x, t, cond)).abs().max().item()
            assert diff <= 1e-6, diff


def test_bad_inputs_are_one_clear_paragraph(tmp_path):
    from lorakit.models.single_file import detect_family

    folder = tmp_path / "tiny"
    FAM.save(tiny(), str(folder))
    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file(FAM.to_single_file(tiny()), str(path))
    assert detect_family(path) == "qwen-image"
    # the diffusion-model file alone: the text encoder must come from a diffusers folder
    with pytest.raises(LorakitError, match=r"qwen_image_bf16\.safetensors.*text_encoder/.*"
                       r"qwen_2\.5_vl_7b.*model\.single_file_config"):  # fmt: skip
        load_model(ModelConfig(name=str(path)))
    # another family's checkpoint given as Qwen-Image
    other = tmp_path / "flux1.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(other))
    with pytest.raises(LorakitError, match=r"flux1\.safetensors' is a flux checkpoint.*'flux'"):
        load_model(
            ModelConfig(name=str(other), family="qwen-image", single_file_config=str(folder))
        )
    # a file with none of the transformer's keys (a LoRA, say)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(LorakitError, match=r"lora\.safetensors.*transformer weights are missing"):
        load_model(ModelConfig(name=str(lora), family="qwen-image", single_file_config=str(folder)))
    # an edit model's folder, recognised (family auto) or named as qwen-image
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps(dict(index, _class_name="QwenImageEditPlusPipeline"))
    )
    for family in ("auto", "qwen-image"):
        with pytest.raises(LorakitError, match=r"Qwen-Image-Edit.*not train edit.*Qwen/Qwen-Image"):
            load_model(ModelConfig(name=str(folder), family=family))
    (folder / "model_index.json").write_text(json.dumps(index))


def test_edit_single_files_are_refused_by_marker_or_name(tmp_path):
    """Qwen-Image-Edit transformers have the base model's keys and shapes exactly: ComfyUI's
    2511 file is told apart by its marker tensor, the others by the name they are published
    under. A base-model file given under another name (a link) loads."""
    folder = tmp_path / "tiny"
    FAM.save(tiny(), str(folder))
    weights = FAM.to_single_file(tiny())
    marked = tmp_path / "model_2511_bf16.safetensors"
    save_file({**weights, "model.diffusion_model.__index_timestep_zero__": torch.tensor([])},
              str(marked))  # fmt: skip
    named = tmp_path / "qwen_image_edit_2509_fp8_e4m3fn.safetensors"
    save_file(weights, str(named))
    for path, why in ((marked, "__index_timestep_zero__"), (named, "file name")):
        with pytest.raises(LorakitError, match=rf"(?s){path.name}.*Qwen-Image-Edit.*{why}.*"
                           r"not train edit.*Qwen/Qwen-Image"):  # fmt: skip
            load_model(ModelConfig(name=str(path), single_file_config=str(folder)))
    link = tmp_path / "qwen_image_bf16.safetensors"
    link.symlink_to(named)
    _, comps = load_model(ModelConfig(name=str(link), single_file_config=str(folder)))
    assert torch.equal(comps.transformer.proj_out.weight, tiny().transformer.proj_out.weight)


# --- ComfyUI's split text encoder and VAE ---------------------------------------------------------
# The layouts below are written from ComfyUI's own module trees, not from lorakit's reader:
# - Qwen2.5-VL: `Qwen25_7BVLI` (comfy/text_encoders/llama.py) holds `self.model = Llama2_(…)`
#   (embed_tokens, layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
#   input_layernorm, post_attention_layernorm, norm) and `self.visual =
#   qwen_vl.Qwen2VLVisionTransformer(…)` (comfy/text_encoders/qwen_vl.py: patch_embed.proj,
#   blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,mlp.*}, merger.{ln_q,mlp.0,mlp.2}); no LM head
#   (ComfyUI loads the file non-strictly, so a file may carry the HF checkpoint's lm_head.weight).
# - VAE: `WanVAE` (comfy/ldm/wan/vae.py): encoder/decoder `conv1`, flat `downsamples` /
#   `upsamples` Sequentials (decoder: num_res_blocks + 1 ResidualBlocks per level, then a
#   Resample except after the last), `middle` = [ResidualBlock, AttentionBlock, ResidualBlock],
#   `head` = [RMS_norm, SiLU, CausalConv3d], ResidualBlock.residual = [RMS_norm, SiLU,
#   CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d] + `shortcut`; top-level conv1 / conv2.
#   comfy/sd.py picks it by decoder.middle.0.residual.0.gamma.


def _comfy_qwen25_vl(te, visual: bool = True, lm_head: bool = True) -> dict:
    """transformers 5's `Qwen2_5_VLForConditionalGeneration` → ComfyUI's file (see above)."""
    out = {}
    for key, value in te.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.visual.") and visual:
            out["visual." + key.removeprefix("model.visual.")] = value
        elif key == "lm_head.weight" and lm_head:
            out[key] = value
    return {k: v.contiguous() for k, v in out.items()}


_WAN_RESIDUAL = (
    ("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"), ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."),
)  # fmt: skip


def _wan_original_name(key: str, num_res_blocks: int) -> str:
    """One `AutoencoderKLQwenImage` key → its name in ComfyUI's WanVAE (see above)."""
    import re

    def block(rest):
        for new, old in _WAN_RESIDUAL:
            if rest.startswith(new):
                return old + rest.removeprefix(new)
        return rest  # resample.1.*, time_conv.*, attention norm/to_qkv/proj

    rules = [
        (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}"),
        (r"(\w+)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(\w+)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(\w+)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(\w+)\.mid_block\.resnets\.(\d)\.(.*)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{block(m[3])}"),
        (r"(\w+)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.*)",
         lambda m: f"encoder.downsamples.{m[1]}.{block(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}."
                   f"{block(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
         lambda m: f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}."
                   f"{m[2]}"),
    ]  # fmt: skip
    for pattern, name in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return name(m)
    raise AssertionError(key)


def _wan_original(vae) -> dict:
    n = vae.config.num_res_blocks
    return {_wan_original_name(k, n): v.contiguous() for k, v in vae.state_dict().items()}


def test_wan_vae_names_agree_with_diffusers_converter_and_comfyui():
    """On the released VAE config (meta device), ComfyUI's names (written from comfy's WanVAE)
    convert back to diffusers' names both by diffusers' own `convert_wan_vae_to_diffusers` and
    by lorakit's reader; on the tiny one (1 residual block, which diffusers' converter does not
    handle) by lorakit's reader."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from lorakit.models.qwen_image import names

    with torch.device("meta"):
        real = AutoencoderKLQwenImage(**qi.QWEN_IMAGE_VAE)
    keys = list(real.state_dict())
    original = {_wan_original_name(k, 2): k for k in keys}  # original name → diffusers name
    assert len(original) == len(keys) == 194
    # names ComfyUI's WanVAE has (the 3rd decoder entry is level 0's upsampler; 4 = level 1's
    # first residual block, the only decoder block with a shortcut)
    for k in ("conv1.weight", "conv2.bias", "encoder.conv1.weight", "decoder.head.2.weight",
              "decoder.middle.0.residual.0.gamma", "decoder.middle.1.to_qkv.weight",
              "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
              "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.4.shortcut.weight",
              "decoder.upsamples.14.residual.6.weight"):  # fmt: skip
        assert k in original, k
    assert convert_wan_vae_to_diffusers(original) == {v: v for v in original.values()}
    assert names.vae_from_original(original, 2) == {v: v for v in original.values()}
    tiny_keys = list(tiny().vae.state_dict())
    tiny_original = {_wan_original_name(k, 1): k for k in tiny_keys}
    assert names.vae_from_original(tiny_original, 1) == {k: k for k in tiny_keys}


def _comfy_split_folder(tmp_path, comps, **te):
    """ComfyUI's split files (text_encoders/qwen_2.5_vl_7b, vae/qwen_image_vae) each alone in
    its subfolder of model.single_file_config, with the tokenizer/ lorakit needs besides and the
    tiny configs (the built-in ones are the real model's); the diffusion-model file beside."""
    folder = tmp_path / "cfg"
    for sub in ("text_encoder", "vae"):
        (folder / sub).mkdir(parents=True)
    te_file = folder / "text_encoder" / "qwen_2.5_vl_7b.safetensors"
    save_file(_comfy_qwen25_vl(comps.text_encoder, **te), str(te_file))
    save_file(_wan_original(comps.vae), str(folder / "vae" / "qwen_image_vae.safetensors"))
    comps.tokenizer.save_pretrained(str(folder / "tokenizer"))
    comps.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    for sub, model in (("transformer", comps.transformer), ("vae", comps.vae)):
        model.save_config(str(folder / sub))
    dm = tmp_path / "qwen_image_bf16.safetensors"
    save_file(FAM.to_single_file(comps), str(dm))
    return dm, folder


def test_comfyui_split_text_encoder_and_vae_files_load_identical_weights(tmp_path):
    built = tiny()
    dm, folder = _comfy_split_folder(tmp_path, built)
    te_keys = set(load_file(str(folder / "text_encoder" / "qwen_2.5_vl_7b.safetensors")))
    assert {"model.layers.0.self_attn.k_proj.bias", "model.norm.weight", "lm_head.weight",
            "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.2.weight"} <= te_keys  # fmt: skip
    fam, comps = load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
    assert fam is FAM
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(comps, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    e1, e2 = FAM.encode_prompts(comps, CAPTIONS), FAM.encode_prompts(built, CAPTIONS)
    assert all(torch.equal(e1[k], e2[k]) for k in e2)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(FAM.encode_images(comps, pixels), FAM.encode_images(built, pixels))
    # a file with the language model only: the LM head is tied to the embedding, the vision
    # tower (never run for text-to-image) zeros, and the prompt embeddings stay identical
    dm, folder = _comfy_split_folder(tmp_path / "lm", built, visual=False, lm_head=False)
    _, comps = load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
    a, b = comps.text_encoder.state_dict(), built.text_encoder.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith("model.language_model."))
    assert all(not a[k].any() for k in a if k.startswith("model.visual."))
    assert torch.equal(a["lm_head.weight"], b["model.language_model.embed_tokens.weight"])
    te = comps.text_encoder  # tied, not a copy: no second 152064 × 3584 matrix for the real model
    assert te.lm_head.weight.data_ptr() == te.model.language_model.embed_tokens.weight.data_ptr()
    assert te.config.tie_word_embeddings  # so save_pretrained writes it once and reloads it tied
    e1 = FAM.encode_prompts(comps, CAPTIONS)
    assert all(torch.equal(e1[k], e2[k]) for k in e2)


def test_wrong_split_files_and_a_missing_text_encoder_are_one_clear_paragraph(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import Qwen3Model

    from lorakit.models import ldm_names
    from lorakit.models.vae import tiny_flow_vae
    from lorakit.models.z_image import tiny_qwen3_config

    built = tiny()
    dm, folder = _comfy_split_folder(tmp_path, built)
    te_file = folder / "text_encoder" / "qwen_2.5_vl_7b.safetensors"
    vae_file = folder / "vae" / "qwen_image_vae.safetensors"

    def error() -> str:
        with pytest.raises(LorakitError) as e:
            load_model(ModelConfig(name=str(dm), single_file_config=str(folder)))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    good_te, good_vae = te_file.read_bytes(), vae_file.read_bytes()
    # a Qwen3 file (ComfyUI's qwen_3_4b.safetensors: `model.` + Qwen3) in text_encoder/
    qwen3 = Qwen3Model(tiny_qwen3_config(len(built.tokenizer)))
    save_file({"model." + k: v.contiguous() for k, v in qwen3.state_dict().items()}, str(te_file))
    msg = error()
    assert str(te_file) in msg and "Qwen3 text encoder" in msg
    assert "qwen_2.5_vl_7b.safetensors" in msg and "Qwen/Qwen-Image" in msg
    te_file.write_bytes(good_te)
    # FLUX's ae.safetensors (ldm names) in vae/
    flux_vae = AutoencoderKL(**tiny_flow_vae(0.1159, 0.3611))
    ae = {k.removeprefix("first_stage_model."): v.contiguous()
          for k, v in ldm_names.vae_to_ldm(flux_vae).items()}  # fmt: skip
    save_file(ae, str(vae_file))
    msg = error()
    assert str(vae_file) in msg and "FLUX's ae.safetensors" in msg
    assert "qwen_image_vae.safetensors" in msg
    vae_file.write_bytes(good_vae)
    # a scaled-fp8 text encoder (ComfyUI's *_fp8_scaled: `scaled_fp8` marker) missing its
    # per-layer scales (complete fp8 files load: test_split_files_at_the_top_level_and_in_fp8)
    fp8 = _comfy_qwen25_vl(built.text_encoder)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in fp8.items()}
    fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, str(te_file))
    msg = error()
    assert str(te_file) in msg and "scale_weight" in msg and "bf16" in msg
    # no text encoder: named with the file to put there, nothing else reported missing
    te_file.unlink()
    msg = error()
    assert str(dm) in msg and "text_encoder/" in msg and "qwen_2.5_vl_7b.safetensors" in msg
    assert "vae/" not in msg.split("Set")[0]


# --- export: the files ComfyUI and diffusers read -------------------------------------------------


def test_exports_use_musubi_and_comfyui_names_and_reload_in_diffusers(tmp_path):
    from safetensors import safe_open

    from lorakit.config import LoraConfigSection
    from lorakit.export import read_adapter, write_adapter
    from lorakit.lora import extract_adapter, inject_lora

    c = FAM.build_tiny(0)
    lora = LoraConfigSection(rank=4, alpha=8.0, target_modules=[*FAM.default_targets, "img_mod.1"])
    params = inject_lora(c.transformer, lora, 0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    adapter = extract_adapter(FAM, c, {"lorakit.family": FAM.name})
    kohya = write_adapter(adapter, "kohya", tmp_path / "k.safetensors")
    with safe_open(str(kohya), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_unet_transformer_blocks_1_txt_mlp_net_0_proj.alpha" in keys
    assert meta["ss_base_model_version"] == "qwen_image"
    assert meta["modelspec.architecture"] == "qwen-image/lora"
    back, _ = read_adapter(kohya)
    assert back.family == "qwen-image" and back.modules.keys() == adapter.modules.keys()
    # a musubi-tuner file (same keys, no lorakit metadata) is read as Qwen-Image by its keys
    musubi = tmp_path / "musubi.safetensors"
    with safe_open(str(kohya), "pt") as f:
        save_file({k: f.get_tensor(k) for k in keys}, str(musubi),
                  {"ss_base_model_version": "qwen_image"})  # fmt: skip
    assert read_adapter(musubi)[0].family == "qwen-image"
    # without any metadata, real-depth keys decide (block 59: no SD3/FLUX has it)
    bare = {}
    for i in (0, 59):
        b = f"lora_unet_transformer_blocks_{i}_attn_add_k_proj"
        bare[f"{b}.lora_down.weight"] = torch.zeros(2, 3072)
        bare[f"{b}.lora_up.weight"] = torch.zeros(3072, 2)
        bare[f"{b}.alpha"] = torch.tensor(2.0)
    save_file(bare, str(tmp_path / "bare.safetensors"))
    assert read_adapter(tmp_path / "bare.safetensors")[0].family == "qwen-image"
    # resize keeps the names and the family
    cli("resize", kohya, "--rank", 2, "--out", tmp_path / "r.safetensors")
    small, _ = read_adapter(tmp_path / "r.safetensors")
    assert small.family == "qwen-image" and small.modules.keys() == adapter.modules.keys()
    assert {w.down.shape[0] for w in small.modules.values()} == {2}


MATRIX_TARGETS = [*qi.QwenImage.default_targets, "img_mod.1", "norm_out.linear", "img_in"]


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_every_format_loads_in_comfyui_at_the_trained_strength(tmp_path, kind):
    """tests/loaders.py's ComfyUI rules (its QwenImage branch: `lora_unet_`, `diffusion_model.`,
    `transformer.`, `lycoris_`, bare paths) over every format lorakit writes for Qwen-Image: every
    key read, every trained ΔW applied at strength 1 (alpha ≠ rank, `to_k` at rank 2); the
    diffusers file also through diffusers' own `load_lora_weights`. Forge has no Qwen-Image."""
    import loaders
    from safetensors.torch import load_file
    from test_export_matrix import Trained, check_diffusers, check_loader

    from lorakit.config import LoraConfigSection
    from lorakit.export import loads_in, write_adapter
    from lorakit.lora import canonical_name, extract_adapter, inject_lora, lora_layers

    comps = FAM.build_tiny(0)
    weights = {
        ("transformer", n): m.weight.detach().clone()
        for n, m in comps.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    model = loaders.build_model("qwen-image", weights, dict(comps.transformer.config))
    targets = [t for t in MATRIX_TARGETS if kind != "dora" or t != "norm_out.linear"]
    cfg = LoraConfigSection(
        rank=4, alpha=8.0, target_modules=targets, type="lora" if kind == "dora" else kind,
        use_dora=kind == "dora", rank_pattern={"to_k": 2}, alpha_pattern={"add_v_proj": 3.0},
    )  # fmt: skip
    params = inject_lora(comps.transformer, cfg, 0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    adapter = extract_adapter(FAM, comps, {"lorakit.family": FAM.name})
    delta, magnitude = {}, {}
    target = FAM.targets[0]
    for name, layer in lora_layers(comps.transformer):
        cp = ("transformer", canonical_name(target, name))
        with torch.no_grad():
            delta[cp] = layer.get_delta_weight("default").float()
            if kind == "dora":
                magnitude[cp] = layer.lora_magnitude_vector["default"].weight.detach().clone()
    t = Trained(adapter, delta, magnitude)
    layouts = [("lycoris", "-")]
    if kind == "lora":
        layouts += [("kohya", "original"), ("kohya", "diffusers"), ("diffusers", "-")]
    for fmt, naming in layouts:
        kwargs = {"naming": naming} if naming != "-" else {}
        path = write_adapter(adapter, fmt, tmp_path / f"{fmt}-{naming}.safetensors", **kwargs)
        assert "ComfyUI" in loads_in(fmt, FAM.name, "original" if naming == "-" else naming)
        check_loader("comfyui", load_file(str(path)), t, model, "fp32")
        if fmt == "diffusers":
            check_diffusers(path, t, FAM.name, "fp32")


# --- presets and the CLI -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["qwen-image-12gb", "qwen-image-16gb", "qwen-image-24gb"])
def test_preset_loads_and_its_cpu_settings_train_tiny_qwen_image(tmp_path, preset):
    from lorakit import config as cfg
    from lorakit.train import train

    c = cfg.resolve(preset=preset)
    assert c.model.name == "Qwen/Qwen-Image" and c.model.quantize == "nf4"
    assert c.train.mixed_precision == "bf16" and c.train.timestep_sampling == "shift"
    c = cfg.resolve(
        preset=preset,
        sets=[
            "model.name='tiny:qwen-image'", "model.quantize='none'", "model.t5_max_length=32",
            "data.resolution=64", "train.steps=1", "train.batch_size=1", "train.grad_accum=1",
            "train.device='cpu'", "train.mixed_precision='no'", "sample.every=0",
            "train.save_every=0", "train.optimizer_fallback=true",
            f"train.out='{tmp_path / 'run'}'",
            # the preset's streaming settings, at the tiny model's 2 blocks
            f"train.block_swap={min(c.train.block_swap, 2)}",
        ],
    )  # fmt: skip
    result = train(c, SAMPLES)
    assert set(result.adapters) >= {"kohya"}
    assert all(math.isfinite(v) for v in result.losses.values())


def test_cli_trains_with_previews_on_captions_of_different_lengths(tmp_path):
    out = tmp_path / "run"
    cli(
        "train", SAMPLES, *FAST, "--model", "tiny:qwen-image", "--out", out, "--steps", 2,
        "--set", "sample.every=2", "--set", "sample.seeds=[0]", "--set", "train.batch_size=2",
        "--set", "model.t5_max_length=64", "--set", "data.resolution=64",
    )  # fmt: skip
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step-000000.png",
        "step-000002.png",
    ]
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("layout", ["plain", "scaled_fp8"])
def test_split_files_at_the_top_level_and_in_fp8_load(tmp_path, layout):
    """The one split-file convention (`single_file.split_file`): ComfyUI's text-encoder and VAE
    files may lie in model.single_file_config itself, recognised by their keys; fp8 files
    (plain e4m3, or scaled with per-layer scales) are widened as they are read."""
    from test_fp8_files import SCALED_REL_ERROR, plain, scaled

    built = tiny()
    dm, folder = _comfy_split_folder(tmp_path, built)
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
