"""`lorakit merge --single-file`: the original-layout checkpoint reloads (through lorakit's
single-file loader: the inverse of the same naming tables) to exactly the merged weights."""

from __future__ import annotations

import pytest
import torch
from conftest import cli

from lorakit.config import LoraConfigSection, ModelConfig
from lorakit.errors import LorakitError
from lorakit.export import write_adapter
from lorakit.export.single_file import to_single_file, write_single_file
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import FAMILIES, load_model
from lorakit.models.single_file import detect_family, load_single_file


def _same(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), what
    bad = [k for k in sa if not torch.equal(sa[k].float(), sb[k].float())]
    assert not bad, f"{what}: {bad[:5]}"


def test_merge_single_file_sd15_reloads_exactly(tmp_path):
    fam = FAMILIES["sd15"]
    tr = fam.build_tiny(0)
    lora = LoraConfigSection(rank=4, alpha=4.0, target_modules=["to_q", "to_v", "conv1"])
    params = inject_lora(tr.unet, lora, 0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    adapter = extract_adapter(fam, tr, {"lorakit.family": "sd15"})
    path = write_adapter(adapter, "kohya", tmp_path / "a.safetensors")
    res = cli("merge", path, "--base", "tiny:sd15", "--out", tmp_path / "m", "--single-file")
    single = tmp_path / "m.safetensors"
    assert single.is_file() and "single-file" in res.output
    assert detect_family(single) == "sd15"

    _, folder = load_model(ModelConfig(name=str(tmp_path / "m")))
    base = fam.build_tiny(0)
    changed = [
        k
        for k, v in base.unet.state_dict().items()
        if not torch.equal(v, folder.unet.state_dict()[k])
    ]
    assert changed  # the merge did change the UNet, so the comparison below means something
    # configs only from another folder whose weights differ: the weights must come from the file
    fam.save(fam.build_tiny(1), str(tmp_path / "other"))
    loaded = load_single_file(fam, single, config_source=str(tmp_path / "other"))
    for comp in ("unet", "vae", "text_encoder"):
        _same(getattr(loaded, comp), getattr(folder, comp), comp)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_single_file_round_trip_other_families(tmp_path, name):
    fam = FAMILIES[name]
    comps = fam.build_tiny(0)
    fam.save(fam.build_tiny(1), str(tmp_path / "d"))  # other weights: only configs come from it
    write_single_file(name, comps, tmp_path / "x.safetensors")
    assert detect_family(tmp_path / "x.safetensors") == name
    loaded = load_single_file(fam, tmp_path / "x.safetensors", config_source=str(tmp_path / "d"))
    parts = ("unet", "vae", "text_encoder", "text_encoder_2") if name == "sdxl" else (
        "transformer", "vae")  # fmt: skip
    for comp in parts:
        _same(getattr(loaded, comp), getattr(comps, comp), comp)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(LorakitError, match="cannot write a single-file checkpoint"):
        to_single_file("sd2", object())
