"""kohya sd-scripts FLUX LoRAs trained with `train_t5xxl=True`: their T5 keys (`lora_te3_…`) are
read, shown by `inspect`, applied to the T5 encoder, and carried through `export`.

The file is built from sd-scripts' own key names (networks/lora_flux.py: prefix `lora_te3`, every
Linear of `T5Attention` and `T5DenseGatedActDense`, `.` → `_`; transformer keys in BFL names)
at the tiny FLUX model's widths, with sd-scripts' metadata.
"""

from __future__ import annotations

import json

import torch
from conftest import cli
from safetensors.torch import load_file, save_file

from lorakit.export import read_adapter
from lorakit.lora import LoraWeights, apply_adapter
from lorakit.merge import merge_into
from lorakit.models import FAMILIES

R = 4
INNER, T5_DIM, T5_FF, CLIP = 32, 32, 64, 32  # tiny FLUX: 2 heads x 16, T5 d_model/d_ff, CLIP-L
T5_MODULES = {  # sd-scripts T5 module → (out, in) at the tiny T5's widths
    **{f"layer_0_SelfAttention_{p}": (T5_DIM, T5_DIM) for p in "qkvo"},
    "layer_1_DenseReluDense_wi_0": (T5_FF, T5_DIM),
    "layer_1_DenseReluDense_wi_1": (T5_FF, T5_DIM),
    "layer_1_DenseReluDense_wo": (T5_DIM, T5_FF),
}
OTHER_MODULES = {
    "lora_unet_double_blocks_0_img_attn_qkv": (3 * INNER, INNER),
    "lora_unet_double_blocks_0_txt_attn_proj": (INNER, INNER),
    "lora_unet_single_blocks_1_linear2": (INNER, INNER + 4 * INNER),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (CLIP, CLIP),
}


def _t5_keys() -> dict[str, tuple[int, int]]:
    return {f"lora_te3_encoder_block_{i}_{m}": s for i in (0, 1) for m, s in T5_MODULES.items()}


def sd_scripts_flux_t5_file(path):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for key, (out, inp) in {**OTHER_MODULES, **_t5_keys()}.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(R, inp, generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, R, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    meta = {
        "ss_base_model_version": "flux1",
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(R),
        "ss_network_alpha": "2.0",
        "ss_network_args": json.dumps({"train_t5xxl": "True"}),
    }
    save_file(tensors, str(path), metadata=meta)
    return tensors


def test_inspect_lists_t5_modules_as_kept_and_exits_zero(tmp_path):
    f = tmp_path / "flux_t5.safetensors"
    sd_scripts_flux_t5_file(f)
    r = cli("inspect", f)
    assert "family:      flux" in r.output
    assert "T5-XXL (text_encoder_2): 14 modules, kept; lorakit does not train T5-XXL" in r.output
    assert r.output.count("every key maps to a module of flux: yes") == 1
    assert "another" not in r.output
    info = json.loads(cli("inspect", f, "--json").output)
    assert info["components"]["text_encoder_2"] == {
        "modules": 14,
        "label": "T5-XXL",
        "trained": False,
    }
    assert info["components"]["transformer"]["modules"] == 3 and info["unmapped"] == []


def test_export_round_trips_keep_the_t5_modules(tmp_path):
    f = tmp_path / "flux_t5.safetensors"
    stored = sd_scripts_flux_t5_file(f)
    r = cli("export", f, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert "another" not in r.output
    again = load_file(tmp_path / "k.safetensors")
    t5 = [k for k in stored if k.startswith("lora_te3_")]
    assert len(t5) == 14 * 3
    for k in t5:  # 1:1 modules: the very same tensors come back
        assert torch.equal(again[k], stored[k]), k
    # kohya → lycoris → kohya keeps every T5 update exactly
    d, k2 = tmp_path / "l.safetensors", tmp_path / "k2.safetensors"
    cli("export", f, "--format", "lycoris", "--out", d)
    cli("export", d, "--format", "kohya", "--out", k2)
    original, _ = read_adapter(f)
    for path in (d, k2):
        back, _ = read_adapter(path)
        assert back.family == "flux" and set(back.modules) == set(original.modules)
        for key, w in original.modules.items():
            torch.testing.assert_close(back.modules[key].delta(), w.delta(), msg=str(key))
    t5_modules = [k for k in original.modules if k[0] == "text_encoder_2"]
    assert len(t5_modules) == 14
    assert ("text_encoder_2", "encoder.block.1.layer.1.DenseReluDense.wi_0") in original.modules


def test_diffusers_format_is_refused_for_t5_modules_and_all_skips_it(tmp_path):
    # diffusers ignores `text_encoder_2.` T5 keys, ComfyUI drops them and Forge skips the file
    f = tmp_path / "flux_t5.safetensors"
    sd_scripts_flux_t5_file(f)
    r = cli("export", f, "--format", "diffusers", "--out", tmp_path / "d.safetensors", expect=1)
    assert "--format kohya" in r.output and "text_encoder_2" in r.output
    assert not (tmp_path / "d.safetensors").exists()
    cli("export", f, "--format", "all", "--out", tmp_path / "all")
    written = sorted(p.name for p in (tmp_path / "all").rglob("*.safetensors"))
    assert written == ["flux_t5.lycoris.safetensors", "flux_t5.safetensors"]


@torch.no_grad()
def _t5_out(comps):
    ids = comps.tokenizer_2(["a red cup on a table"], return_tensors="pt").input_ids
    return comps.text_encoder_2(ids).last_hidden_state


def test_t5_modules_are_applied_to_a_loaded_t5_encoder(tmp_path):
    f = tmp_path / "flux_t5.safetensors"
    sd_scripts_flux_t5_file(f)
    adapter, _ = read_adapter(f)
    fam = FAMILIES["flux"]
    base = _t5_out(fam.build_tiny(0))
    applied = fam.build_tiny(0)
    apply_adapter(fam, applied, adapter)
    merged = fam.build_tiny(0)
    assert merge_into(fam, merged, [(adapter, 1.0)]) == len(adapter.modules)
    q = "encoder.block.0.layer.0.SelfAttention.q"
    w = adapter.modules[("text_encoder_2", q)]
    assert isinstance(w, LoraWeights) and w.alpha == 2.0
    want = fam.build_tiny(0).text_encoder_2.get_submodule(q).weight + w.delta()
    torch.testing.assert_close(merged.text_encoder_2.get_submodule(q).weight, want)
    out_applied, out_merged = _t5_out(applied), _t5_out(merged)
    assert (out_applied - base).abs().max() > 1e-3, "the T5 LoRA must change the T5 output"
    torch.testing.assert_close(out_applied, out_merged, atol=1e-5, rtol=1e-5)
