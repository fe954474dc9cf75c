"""`lorakit inspect`: format, family, groups, parameters, check line, --json, unmapped keys."""

from __future__ import annotations

import json

import torch
from conftest import cli
from safetensors.torch import save_file

from lorakit.config import LoraConfigSection
from lorakit.export import write_adapter
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import FAMILIES


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
    assert info["format"] == "diffusers" and info["groups"]["transformer: attn.to_q"]["alpha"] == [
        8.0
    ]


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
