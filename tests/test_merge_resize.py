"""merge == base + adapter; resize error falls monotonically with rank, full rank is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import cli

from lorakit.config import LoraConfigSection
from lorakit.export import read_adapter, write_adapter
from lorakit.lora import apply_adapter, extract_adapter, inject_lora
from lorakit.models import FAMILIES
from lorakit.resize import resize_adapter

FAM = FAMILIES["sd15"]


def _adapter(rank=8):
    tr = FAM.build_tiny(0)
    params = inject_lora(tr.unet, LoraConfigSection(rank=rank, alpha=4.0,
                         target_modules=["to_q", "to_v", "proj_in", "conv1"]), 0)  # fmt: skip
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return extract_adapter(FAM, tr, {"lorakit.family": "sd15"})


def _out(unet, comps):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = FAM.encode_prompts(comps, ["a cup"])
    with torch.no_grad():
        return FAM.predict(unet, x, torch.tensor([500]), cond)


def test_resize_error_decreases_with_rank_and_full_rank_is_exact():
    adapter = _adapter()
    ref = FAM.build_tiny(0)
    apply_adapter(FAM, ref, adapter)
    expected = _out(ref.unet, ref)
    errors, energies = [], []
    for r in (1, 2, 4, 8):
        small, per, overall = resize_adapter(adapter, rank=r)
        assert all(w.rank <= r for w in small.modules.values())
        c = FAM.build_tiny(0)
        apply_adapter(FAM, c, small)
        errors.append((_out(c.unet, c) - expected).abs().max().item())
        energies.append(overall)
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    assert errors[-1] <= 1e-5 and abs(energies[-1] - 1) < 1e-9
    assert energies == sorted(energies)
    _e_small, per, overall = resize_adapter(adapter, energy=0.9)
    assert min(per.values()) >= 0.9 - 1e-9


def test_merge_cli_output_equals_base_plus_adapter(tmp_path):
    from diffusers import UNet2DConditionModel

    adapter = _adapter(4)
    path = write_adapter(adapter, "kohya", tmp_path / "a.safetensors")
    cli("merge", f"{path}:0.5", "--base", "tiny:sd15", "--scale", "2", "--out", tmp_path / "m")
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "m" / "unet")
    ref = FAM.build_tiny(0)
    apply_adapter(FAM, ref, adapter, scale=1.0)
    assert (_out(merged, ref) - _out(ref.unet, ref)).abs().max().item() <= 1e-4


def test_resize_cli_reports_energy_and_writes_a_loadable_file(tmp_path):
    path = write_adapter(_adapter(), "kohya", tmp_path / "a.safetensors")
    r = cli("resize", path, "--rank", "2", "--out", tmp_path / "r.safetensors")
    assert "retained energy overall" in r.output and "energy 0." in r.output
    back, fmt = read_adapter(tmp_path / "r.safetensors")
    assert fmt == "kohya" and {w.rank for w in back.modules.values()} == {2}
    r = cli("resize", path, expect=None)
    assert r.exit_code != 0 and "exactly one" in r.output


def test_resize_of_a_lora_wider_than_its_module_keeps_every_singular_value():
    """Found by the adapter-mixing work: rank 64 on a 32-wide layer resized to 48 raised
    IndexError (the SVD has 32 values); it is exact at rank 32."""
    from lorakit.lora import LoraWeights
    from lorakit.resize import resize_module

    g = torch.Generator().manual_seed(0)
    w = LoraWeights(torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g), 64.0)
    new, kept, _ = resize_module(w, rank=48)
    assert new.rank == 32 and kept == pytest.approx(1.0)
    dense = (w.up @ w.down) * (w.alpha / w.rank)
    assert torch.allclose(new.up @ new.down * (new.alpha / new.rank), dense, atol=1e-4)
