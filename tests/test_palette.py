"""Brand palette in CIELAB and the palette distance (CIEDE2000), on synthetic images with known
colours. CIEDE2000 itself, the Lab EMD and the texture statistic: tests/test_metrics.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from lorakit.palette import delta_e_76, delta_e_2000, extract_palette, palette_distance, srgb_to_lab

BRAND = [(94, 60, 38), (232, 220, 196), (20, 92, 120), (240, 150, 40)]  # coffee, cream, sea, sun
OTHER = [(200, 30, 180), (40, 220, 60), (250, 250, 20), (120, 0, 255)]  # off-brand neons


def blocks(colours, shares=(0.4, 0.3, 0.2, 0.1), size=64, noise=0.0, seed=0) -> Image.Image:
    """Horizontal bands of `colours` with pixel shares `shares`, optional Gaussian noise."""
    rows = np.zeros((size, size, 3), dtype=np.float64)
    edges = np.round(np.cumsum((0, *shares)) * size).astype(int)
    for c, a, b in zip(colours, edges[:-1], edges[1:], strict=True):
        rows[a:b] = c
    if noise:
        rows += np.random.default_rng(seed).normal(0, noise, rows.shape)
    return Image.fromarray(np.clip(np.rint(rows), 0, 255).astype(np.uint8))


def test_srgb_to_lab_reference_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8))
    want = [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]]
    assert np.allclose(lab, want, atol=0.05)


def test_exact_palette_with_weights():
    pal = extract_palette([blocks(BRAND)], k=4)
    assert [tuple(c) for c in pal.rgb] == BRAND  # largest share first
    assert np.allclose(pal.weights, [0.4, 0.3, 0.2, 0.1], atol=0.01)
    assert pal.hex()[0] == "#5e3c26"


def test_kmeans_recovers_noisy_colours_deterministically():
    imgs = [blocks(BRAND, noise=6, seed=s) for s in range(3)]
    pal = extract_palette(imgs, k=4, seed=0)
    again = extract_palette(imgs, k=4, seed=0)
    assert np.array_equal(pal.lab, again.lab) and np.array_equal(pal.weights, again.weights)
    truth = srgb_to_lab(np.array(BRAND, np.uint8))
    d = np.sqrt(((pal.lab[:, None] - truth[None]) ** 2).sum(-1))
    assert d.min(1).max() < 3.0, d.min(1)  # every cluster within a just-noticeable ΔE
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3]
    assert np.allclose(pal.weights, [0.4, 0.3, 0.2, 0.1], atol=0.03)


def test_distance_zero_for_the_brand_larger_for_another_palette():
    brand = extract_palette([blocks(BRAND)], k=4)
    # same colours, other proportions and layout: still the brand's colours
    same = blocks(BRAND[::-1], shares=(0.25, 0.25, 0.25, 0.25))
    assert palette_distance([same], brand) == pytest.approx(0.0, abs=1e-9)
    noisy = palette_distance([blocks(BRAND, noise=4, seed=9)], brand)
    other = palette_distance([blocks(OTHER)], brand)
    # ΔE00: below 1 is not noticeable (the k-means means average the noise out), neons read as
    # other colours (0.064 and 31.9 here)
    assert noisy < 1.0 < 25.0 < other, (noisy, other)
    # leaving brand colours out is penalised too (the symmetric half)
    partial = palette_distance([blocks(BRAND[:1] * 4)], brand)
    assert partial > 10.0


def test_distance_grows_monotonically_when_blending_towards_another_palette():
    brand = extract_palette([blocks(BRAND)], k=4)
    a = np.asarray(blocks(BRAND), np.float64)
    b = np.asarray(blocks(OTHER), np.float64)
    dists = []
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        mix = Image.fromarray(np.rint((1 - t) * a + t * b).astype(np.uint8))
        dists.append(palette_distance([mix], brand))
    assert dists[0] == pytest.approx(0.0, abs=1e-9)
    assert all(x < y for x, y in itertools.pairwise(dists)), dists


def test_accepts_paths_arrays_and_large_images(tmp_path):
    big = blocks(BRAND, size=512)
    path = tmp_path / "b.png"
    big.save(path)
    from_path = extract_palette([path], k=4)
    from_array = extract_palette([np.asarray(big)], k=4)
    # shrunk to 128 px first: band edges mix, the colours stay within a just-noticeable ΔE
    truth = srgb_to_lab(np.array(BRAND, np.uint8))
    assert np.sqrt(((from_path.lab - truth) ** 2).sum(-1)).max() < 2.3
    assert np.array_equal(from_path.lab, from_array.lab)
    with pytest.raises(ValueError):
        extract_palette([], k=4)


def test_distance_is_in_ciede2000_units():
    brand = extract_palette([Image.new("RGB", (8, 8), (15, 82, 87))], k=1)  # one teal
    image = Image.new("RGB", (8, 8), (20, 95, 120))  # one bluer teal
    other = extract_palette([image], k=1)
    want = float(delta_e_2000(other.lab[0], brand.lab[0]))
    assert palette_distance([image], brand) == pytest.approx(want, rel=1e-12)
    assert abs(want - float(delta_e_76(other.lab[0], brand.lab[0]))) > 1  # not CIE76
