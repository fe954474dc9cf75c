"""Mixing adapters (`lorakit merge-loras`, `lorakit sample --adapter F:W --adapter G:W`).

References are computed independently of `lorakit.mix`: ΔW from each adapter's own `delta()`
(LoRA) or peft's `get_delta_weight` of the trained layer (LoHa/LoKr), the rank-R reference from
a dense SVD, merged weights from `lorakit.merge.merge_into`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, cli
from safetensors import safe_open

from lorakit.config import LoraConfigSection
from lorakit.export import read_adapter, write_adapter
from lorakit.lora import (
    Adapter,
    LoraWeights,
    apply_adapter,
    canonical_name,
    extract_adapter,
    inject_lora,
    lora_layers,
)
from lorakit.mix import combine, display_names, merge_loras, read_sources
from lorakit.models import FAMILIES


def _trained(family: str, seed: int, rank: int, targets=None, **lora):
    """A tiny-model adapter with random (non-zero) weights, and each module's ΔW as peft applies
    it (`get_delta_weight`, the module's weight shape)."""
    fam = FAMILIES[family]
    comps = fam.build_tiny(0)
    cfg = LoraConfigSection(
        rank=rank, alpha=8.0, target_modules=targets or list(fam.default_targets), **lora
    )
    params = inject_lora(getattr(comps, fam.denoiser_name), cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    target = next(t for t in fam.targets if t.component == fam.denoiser_name)
    deltas = {
        (fam.denoiser_name, canonical_name(target, n)): layer.get_delta_weight("default").detach()
        for n, layer in lora_layers(getattr(comps, fam.denoiser_name))
    }
    meta = {"lorakit.base_model": f"tiny:{family}", "modelspec.trigger_phrase": f"trig{seed}"}
    return extract_adapter(fam, comps, meta), deltas


@pytest.fixture(scope="module")
def pairs():
    """Per family: A (rank 4, every default target), B (rank 2, all but `to_out.0`)."""
    out = {}
    for name, fam in FAMILIES.items():
        a, _ = _trained(name, 1, 4)
        b, _ = _trained(name, 2, 2, [t for t in fam.default_targets if t != "to_out.0"])
        out[name] = (a, b)
    return out


def _other_format(family: str) -> str:
    return "kohya" if FAMILIES[family].default_export_format == "diffusers" else "diffusers"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weighted(adapters: list[tuple[Adapter, float]], key) -> torch.Tensor:
    return sum(w * a.modules[key].delta() for a, w in adapters if key in a.modules)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_rank_merge_is_the_weighted_sum_for_every_family(tmp_path, pairs, family):
    a, b = pairs[family]
    assert set(b.modules) < set(a.modules)  # a module only A has is mixed too
    pa = write_adapter(a, FAMILIES[family].default_export_format, tmp_path / "a.safetensors")
    pb = write_adapter(b, _other_format(family), tmp_path / "b.safetensors")
    result = merge_loras([(pa, 0.7), (pb, 0.5)], tmp_path / "m.safetensors")
    back, fmt = read_adapter(tmp_path / "m.safetensors")
    assert fmt == FAMILIES[family].default_export_format and back.family == family
    assert set(back.modules) == set(a.modules)
    for key, w in back.modules.items():
        want = _weighted([(a, 0.7), (b, 0.5)], key)
        assert (w.delta() - want).abs().max().item() <= 1e-5, key
        assert w.rank == min(*want.flatten(1).shape, 4 + 2 * (key in b.modules)), key
    assert abs(result.energy - 1) < 1e-9
    sources = json.loads(back.metadata["lorakit.merged_from"])
    assert [(s["file"], s["sha256"], s["weight"]) for s in sources] == [
        ("a.safetensors", _sha(pa), 0.7),
        ("b.safetensors", _sha(pb), 0.5),
    ]
    assert back.metadata["modelspec.trigger_phrase"] == "trig1, trig2"
    assert float(back.metadata["lorakit.retained_energy"]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sampling_two_adapters_applies_the_weighted_sum_of_their_updates(tmp_path, pairs, family):
    """What `sample --adapter A:0.8 --adapter B:-0.3` injects gives every denoiser module
    W + 0.8·ΔW_A − 0.3·ΔW_B (each ΔW from its own adapter)."""
    fam = FAMILIES[family]
    a, b = pairs[family]
    pa = write_adapter(a, "kohya", tmp_path / "a.safetensors")
    pb = write_adapter(b, "kohya", tmp_path / "b.safetensors")
    mixed = combine(read_sources([(pa, 0.8), (pb, -0.3)], "--adapter"))
    comps = fam.build_tiny(0)
    apply_adapter(fam, comps, mixed)
    layers = dict(lora_layers(getattr(comps, fam.denoiser_name)))
    assert len(layers) == len(a.modules)
    for key in a.modules:
        layer = layers[key[1]]
        base = layer.get_base_layer().weight
        got = base + layer.get_delta_weight("default")  # what the denoiser computes with
        want = base + _weighted([(a, 0.8), (b, -0.3)], key).reshape(base.shape)
        assert (got - want).abs().max().item() <= 1e-5, key


def test_rank_r_merge_prints_the_energy_of_the_singular_values(tmp_path, pairs):
    a, b = pairs["sd15"]
    pa = write_adapter(a, "kohya", tmp_path / "a.safetensors")
    pb = write_adapter(b, "lycoris", tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    r = cli("merge-loras", f"{pa}:0.7", f"{pb}:0.5", "--rank", 3, "--out", out)
    back, _ = read_adapter(out)
    kept = total = 0.0
    per = {}
    for key, w in back.modules.items():
        dense = _weighted([(a, 0.7), (b, 0.5)], key).double().flatten(1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart–Young: the best rank-3 approximation
        assert w.rank == 3
        assert (w.delta().double().flatten(1) - best).abs().max().item() <= 1e-5, key
        kept, total = kept + float((s[:3] ** 2).sum()), total + float((s**2).sum())
        per[f"{key[0]}.{key[1]}"] = float((s[:3] ** 2).sum() / (s**2).sum())
    printed = float(re.search(r"retained energy overall: ([0-9.]+)", r.output).group(1))
    assert 0.5 < kept / total < 0.999
    assert printed == pytest.approx(kept / total, abs=1e-6)
    assert float(back.metadata["lorakit.retained_energy"]) == pytest.approx(kept / total, abs=1e-7)
    for name, energy in re.findall(r"  (\S+): rank 3, energy ([0-9.]+)", r.output):
        assert float(energy) == pytest.approx(per[name], abs=1e-4), name
    assert back.metadata["lorakit.merge_rank"] == "3"


def test_loha_and_lokr_mix_through_their_delta_and_dora_is_refused(tmp_path):
    """LoHa and LoKr (Linear and conv modules, LoKr with full and with low-rank second factors)
    mix exactly: in merge-loras, and in the weights sampling injects. DoRA: one paragraph."""
    fam = FAMILIES["sd15"]
    targets = ["to_q", "proj_in", "conv1", "ff.net.2"]
    a, da = _trained("sd15", 1, 4, targets, type="loha")
    b, db = _trained("sd15", 2, 4, targets[1:], type="lokr")  # conv1: lokr_w2 [8, 8, 3, 3]
    c, dc = _trained("sd15", 3, 2, targets, type="lokr")  # lokr_w2_a/_b pairs
    paths = [write_adapter(x, "lycoris", tmp_path / f"{n}.safetensors") for x, n in
             ((a, "a"), (b, "b"), (c, "c"))]  # fmt: skip
    weights = [0.7, 0.5, -1.5]
    result = merge_loras(list(zip(paths, weights, strict=True)), tmp_path / "m.safetensors")
    back, _ = read_adapter(result.path)
    mixed = combine(read_sources(list(zip(paths, weights, strict=True)), "--adapter"))
    comps = fam.build_tiny(0)
    apply_adapter(fam, comps, mixed)
    layers = dict(lora_layers(comps.unet))
    assert set(back.modules) == set(da) and len(layers) == len(da)
    for key in da:
        want = sum(w * d[key] for d, w in zip((da, db, dc), weights, strict=True) if key in d)
        assert (back.modules[key].delta().reshape(want.shape) - want).abs().max() <= 1e-5, key
        layer = layers[key[1]]
        assert (layer.get_delta_weight("default") - want).abs().max() <= 1e-5, key

    dora, _ = _trained("sd15", 4, 2, targets[:1], use_dora=True)
    pd = write_adapter(dora, "lycoris", tmp_path / "d.safetensors")
    line = _error_line(cli("merge-loras", paths[0], pd, "--out", tmp_path / "x.safetensors",
                           expect=1))  # fmt: skip
    assert "DoRA" in line and "d.safetensors" in line
    assert not (tmp_path / "x.safetensors").exists()


def _error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and result.output.strip() == lines[0], result.output  # one paragraph
    return lines[0]


def test_bad_merges_are_refused_in_one_paragraph_and_write_nothing(tmp_path, pairs):
    a, b = pairs["sd15"]
    pa = write_adapter(a, "kohya", tmp_path / "a.safetensors")
    pb = write_adapter(b, "kohya", tmp_path / "b.safetensors")
    pf = write_adapter(pairs["flux"][0], "kohya", tmp_path / "f.safetensors")
    # same family and module names, twice the width: another size of the architecture
    wide = {
        k: LoraWeights(torch.cat([w.down, w.down], 1), torch.cat([w.up, w.up], 0), w.alpha)
        for k, w in a.modules.items()
    }
    pw = write_adapter(Adapter("sd15", wide), "kohya", tmp_path / "w.safetensors")
    out = tmp_path / "m.safetensors"
    cases = [
        ((f"{pa}:0.7", f"{pf}:0.5"), ["different model families", "sd15", "flux"]),
        ((pa, pw), ["different variants or sizes", "[32 out, 32 in]", "[64 out, 64 in]"]),
        ((f"{pa}:0.7", f"{pb}:abc"), ["weight 'abc'", "is not a number", "FILE:WEIGHT"]),
        ((pa, f"{pb}:nan"), ["finite number"]),
        ((pa, pb, "--rank", 7), ["--rank 7 is more than", "Pass --rank 6 or less"]),
        ((pa, pb, "--rank", 0), ["--rank must be 1 or more"]),
        ((pa, pb, "--format", "onnx"), ["--format 'onnx' is unknown"]),
    ]
    for args, words in cases:
        line = _error_line(cli("merge-loras", *args, "--out", out, expect=1))
        assert all(w in line for w in words), (args, line)
        assert not out.exists(), args
    # --out: never a source; an existing file is kept unless --overwrite
    line = _error_line(cli("merge-loras", pa, pb, "--out", pa, "--overwrite", expect=1))
    assert "one of the adapters being merged" in line
    out.write_bytes(b"keep me")
    line = _error_line(cli("merge-loras", pa, pb, "--out", out, expect=1))
    assert "already exists" in line and "--overwrite" in line and out.read_bytes() == b"keep me"
    r = cli("merge-loras", pa, pb, "--rank", 6, "--out", out, "--overwrite")
    assert "retained energy overall: 1.000000" in r.output, r.output
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["lorakit.merged_from"])[1]["weight"] == 1.0
    # two runs' adapters share a file name: labels say their folders
    runs = [Path("runs/style/lorakit.safetensors"), Path("runs/product/lorakit.safetensors")]
    assert display_names([*runs, Path("x/a.safetensors")]) == [
        "style/lorakit.safetensors", "product/lorakit.safetensors", "a.safetensors"]  # fmt: skip


def test_sample_cli_mixes_adapters_in_one_grid(tmp_path, pairs):
    """The mix's grid shows what the merged file shows (same cells), under a caption band with
    one line per adapter; adapters of two families are refused."""
    import numpy as np
    from PIL import Image

    from lorakit.sampling import HEAD_H

    a, b = pairs["sd15"]
    pa = write_adapter(a, "kohya", tmp_path / "style.safetensors")
    pb = write_adapter(b, "diffusers", tmp_path / "product.safetensors")
    args = ("--prompts", PROMPTS, "--seeds", 0, "--steps", 1, "--resolution", 64)
    r = cli("sample", "--adapter", f"{pa}:0.8", "--adapter", f"{pb}:-1.5", *args,
            "--out", tmp_path / "mix.png")  # fmt: skip
    assert "mixed: style.safetensors:0.8 + product.safetensors:-1.5" in r.output
    cli("merge-loras", f"{pa}:0.8", f"{pb}:-1.5", "--out", tmp_path / "m.safetensors")
    cli("sample", tmp_path / "m.safetensors", *args, "--out", tmp_path / "merged.png")
    cli("sample", pa, *args, "--out", tmp_path / "style.png")
    mix, merged, style = (Image.open(tmp_path / f"{n}.png") for n in ("mix", "merged", "style"))
    band = mix.height - merged.height
    assert band == 12 * 3 + 8 and mix.width == merged.width  # a title line + one per adapter

    def cells(im, top):  # below the title row: prompt labels, images, seed captions
        return np.asarray(im.crop((0, top + HEAD_H, im.width, im.height)), dtype=np.int16)

    assert np.abs(cells(mix, band) - cells(merged, 0)).max() <= 2
    changed = np.abs(cells(mix, band) - cells(style, 0)).max(-1) > 2
    assert changed.sum() > 2000  # of 5 × 96² image pixels: the second adapter counts
    pf = write_adapter(pairs["flux"][0], "kohya", tmp_path / "f.safetensors")
    line = _error_line(cli("sample", "--adapter", pa, "--adapter", pf, *args, "--out",
                           tmp_path / "x.png", expect=1))  # fmt: skip
    assert "different model families" in line and not (tmp_path / "x.png").exists()


def test_lycoris_weights_delta_is_peft_s_for_every_kind_and_layer():
    """`LycorisWeights.delta` (what inspect, merge and the loaders' checks read) equals peft's
    `get_delta_weight` of the trained layer, conv LoKr with a full 4-D `lokr_w2` included
    (torch.kron of a 2-D w1 and a 4-D w2 laid it out wrongly: error 0.2 on proj_in)."""
    targets = ["to_q", "proj_in", "conv1", "ff.net.2"]
    for seed, rank, kind in ((1, 4, "loha"), (2, 4, "lokr"), (3, 2, "lokr")):
        adapter, deltas = _trained("sd15", seed, rank, targets, type=kind)
        for key, want in deltas.items():
            got = adapter.modules[key].delta().reshape(want.shape)
            assert (got - want).abs().max() <= 1e-5, (kind, rank, key)
