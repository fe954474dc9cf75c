"""Texture/style statistic without downloaded weights: Gram matrices of a fixed random conv net.

Gatys et al. (2015) describe a texture by the Gram matrices (channel co-activations, averaged over
positions) of a conv net's feature maps; Ustyuzhaninov et al. (2017) showed that random, untrained
filters already give such a description. Here the net is small and fixed forever:

    image → ~128×128 px (aspect kept) → CIELAB / 100, `[1, 3, H, W]`
          → conv 5×5 (3→16) → ReLU → Gram G₁ `[16, 16]` → 2×2 average pool
          → conv 5×5 (16→32) → ReLU → Gram G₂ `[32, 32]` → 2×2 average pool
          → conv 5×5 (32→32) → ReLU → Gram G₃ `[32, 32]`

with reflect padding (no dark frame at the borders) and G = F·Fᵀ / (H·W) for the feature map F
`[C, H·W]`. An image's statistic is the logarithms log(G + 10⁻⁶) of the upper triangles of G₁,
G₂, G₃ concatenated (1192 numbers). The filters are zero-mean, so a flat area gives no response:
what the Gram entries hold is the energy and co-occurrence of change — edges between which
colours, stroke widths, flat fills versus patterns, grain — at three scales, that is, the style.
The logarithm puts "twice the edge energy" at the same distance whatever its layer or its level
(second moments span orders of magnitude); on raw Gram entries the few largest would decide.
Palette ΔE00 and the Lab EMD (`lorakit.palette`) say which colours are used and how much; this
says how they are laid out.

The filter weights come from numpy's PCG64 generator seeded with `SEED` through
`Generator.random` (uniform doubles taken straight from the raw bit stream, which numpy keeps
stable), centred per filter and scaled to variance 1/fan-in; no global RNG is touched. The
convolutions run in float32 on the CPU: the numbers are bit-identical across processes and thread
counts on one machine, and another CPU's float32 kernels may round differently (~1e-6 relative).
tests/test_metrics.py pins a few of them, so a change of filters or layout cannot go unnoticed.

Distance to a reference set (the training images): each of the 1192 numbers is standardised by
the reference images' mean and spread, and an image's distance is the root-mean-square of those
z-scores,

    d(x) = sqrt( mean_j ((s_j(x) − μ_j) / σ'_j)² ),   σ'_j = σ_j + ½ · mean_k σ_k,

(the floor keeps numbers that barely vary across the reference from dominating). The unit is
"the reference's own spread". On the sample brand (tests/test_metrics.py), held-out Tidewell
images score 0.55–0.92 against the other 13 and another brand's images drawn the same way
1.7–2.5; a Tidewell image with its pixels shuffled (same colours, no layout) scores 3× its own
number. It sees a change of colour alone (hues turned, lightness kept) or of motif alone (the
other brand's drawings in Tidewell's colours) on average only, 1.5× and 1.3× the held-out mean:
image by image, a change of colour is the two colour metrics' to catch, and a change of motif
alone is caught by none of the three. A set of images (a preview grid) scores the mean of its
images' distances. It needs at least two reference images (one has no spread).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.palette import ImageLike, as_rgb, srgb_to_lab

SEED = 0
"""Seed of the random filters. Changing it (or the layout below) changes every texture number."""
_CHANNELS = (3, 16, 32, 32)
_KERNEL = 5
_SIDE = 128
"""Images are resized to about `_SIDE`² pixels, aspect kept, so the scale of a texture is
measured relative to the whole image whatever its resolution."""
_FLOOR = 0.5
_EPS = 1e-6
"""Added before the log: co-activations below it count as absent. On the sample brand the median
Gram entry is 4e-4 and 15% are 0 (channel pairs that never fire together); it also sits far
above the float32 residue (~1e-14) a zero-mean filter leaves on a flat area."""


@functools.cache
def _filters() -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(SEED)  # private generator: no global RNG is touched
    out = []
    for cin, cout in itertools.pairwise(_CHANNELS):
        fan_in = cin * _KERNEL * _KERNEL
        w = rng.random((cout, cin, _KERNEL, _KERNEL)) * 2.0 - 1.0
        # zero-mean filters respond to change, not to the level of a flat area; the 1/fan-in
        # variance keeps every layer's activations at the input's order of magnitude
        w -= w.mean(axis=(1, 2, 3), keepdims=True)
        w *= np.sqrt(1.0 / fan_in) / w.std()
        out.append(torch.from_numpy(w).float())
    return tuple(out)


def _lab_tensor(item: ImageLike) -> torch.Tensor:
    """`[1, 3, H, W]` float32 Lab / 100 of the image resized to about `_SIDE`² pixels."""
    im = as_rgb(item)
    w, h = im.size
    s = _SIDE / np.sqrt(w * h)
    size = (max(16, round(w * s)), max(16, round(h * s)))
    if size != im.size:
        # BOX averages whole pixel blocks when shrinking; bicubic when enlarging small previews
        im = im.resize(size, Image.Resampling.BOX if s < 1 else Image.Resampling.BICUBIC)
    lab = srgb_to_lab(np.asarray(im, dtype=np.uint8)) / 100.0
    return torch.from_numpy(lab).float().permute(2, 0, 1)[None]


@torch.no_grad()
def texture_features(images: Iterable[ImageLike]) -> np.ndarray:
    """`[N, 1192]` float64 log-Gram statistics of `images` (PIL images, paths or `[H, W, 3]` uint8
    arrays), one row per image (see the module docstring)."""
    filters = _filters()
    rows = []
    for item in images:
        x = _lab_tensor(item)
        parts = []
        for i, w in enumerate(filters):
            pad = _KERNEL // 2
            x = F.relu(F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), w))
            f = x[0].flatten(1)
            gram = (f @ f.T / f.shape[1]).double().numpy()
            parts.append(np.log(gram[np.triu_indices(len(gram))] + _EPS))
            if i < len(filters) - 1:
                x = F.avg_pool2d(x, 2)
        rows.append(np.concatenate(parts))
    if not rows:
        raise ValueError("no images to compute texture statistics of")
    return np.stack(rows)


@dataclass
class TextureReference:
    """Mean and (floored) spread of the reference images' Gram statistics."""

    mean: np.ndarray
    """`[1192]` μ_j."""
    scale: np.ndarray
    """`[1192]` σ'_j = σ_j + ½ · mean σ (see the module docstring)."""
    images: int
    """How many reference images."""


def texture_reference(images: Iterable[ImageLike]) -> TextureReference:
    """The reference statistics of `images` (at least two: one image has no spread)."""
    feats = texture_features(images)
    if len(feats) < 2:
        raise ValueError("texture_reference needs at least two images (one has no spread)")
    sd = feats.std(0)
    return TextureReference(feats.mean(0), sd + _FLOOR * sd.mean(), len(feats))


def texture_distances(
    images: Iterable[ImageLike] | np.ndarray, ref: TextureReference
) -> np.ndarray:
    """`[N]` RMS z-score of each image's Gram statistics against `ref` (`images` may also be
    `texture_features` rows)."""
    feats = images if isinstance(images, np.ndarray) and images.ndim == 2 else None
    if feats is None:
        feats = texture_features(images)  # type: ignore[arg-type]
    z = (feats - ref.mean) / ref.scale
    return np.sqrt((z * z).mean(1))


def texture_distance(images: Iterable[ImageLike] | np.ndarray, ref: TextureReference) -> float:
    """Mean over `images` of `texture_distances`: the number a preview grid gets."""
    return float(texture_distances(images, ref).mean())
