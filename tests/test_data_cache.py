"""Latent and text-encoder caches: reuse, exact invalidation, VAE identity."""

from __future__ import annotations

import shutil
from collections import defaultdict

import pytest
import torch
from conftest import SAMPLES
from PIL import Image

from lorakit.config import DataConfig
from lorakit.data.cache import LatentCache, TextEncoderCache, latent_key, vae_identity
from lorakit.data.training import load_training_set


@pytest.fixture(scope="module")
def tiny():
    from lorakit.models import get_family

    fam = get_family("sd15")
    return fam, fam.build_tiny(seed=0)


def encode_all(ts, cache: LatentCache, fam, comps) -> dict[str, torch.Tensor]:
    """What the training loop does: per bucket, latents from the cache or the VAE."""
    by_bucket = defaultdict(list)
    for i, r in enumerate(ts.records):
        by_bucket[r.bucket].append(i)
    out = {}
    for idx in by_bucket.values():
        keys = [latent_key(ts.records[i]) for i in idx]

        def compute(missing, idx=idx):
            px = torch.stack([ts.pixels(idx[m]) for m in missing])
            return fam.encode_images(comps, px)

        lat = cache.get_or_compute(keys, compute)
        out.update({ts.records[i].key: lat[j] for j, i in enumerate(idx)})
    return out


def test_latent_cache_reuse_invalidation_and_vae_identity(tmp_path, tiny):
    fam, comps = tiny
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:5]:
        shutil.copy(p, src / p.name)
    d = DataConfig(resolution=64, trigger="tdwl", workers=1, cache_dir=str(tmp_path / "cache"))
    ident = vae_identity(comps.vae)
    assert ident == vae_identity(comps.vae)

    ts = load_training_set(src, d, batch_size=1)
    c1 = LatentCache(tmp_path / "latents", ident)
    first = encode_all(ts, c1, fam, comps)
    assert c1.computed == 5 and ts.decodes == 5

    # unchanged input: zero image decodes, zero VAE encodes, identical latents
    ts2 = load_training_set(src, d, batch_size=1)
    c2 = LatentCache(tmp_path / "latents", ident)
    again = encode_all(ts2, c2, fam, comps)
    assert (c2.computed, c2.hits, ts2.decodes) == (0, 5, 0)
    assert all(torch.equal(first[k], again[k]) for k in first)

    # one changed image: exactly its latent is recomputed
    victim = sorted(src.iterdir())[1]
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    ts3 = load_training_set(src, d, batch_size=1)
    c3 = LatentCache(tmp_path / "latents", ident)
    encode_all(ts3, c3, fam, comps)
    assert (c3.computed, c3.hits, ts3.decodes) == (1, 4, 1)
    assert len(set(first) - {r.key for r in ts3.records}) == 1

    # a different VAE (one weight changed) never reuses a stale latent
    with torch.no_grad():
        p = next(comps.vae.encoder.parameters())
        p.add_(1e-3)
    try:
        other = vae_identity(comps.vae)
        assert other != ident
        c4 = LatentCache(tmp_path / "latents", other)
        encode_all(ts3, c4, fam, comps)
        assert c4.computed == 5 and c4.hits == 0
        # and another dtype is another entry
        c5 = LatentCache(tmp_path / "latents", ident, dtype=torch.float16)
        encode_all(ts3, c5, fam, comps)
        assert c5.computed == 5
    finally:
        with torch.no_grad():
            p.sub_(1e-3)


def test_damaged_entry_is_recomputed(tmp_path):
    cache = LatentCache(tmp_path, "vae-x")
    x = cache.get_or_compute(["a", "b"], lambda m: torch.ones(len(m), 4, 2, 2))
    assert x.shape == (2, 4, 2, 2) and cache.computed == 2
    cache.path("a").write_bytes(b"garbage")
    y = cache.get_or_compute(["a", "b"], lambda m: torch.full((len(m), 4, 2, 2), 2.0))
    assert cache.computed == 3 and y[0].eq(2).all() and y[1].eq(1).all()


def test_text_encoder_cache(tmp_path, tiny):
    fam, comps = tiny
    from lorakit.data.cache import module_identity

    ident = module_identity(comps.text_encoder)
    calls = []

    def compute(caps):
        calls.append(list(caps))
        return fam.encode_prompts(comps, caps)

    caps = ["tdwl, a cup", "tdwl, a mug", "tdwl, a cup"]
    c1 = TextEncoderCache(tmp_path, ident)
    out = c1.get_or_compute(caps, compute)
    assert calls == [["tdwl, a cup", "tdwl, a mug"]] and c1.computed == 2
    direct = fam.encode_prompts(comps, caps)
    for k, v in direct.items():
        assert torch.allclose(out[k], v.float(), atol=1e-6)
    c2 = TextEncoderCache(tmp_path, ident)
    again = c2.get_or_compute(["tdwl, a mug", "tdwl, a new one"], compute)
    assert calls[-1] == ["tdwl, a new one"] and c2.computed == 1
    assert torch.equal(again[next(iter(again))][0], out[next(iter(out))][1])
    assert TextEncoderCache(tmp_path, "other-encoder").get_or_compute(["tdwl, a cup"], compute)
    assert calls[-1] == ["tdwl, a cup"]


def test_caption_cache_is_keyed_on_the_text_length(tmp_path):
    """Two runs sharing a cache folder at different `model.t5_max_length`: the second encodes
    its captions at its own length instead of reading the first run's (same encoders, so the
    encoders' identity alone did not tell them apart); each length is then read, not encoded."""
    from lorakit.data.cache import encode_captions
    from lorakit.models import FAMILIES

    fam = FAMILIES["flux"]
    comps = fam.build_tiny(seed=0)
    calls = []
    real = type(fam).encode_prompts

    class Main:
        is_main_process = True

    def encode(length: int) -> torch.Tensor:
        comps.t5_max_length = length  # what the loader sets from model.t5_max_length
        out = encode_captions(fam, comps, ["tdwl, a cup"], False, tmp_path, Main(),
                              text_length=length)  # fmt: skip
        return out["encoder_hidden_states"]["tdwl, a cup"]

    def counting(self, components, prompts):
        calls.append(components.t5_max_length)
        return real(self, components, prompts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(fam), "encode_prompts", counting)
        assert encode(16).shape[0] == 16
        assert encode(24).shape[0] == 24
        assert encode(16).shape[0] == 16 and encode(24).shape[0] == 24
    assert calls == [16, 24]
