"""`lorakit inspect`: format, family, kind, groups, parameters, check line, --json, unmapped keys;
the same damage check as export/resize/merge, for LoRA, DoRA, LoHa and LoKr."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file, save_file

from lorakit.config import LoraConfigSection
from lorakit.errors import LorakitError
from lorakit.export import write_adapter
from lorakit.lora import Adapter, LoraWeights, extract_adapter, inject_lora
from lorakit.merge import merge_into
from lorakit.models import FAMILIES
from lorakit.resize import resize_adapter

SD15_Q_PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
SD15_Q = "lora_unet_" + SD15_Q_PATH.replace(".", "_")


def test_inspect_reports_format_family_groups_and_check_line(tmp_path):
    fam = FAMILIES["flux"]
    tr = fam.build_tiny(0)
    inject_lora(tr.transformer, LoraConfigSection(rank=4, alpha=8.0), 0)
    adapter = extract_adapter(fam, tr, {"modelspec.trigger_phrase": "tdwl"})
    path = write_adapter(adapter, "kohya", tmp_path / "a.safetensors")
    r = cli("inspect", path)
    assert "every key maps to a module of flux: yes" in r.output and "tdwl" in r.output
    info = json.loads(cli("inspect", path, "--json").output)
    assert info["format"] == "kohya" and info["family"] == "flux" and info["all_keys_mapped"]
    from safetensors.torch import load_file

    stored = load_file(str(path))  # fused qkv stores more numbers than the split LoRAs
    assert info["parameters"] == sum(t.numel() for k, t in stored.items() if "alpha" not in k)
    assert any(g["rank"] == [12] for g in info["groups"].values())  # fused qkv
    d = write_adapter(adapter, "diffusers", tmp_path / "d.safetensors")
    info = json.loads(cli("inspect", d, "--json").output)
    # inspect shows what the file stores: FLUX diffusers files may fold alpha/rank into lora_B
    folded = info["metadata"].get("lorakit.strength") == "folded"
    assert info["format"] == "diffusers" and info["groups"]["transformer: attn.to_q"] == {
        "modules": 3,  # the double block's and both single blocks' to_q
        "rank": [4],
        "alpha": [4.0 if folded else 8.0],
    }


def test_inspect_lists_unmapped_keys_and_exits_non_zero(tmp_path):
    k = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{k}.lora_down.weight": torch.ones(2, 32, 1, 1),
        f"{k}.lora_up.weight": torch.ones(32, 2, 1, 1),
        "lora_unet_bogus_9.lora_down.weight": torch.ones(2, 4),
        "lora_unet_bogus_9.lora_up.weight": torch.ones(4, 2),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    r = cli("inspect", tmp_path / "x.safetensors", expect=1)
    assert "no (1 unmapped: lora_unet_bogus_9)" in r.output


def _error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output  # one paragraph
    return lines[0]


def test_check_line_is_printed_once(tmp_path):
    k = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{k}.lora_down.weight": torch.ones(2, 32, 1, 1),
               f"{k}.lora_up.weight": torch.ones(32, 2, 1, 1),
               "lora_unet_bogus_9.lora_down.weight": torch.ones(2, 4),
               "lora_unet_bogus_9.lora_up.weight": torch.ones(4, 2)},
              str(tmp_path / "x.safetensors"))  # fmt: skip
    r = cli("inspect", tmp_path / "x.safetensors", expect=1)
    assert r.output.count("every key maps to a module of sd15") == 1, r.output


def _tiny_adapter(family: str, **lora):
    fam = FAMILIES[family]
    comps = fam.build_tiny(0)
    targets = list(fam.default_targets)
    cfg = LoraConfigSection(rank=4, alpha=8.0, target_modules=targets, **lora)
    inject_lora(getattr(comps, fam.denoiser_name), cfg, 0)
    return extract_adapter(fam, comps, {})


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_lorakit_loha_lokr_and_dora_files_are_inspected(tmp_path, kind):
    lora = {"use_dora": True} if kind == "dora" else {"type": kind}
    adapter = _tiny_adapter("sd15", **lora)
    path = write_adapter(adapter, "lycoris", tmp_path / "a.safetensors")
    r = cli("inspect", path)
    assert r.output.count("every key maps to a module of sd15: yes") == 1, r.output
    info = json.loads(cli("inspect", path, "--json").output)
    assert info["format"] == "lycoris" and info["family"] == "sd15" and info["kind"] == kind
    assert info["modules"] == len(adapter.modules) == 56
    assert sum(g["modules"] for g in info["groups"].values()) == 56
    assert info["components"] == {"unet": {"modules": 56, "label": "", "trained": True}}
    if kind != "lokr":  # LoKr at these widths stores both factors full (rank shown as 0/full)
        assert {r for g in info["groups"].values() for r in g["rank"]} == {4}


@pytest.fixture(scope="module")
def family_adapters():
    return {name: (_tiny_adapter(name), _tiny_adapter(name, use_dora=True)) for name in FAMILIES}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "lycoris"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_named_from_its_keys_alone(tmp_path, family_adapters, family, fmt):
    """Files without lorakit's metadata (other tools, or SD3.5 medium's `5-medium`) still get
    their family from the keys: the fixed tables of the family that places every module."""
    lora, dora = family_adapters[family]
    path = write_adapter(dora if fmt == "lycoris" else lora, fmt, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    for meta in ({}, {"ss_base_model_version": "5-medium"}):
        save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
        info = json.loads(cli("inspect", tmp_path / "b.safetensors", "--json").output)
        assert info["family"] == family and info["all_keys_mapped"], (meta, info["unmapped"])


def _lora(down, up, alpha=None, key=SD15_Q):
    out = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    return out if alpha is None else out | {f"{key}.alpha": alpha}


def _loha(**change):
    t = {"hada_w1_a": torch.ones(32, 2), "hada_w1_b": torch.ones(2, 32),
         "hada_w2_a": torch.ones(32, 2), "hada_w2_b": torch.ones(2, 32),
         "alpha": torch.tensor(2.0)} | change  # fmt: skip
    return {f"{SD15_Q}.{k}": v for k, v in t.items() if v is not None}


DAMAGED = {
    "rank mismatch": (_lora(torch.ones(2, 32), torch.ones(32, 3)), "disagree on the rank"),
    "1-D lora_up": (_lora(torch.ones(2, 32), torch.ones(32)), "lora_up has shape (32,)"),
    "no lora_up": (
        {f"{SD15_Q}.lora_down.weight": torch.ones(2, 32), f"{SD15_Q}.alpha": torch.tensor(2.0)},
        "has lora_down but no lora_up",
    ),
    "alpha not a number": (
        _lora(torch.ones(2, 32), torch.ones(32, 2), torch.ones(2)),
        "alpha has shape (2,)",
    ),
    "LoHa without a factor": (_loha(hada_w2_b=None), "without hada_w2_b"),
    "LoHa rank mismatch": (_loha(hada_w1_b=torch.ones(3, 32)), "disagree on the rank"),
    "LoKr 1-D factor": (
        {f"{SD15_Q}.lokr_w1": torch.ones(4), f"{SD15_Q}.lokr_w2": torch.ones(8, 8)},
        "lokr_w1 has shape (4,)",
    ),
    "DoRA scale of another width": (
        _lora(torch.ones(2, 32), torch.ones(32, 2)) | {f"{SD15_Q}.dora_scale": torch.ones(5, 1)},
        "dora_scale has shape (5, 1)",
    ),
    "diffusers rank mismatch": (
        {
            f"unet.{SD15_Q_PATH}.lora_A.weight": torch.ones(2, 32),
            f"unet.{SD15_Q_PATH}.lora_B.weight": torch.ones(32, 3),
        },
        "disagree on the rank",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_files_fail_inspect_with_the_message_export_gives(tmp_path, case):
    tensors, words = DAMAGED[case]
    good_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    if next(iter(tensors)).startswith("lora_"):  # plus a healthy module
        tensors = tensors | {f"{good_k}.lora_down.weight": torch.ones(2, 32),
                             f"{good_k}.lora_up.weight": torch.ones(32, 2)}  # fmt: skip
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    shown = _error_line(cli("inspect", path, expect=None))
    exported = _error_line(cli("export", path, "--out", tmp_path / "o", expect=None))
    resized = _error_line(cli("resize", path, "--rank", 1, "--out", tmp_path / "r.safetensors",
                              expect=None))  # fmt: skip
    assert shown == exported == resized
    module = next(iter(tensors)).rpartition(".lora_")[0] if "unet." in shown else SD15_Q
    assert str(path) in shown and f"module '{module}':" in shown and words in shown, shown
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.safetensors").exists()


def test_adapters_built_in_code_get_the_same_check_in_resize_and_merge():
    bad = Adapter(
        "sd15", {("unet", SD15_Q_PATH): LoraWeights(torch.ones(2, 32), torch.ones(32, 3), 2.0)}
    )
    with pytest.raises(LorakitError, match=rf"module 'unet.{SD15_Q_PATH}': down .* disagree"):
        resize_adapter(bad, rank=1)
    fam = FAMILIES["sd15"]
    with pytest.raises(LorakitError, match="is damaged"):
        merge_into(fam, fam.build_tiny(0), [(bad, 1.0)])
