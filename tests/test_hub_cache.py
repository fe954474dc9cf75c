"""Loading a base model by hub id, offline, from a Hugging Face cache the test writes.

`model.name = "org/name"` goes through `resolve_family` (model_index.json via `hf_hub_download`)
and the family's `load` (`from_pretrained` of each component with the hub id). Nothing can be
downloaded here, so each family's tiny model is saved as a snapshot in the cache layout
`huggingface_hub` reads (`models--org--name/refs/main` → `snapshots/<commit>/…`) and loaded
with `HF_HUB_OFFLINE=1`: the same code a user's first online run takes once the files are in the
cache. The loaded weights must equal the saved ones, and `model.revision` must pick the commit.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.config import ModelConfig
from lorakit.models import FAMILIES, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(tmp_path, name: str):
    """A cache holding family `name`'s tiny model as `lorakit-test/tiny-<name>` at COMMIT."""
    fam = FAMILIES[name]
    repo = tmp_path / "hub" / f"models--lorakit-test--tiny-{name}"
    snapshot = repo / "snapshots" / COMMIT
    comps = fam.build_tiny(seed=0)
    fam.save(comps, str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return f"lorakit-test/tiny-{name}", comps


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch, name):
    hub_id, built = _cache(tmp_path, name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    fam, comps = load_model(ModelConfig(name=hub_id))  # family from the cached model_index.json
    assert fam.name == name
    den = fam.denoiser_name
    a, b = getattr(comps, den).state_dict(), getattr(built, den).state_dict()
    # equal, after the cast a family documents for hub ids (Qwen-Image: its published bf16,
    # not fp32, whatever the files hold: 80 GB of RAM otherwise)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in b)
    e1 = fam.encode_prompts(comps, ["tdwl cup"])
    e2 = fam.encode_prompts(built, ["tdwl cup"])
    for k in e2:  # the tokenizer and text encoders came from the cache too
        assert torch.allclose(e1[k].float(), e2[k].float(), rtol=1e-2, atol=1e-2), (name, k)
    _, again = load_model(ModelConfig(name=hub_id, revision=COMMIT, family=name))
    first = next(iter(getattr(again, den).state_dict().values()))
    assert torch.equal(first, next(iter(b.values())).to(first.dtype))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_folders_load_straight_into_the_run_dtype(tmp_path, name):
    """Issue #19 "no full-precision round trip": inside `load_in(bf16)` (what train wraps the
    load in) the denoiser and text encoders come out of `from_pretrained` in bf16 — FLUX.1's
    transformer is 24 GB of RAM that way, not the 48 GB of an fp32 load cast afterwards — and
    the VAE stays fp32 (`spec.frozen_dtype`). Outside it nothing changes."""
    from lorakit.models.loading import load_in

    fam = FAMILIES[name]
    fam.save(fam.build_tiny(seed=0), str(tmp_path / "m"))
    with load_in(torch.bfloat16):
        _, comps = load_model(ModelConfig(name=str(tmp_path / "m")))
    assert {p.dtype for p in getattr(comps, fam.denoiser_name).parameters()} == {torch.bfloat16}
    for part, module in fam.frozen_modules(comps).items():
        if module is None:
            continue
        want = torch.float32 if part == "vae" else torch.bfloat16
        assert {p.dtype for p in module.parameters()} == {want}, (name, part)
    _, plain = load_model(ModelConfig(name=str(tmp_path / "m")))
    assert next(getattr(plain, fam.denoiser_name).parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["sd15", "flux", "flux2-klein", "qwen-image"])
def test_single_files_load_straight_into_the_run_dtype(tmp_path, name):
    """The same for single-file checkpoints (`single_file.load_converted`): the weights are
    converted to the run's dtype as they are assigned, not to fp32 first."""
    from safetensors.torch import save_file

    from lorakit.models.loading import load_in

    fam = FAMILIES[name]
    comps = fam.build_tiny(seed=0)
    fam.save(comps, str(tmp_path / "cfg"))
    path = tmp_path / "model.safetensors"
    save_file(fam.to_single_file(comps), str(path))
    with load_in(torch.bfloat16):
        _, loaded = load_model(
            ModelConfig(name=str(path), single_file_config=str(tmp_path / "cfg"))
        )
    assert {p.dtype for p in getattr(loaded, fam.denoiser_name).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_local_denoisers_are_read_tensor_by_tensor(tmp_path, monkeypatch, name):
    """Issue #19 "resident memory": a local folder's denoiser is read with plain file reads,
    one tensor at a time (`loading.from_pretrained_streamed`), never through diffusers'
    whole-file read — which for SD1.5's fp16 UNet loaded as fp32 peaked at 5.3 GiB RSS for a
    3.2 GiB model (3.7 GiB this way; measured with psutil, not asserted here). The weights,
    config and eval mode are what `from_pretrained` gives."""
    fam = FAMILIES[name]
    built = fam.build_tiny(seed=0)
    fam.save(built, str(tmp_path / "m"))
    den_cls = type(getattr(built, fam.denoiser_name))

    def refuse(*a, **k):
        raise AssertionError("the denoiser went through from_pretrained")

    with monkeypatch.context() as mp:
        mp.setattr(den_cls, "from_pretrained", refuse)
        _, comps = load_model(ModelConfig(name=str(tmp_path / "m")))
    den = getattr(comps, fam.denoiser_name)
    want = den_cls.from_pretrained(str(tmp_path / "m"), subfolder=fam.denoiser_name)
    a, b = den.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    assert dict(den.config) == dict(want.config) and not den.training
