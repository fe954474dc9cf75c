"""Brand palette: k-means colours in CIELAB, and a palette distance in ΔE units.

Colour space: sRGB (D65) → linear RGB → XYZ → CIELAB (L in [0, 100]), the standard formulas
(IEC 61966-2-1, CIE 15), numpy only. Distances are CIE76 ΔE (Euclidean in Lab): about 2.3 is a
just-noticeable difference, above 10 the colours read as different.

`extract_palette` clusters the pixels of some images with a seeded k-means++ (deterministic for
a seed); each colour's weight is the share of pixels it covers. When the images hold at most
`k` distinct colours they are returned exactly.

`palette_distance(images, brand)` extracts the images' own palette with the same k and returns
the symmetric weighted nearest-colour distance

    d = ½ · Σ_i w_i · min_j ΔE(c_i, b_j)  +  ½ · Σ_j v_j · min_i ΔE(b_j, c_i)

(c, w: the images' colours and weights; b, v: the brand's). The first half grows when the images
use off-brand colours, the second when they leave brand colours out. It is 0 for images painted
in exactly the brand colours, in ΔE units otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# sRGB (D65) → XYZ, and the D65 white point.
_M = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """`[..., 3]` sRGB (uint8 0–255, or float 0–1) → `[..., 3]` CIELAB float64."""
    rgb = np.asarray(rgb)
    c = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M.T / _WHITE
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


@dataclass
class Palette:
    lab: np.ndarray
    """`[K, 3]` colours in CIELAB."""
    weights: np.ndarray
    """`[K]` share of pixels per colour, summing to 1 (largest first)."""
    rgb: np.ndarray
    """`[K, 3]` uint8 mean sRGB of each colour's pixels (for swatches)."""

    def hex(self) -> list[str]:
        return ["#{:02x}{:02x}{:02x}".format(*map(int, c)) for c in self.rgb]

    def to_dict(self) -> dict:
        return {
            "colors": self.hex(),
            "weights": [round(float(w), 4) for w in self.weights],
            "lab": [[round(float(v), 2) for v in c] for c in self.lab],
        }


ImageLike = Image.Image | str | Path | np.ndarray


def _pixels(images: Iterable[ImageLike], size: int) -> np.ndarray:
    """All pixels `[N, 3]` uint8 of the images, each first shrunk to at most `size` px."""
    out = []
    for item in images:
        if isinstance(item, np.ndarray):
            im = Image.fromarray(np.asarray(item, dtype=np.uint8)[..., :3])
        elif isinstance(item, (str, Path)):
            with Image.open(item) as opened:
                im = opened.convert("RGB")
        else:
            im = item.convert("RGB")
        if max(im.size) > size:
            # BOX averages whole pixel blocks: no ringing colours that were not there.
            im = im.copy()
            im.thumbnail((size, size), Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.uint8)
        out.append(arr.reshape(-1, 3))
    if not out:
        raise ValueError("no images to extract a palette from")
    return np.concatenate(out)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4) -> np.ndarray:
    """Labels `[N]` of the best (lowest inertia) of `restarts` k-means++ runs on `x` `[N, 3]`.
    Restarts matter: one run can park a centre on a few edge pixels and merge two real colours."""
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        labels, inertia = _kmeans_once(x, k, rng)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best  # type: ignore[return-value]


def _kmeans_once(
    x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50
) -> tuple[np.ndarray, float]:
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centers.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centers)
    labels = np.zeros(len(x), dtype=np.int64)
    x2 = (x * x).sum(1)[:, None]
    for it in range(iters):
        # |x - c|² = |x|² - 2 x·c + |c|²: one [N, k] product instead of an [N, k, 3] temporary
        dist = x2 - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
        new = dist.argmin(1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=k) for d in range(3)], 1)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
        if not filled.all():  # empty cluster: restart it at the worst-fitted point
            c[~filled] = x[dist.min(1).argmax()]
    inertia = float(((x - c[labels]) ** 2).sum())
    return labels, inertia


def extract_palette(
    images: Iterable[ImageLike],
    k: int = 6,
    seed: int = 0,
    max_pixels: int = 40_000,
    size: int = 128,
) -> Palette:
    """The `k` dominant colours of `images` (PIL images, paths or `[H, W, 3]` uint8 arrays)."""
    if k <= 0:
        raise ValueError("k must be at least 1")
    rgb = _pixels(images, size)
    rng = np.random.default_rng(seed)
    uniq, counts = np.unique(rgb, axis=0, return_counts=True)
    if len(uniq) <= k:
        colours, weights, means = srgb_to_lab(uniq), counts.astype(np.float64), uniq
    else:
        if len(rgb) > max_pixels:
            rgb = rgb[np.sort(rng.choice(len(rgb), max_pixels, replace=False))]
        lab = srgb_to_lab(rgb)
        labels = _kmeans(lab, k, rng)
        used = [j for j in range(k) if (labels == j).any()]
        colours = np.stack([lab[labels == j].mean(0) for j in used])
        weights = np.array([(labels == j).sum() for j in used], dtype=np.float64)
        means = np.stack([rgb[labels == j].mean(0) for j in used])
    order = np.argsort(-weights, kind="stable")
    return Palette(
        lab=colours[order],
        weights=weights[order] / weights.sum(),
        rgb=np.clip(np.rint(means[order]), 0, 255).astype(np.uint8),
    )


def _one_way(a: Palette, b: Palette) -> float:
    d = np.sqrt(((a.lab[:, None, :] - b.lab[None, :, :]) ** 2).sum(-1))
    return float((a.weights * d.min(1)).sum())


def palette_distance(
    images: Iterable[ImageLike] | Palette, brand: Palette, k: int | None = None, seed: int = 0
) -> float:
    """Symmetric weighted nearest-colour ΔE between `images` (or their palette) and `brand`
    (see the module docstring). `k` defaults to the brand palette's size."""
    other = (
        images
        if isinstance(images, Palette)
        else extract_palette(images, k or len(brand.lab), seed=seed)
    )
    return 0.5 * _one_way(other, brand) + 0.5 * _one_way(brand, other)
