"""Text-encoder LoRA (family side): injection into every CLIP encoder, export with the
`lora_te_`/`lora_te1_`/`lora_te2_` prefixes and the `text_model.` level, and diffusers'
`load_lora_weights` reproducing text-encoder and UNet outputs of both formats."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorakit import config as cfg
from lorakit.config import LoraConfigSection
from lorakit.errors import ConfigError
from lorakit.export import EXPORTERS, write_adapter
from lorakit.lora import (
    extract_adapter,
    inject_lora,
    inject_text_encoder_lora,
    lora_layers,
    text_encoder_targets,
)
from lorakit.models import FAMILIES
from lorakit.spec import text_encoder_section

PROMPTS = ["tdwl coffee cup", "a sun over the sea"]
# every registered family with a CLIP text encoder (SD3: CLIP-L and CLIP-G; FLUX: CLIP-L; T5
# stays frozen everywhere): a new family is covered by registering it
TE_FAMILIES = [n for n, f in FAMILIES.items() if text_encoder_targets(f, f.build_tiny(seed=0))]
# diffusers' kohya converters read these families' kohya files (with diffusers names) exactly
DIFFUSERS_READS_KOHYA = {"sd15", "sdxl"}
TE_PREFIX = {
    name: {t.component: t.kohya_prefix for t in text_encoder_targets(f, f.build_tiny(seed=0))}
    for name, f in FAMILIES.items()
    if name in TE_FAMILIES
}


@torch.no_grad()
def _outputs(family, comps):
    """Text conditioning of fixed prompts and the denoiser's output on it (seeded inputs)."""
    fam = FAMILIES[family]
    den = getattr(comps, fam.denoiser_name)
    for m in (den, *(getattr(comps, c) for c in TE_PREFIX[family])):
        m.eval()
    cond = fam.encode_prompts(comps, PROMPTS)
    for k, v in fam.image_conditioning(comps, (64, 64), (0, 0), (64, 64)).items():
        cond[k] = torch.cat([v] * len(PROMPTS))
    g = torch.Generator().manual_seed(5)
    latents = fam.encode_images(comps, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)
    x, t = fam.noise_and_timesteps(comps, latents, g, cfg.resolve(preset="tiny-cpu").train)
    return {**cond, "denoiser": fam.predict(den, x, t, cond)}


@pytest.fixture(scope="module", params=TE_FAMILIES)
def te_adapter(request, tmp_path_factory):
    family = request.param
    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    lora = LoraConfigSection(
        rank=4, alpha=8.0, train_text_encoder=True, text_encoder_rank=2, text_encoder_alpha=3.0,
        text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        target_modules=list(fam.default_targets),
    )  # fmt: skip
    inject_lora(getattr(comps, fam.denoiser_name), lora, seed=0)
    params = inject_text_encoder_lora(fam, comps, text_encoder_section(lora), seed=0)
    assert params and all(p.requires_grad for p in params)
    # as after training: non-zero B everywhere (A is already random)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for comp in (fam.denoiser_name, *TE_PREFIX[family]):
            for _, layer in lora_layers(getattr(comps, comp)):
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    adapter = extract_adapter(fam, comps, {"ss_steps": "1"})
    out = tmp_path_factory.mktemp(f"te-{family}")
    files = {
        fmt: write_adapter(
            adapter, fmt, EXPORTERS[fmt].default_path(out, "brand"), naming="diffusers"
        )
        for fmt in ("kohya", "diffusers")
    }
    return family, comps, adapter, files


def test_gradients_reach_the_text_encoder_lora(te_adapter):
    family, comps, _, _ = te_adapter
    fam = FAMILIES[family]
    cond = fam.encode_prompts_train(comps, PROMPTS)
    loss = sum(v.float().pow(2).mean() for v in cond.values())
    loss.backward()
    for comp in TE_PREFIX[family]:
        # lora_A gets gradient because lora_B is non-zero. SDXL's text_encoder feeds only its
        # penultimate layer, so its last layer's LoRA gets none (as in every SDXL trainer).
        grads = [
            p.grad for n, p in getattr(comps, comp).named_parameters()
            if "lora_A" in n and "layers.0." in n
        ]  # fmt: skip
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), comp
    for comp in TE_PREFIX[family]:
        getattr(comps, comp).zero_grad(set_to_none=True)


def test_adapter_names_and_ranks(te_adapter):
    family, _, adapter, files = te_adapter
    fam = FAMILIES[family]
    for comp in TE_PREFIX[family]:
        paths = {p for c, p in adapter.modules if c == comp}
        layers = getattr(FAMILIES[family].build_tiny(), comp).config.num_hidden_layers
        assert len(paths) == 6 * layers
        assert paths < fam.known_modules(comp)
        assert all(p.startswith("text_model.encoder.layers.") for p in paths)
        assert adapter.rank_alpha(comp)[:2] == (2, 3.0)
    assert adapter.rank_alpha(fam.denoiser_name)[:2] == (4, 8.0)
    with safe_open(str(files["kohya"]), framework="pt") as f:
        keys = list(f.keys())
    for comp, prefix in TE_PREFIX[family].items():
        key = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.alpha"
        assert key in keys, (comp, key)
    with safe_open(str(files["diffusers"]), framework="pt") as f:
        keys = list(f.keys())
    for comp in TE_PREFIX[family]:
        assert f"{comp}.text_model.encoder.layers.0.mlp.fc1.lora_A.weight" in keys


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_reproduces_text_encoders_and_denoiser(te_adapter, fmt):
    family, comps, _, files = te_adapter
    if fmt == "kohya" and family not in DIFFUSERS_READS_KOHYA:
        pytest.skip(f"diffusers does not read {family} kohya files with diffusers names")
    expected = _outputs(family, comps)
    base = FAMILIES[family].build_tiny(seed=0)
    before = _outputs(family, base)
    FAMILIES[family].pipeline(base).load_lora_weights(str(files[fmt]))
    after = _outputs(family, base)
    for key, value in expected.items():
        assert (after[key] - value).abs().max().item() <= 1e-5, key
    # the LoRA must change the denoiser's output and some text conditioning (FLUX: only the
    # pooled CLIP-L output; its sequence embeddings come from T5, which has no LoRA)
    changed = {k for k, v in expected.items() if (before[k] - v).abs().max().item() > 1e-4}
    assert "denoiser" in changed and changed - {"denoiser", "time_ids"}, changed


def test_config_keys_and_no_clip_error():
    c = cfg.resolve(preset="tiny-cpu", sets=["lora.train_text_encoder=true"])
    assert c.lora.train_text_encoder and c.lora.text_encoder_rank == 0
    with pytest.raises(ConfigError, match="text_encoder_rank"):
        cfg.resolve(preset="tiny-cpu", sets=["lora.text_encoder_rank=-1"])

    class NoClip:
        name = "x"
        denoiser_name = "unet"
        targets = FAMILIES["sd15"].targets[:1]

    with pytest.raises(ConfigError, match="no CLIP text encoder"):
        inject_text_encoder_lora(NoClip(), object(), LoraConfigSection(), seed=0)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lorakit_reads_its_text_encoder_exports_back_exactly(te_adapter, fmt):
    from lorakit.export import read_adapter

    family, _, adapter, files = te_adapter
    back, found = read_adapter(files[fmt])
    assert found == fmt and back.family == family
    assert back.modules.keys() == adapter.modules.keys()
    folded = safe_open(str(files[fmt]), framework="pt").metadata().get("lorakit.strength")
    for key, w in adapter.modules.items():
        got = back.modules[key]
        if folded == "folded":  # alpha/rank multiplied into up, alpha = rank: the same ΔW
            torch.testing.assert_close(got.delta(), w.delta(), rtol=1e-6, atol=1e-7, msg=str(key))
            continue
        assert torch.equal(got.down, w.down) and torch.equal(got.up, w.up), key
        assert got.alpha == w.alpha, key
