"""Per-variant metadata: SD3 medium / SD3.5 medium / SD3.5 large and FLUX.1 dev / schnell get
their own `ss_base_model_version` and `modelspec.architecture` (kohya's values)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.config import Config
from lorakit.export import kohya
from lorakit.export.metadata import training_metadata, variant_metadata
from lorakit.lora import Adapter, LoraWeights
from lorakit.models import FAMILIES
from lorakit.models.flux import tiny_flux
from lorakit.spec import build_spec


def _sd3(num_layers, dual=()):
    cfg = SimpleNamespace(num_layers=num_layers, dual_attention_layers=dual)
    return SimpleNamespace(transformer=SimpleNamespace(config=cfg))


@pytest.mark.parametrize(
    ("comps", "version", "arch"),
    [
        (_sd3(38), "5-large", "stable-diffusion-3-5-large/lora"),
        (_sd3(24, tuple(range(13))), "5-medium", "stable-diffusion-3-5-medium/lora"),
        (_sd3(24), "medium", "stable-diffusion-3-medium/lora"),
    ],
)
def test_sd3_variants(comps, version, arch):
    meta = variant_metadata(FAMILIES["sd3"], comps)
    assert meta == {"ss_base_model_version": version, "modelspec.architecture": arch}


def test_tiny_sd3_is_labelled_medium_35():
    # the tiny SD3 has a dual-attention block, like SD3.5 medium
    comps = FAMILIES["sd3"].build_tiny()
    meta = training_metadata(
        Config(), build_spec(Config(), FAMILIES["sd3"]), ["a, b"], 1, 0.0, 0, components=comps
    )
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_flux_schnell_and_dev_through_export():
    fam = FAMILIES["flux"]
    for guidance, arch in ((False, "flux-1-schnell/lora"), (True, "flux-1-dev/lora")):
        comps = tiny_flux(0, guidance_embeds=guidance)
        meta = training_metadata(
            Config(), build_spec(Config(), fam), ["x"], 1, 0.0, 0, components=comps
        )
        assert meta["modelspec.architecture"] == arch
        assert meta["ss_base_model_version"] == "flux1"
        # the exported kohya file keeps the variant (finalize must not overwrite it)
        w = LoraWeights(torch.ones(2, 8), torch.ones(8, 2), 2.0)
        adapter = Adapter("flux", {("transformer", "proj_out"): w}, meta)
        out = kohya.write_metadata(adapter, fam, kohya.to_state_dict(adapter, fam))
        assert out["modelspec.architecture"] == arch


def test_without_components_family_defaults():
    meta = training_metadata(Config(), build_spec(Config(), FAMILIES["sdxl"]), [], 0, 0.0, 0)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "modelspec.architecture" not in meta
