"""Aspect-ratio buckets: sizes near a target area, assignment, resize + crop, batch-fit checks.

Sizes are `(width, height)` in pixels. For a resolution R the target area is R²; bucket sides
are multiples of a step (`data.bucket_step`, 0 = auto: 64 px for R ≥ 256, else 8 px so that the
64-px test resolution still has a handful of shapes and every side stays a multiple of the VAE's
factor 8), no side exceeds `R · sqrt(max_ratio)` and no bucket is more elongated than
`data.bucket_max_ratio`. The square bucket (R, R) is always present.

Each image goes to the bucket whose aspect ratio is closest in log space; it is scaled so that it
covers the bucket (never below), then cropped. The crop offset `(top, left)` is recorded: SDXL
conditions on it. With `no_upscale`, an image smaller than the bucket gets its own smaller bucket
(its size rounded down to the step) instead of being enlarged.
"""

from __future__ import annotations

import math
from collections import Counter

from lorakit.errors import ConfigError


def auto_step(resolution: int, step: int = 0) -> int:
    if step:
        return step
    return 64 if resolution >= 256 else 8


def family_step(resolution: int, step: int, pixel_multiple: int) -> int:
    """The bucket step a run uses: `data.bucket_step` (0 = `auto_step`) rounded up to a multiple
    of the model's pixel multiple (8 = the VAE factor; 16 where a transformer packs 2×2 latent
    patches), so every bucket side maps to whole latent patches. `train` and `prepare` both call
    this, so a set prepared for a family is bucketed exactly as that family's run buckets it."""
    s = auto_step(resolution, step)
    return s if s % pixel_multiple == 0 else math.lcm(s, pixel_multiple)


def make_buckets(resolution: int, step: int = 0, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """All bucket sizes for `resolution`, sorted by aspect ratio (width / height)."""
    step = auto_step(resolution, step)
    area = resolution * resolution
    max_side = int(resolution * math.sqrt(max_ratio)) // step * step
    out = {(resolution, resolution)}
    w = step
    while w <= max_side:
        h = min(area // w // step * step, max_side)
        if h >= step and max(w / h, h / w) <= max_ratio + 1e-9:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out, key=lambda b: b[0] / b[1])


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """`size` = (width, height) of the image."""
    ar = math.log(size[0] / size[1])
    # Ties go to the larger area (less cropping relative to the target).
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def no_upscale_bucket(size: tuple[int, int], bucket: tuple[int, int], step: int) -> tuple[int, int]:
    """The bucket to use when images must not be enlarged: `bucket` itself when the image covers
    it, else the image's own size scaled to the bucket's aspect and rounded down to `step`."""
    w, h = size
    if w >= bucket[0] and h >= bucket[1]:
        return bucket
    scale = min(w / bucket[0], h / bucket[1])
    bw = max(step, int(bucket[0] * scale) // step * step)
    bh = max(step, int(bucket[1] * scale) // step * step)
    return bw, bh


def resize_and_crop_plan(
    size: tuple[int, int], bucket: tuple[int, int], center: bool = True, jitter: float = 0.5
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (width, height), crop (top, left)) so that the resized image covers `bucket`.

    `jitter` in [0, 1] places the crop when `center` is false (0 = top/left, 1 = bottom/right).
    """
    w, h = size
    scale = max(bucket[0] / w, bucket[1] / h)
    rw, rh = max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale))
    fx = 0.5 if center else jitter
    return (rw, rh), (int((rh - bucket[1]) * fx), int((rw - bucket[0]) * fx))


def samples_per_bucket(assigned: list[tuple[tuple[int, int], int]]) -> Counter:
    """[(bucket, repeats)] → samples per epoch in each bucket."""
    counts: Counter = Counter()
    for bucket, repeats in assigned:
        counts[bucket] += repeats
    return counts


def underfull(counts: Counter, batch_size: int) -> dict[tuple[int, int], int]:
    """Buckets that cannot fill a single batch (their images would never be trained)."""
    return {b: n for b, n in counts.items() if n < batch_size}


def merge_plan(counts: Counter, batch_size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Which bucket each underfull bucket moves into: the nearest in aspect ratio, smallest first,
    repeated until every bucket fills a batch or only one bucket is left."""
    counts = Counter(counts)
    moved: dict[tuple[int, int], tuple[int, int]] = {}
    while len(counts) > 1:
        small = sorted(underfull(counts, batch_size).items(), key=lambda kv: (kv[1], kv[0]))
        if not small:
            break
        src = small[0][0]
        others = [b for b in counts if b != src]
        dst = closest_bucket(src, others)
        counts[dst] += counts.pop(src)
        for k, v in list(moved.items()):
            if v == src:
                moved[k] = dst
        moved[src] = dst
    return moved


def batch_fit_message(
    bad: dict[tuple[int, int], int], batch_size: int, where: str, small_buckets: str = ""
) -> str:
    """Why some buckets cannot fill a batch and the choices that fix it (the one already set,
    `small_buckets`, is not offered again)."""
    listed = ", ".join(f"{w}×{h} ({n} sample{'s' * (n != 1)})" for (w, h), n in sorted(bad.items()))
    choices = [
        "--set data.small_buckets=merge (move them into the nearest bucket, more cropping)",
        "--set data.small_buckets=drop (leave them out)",
        "lower train.batch_size",
        "--set data.bucketing=false (one square bucket)",
        "add images of those shapes",
    ]
    choices = [c for c in choices if not small_buckets or f"={small_buckets} " not in c]
    return (
        f"With train.batch_size = {batch_size}, these aspect-ratio buckets of {where} cannot fill "
        f"one batch, so their images would never be trained: {listed}. Choose one: "
        + ", ".join(choices[:-1])
        + f", or {choices[-1]}."
    )


def too_few_samples(counts: Counter, batch_size: int, where: str) -> str:
    """'' when the whole set fills at least one batch; else the one-paragraph refusal (no bucket
    choice can help then, so none is offered)."""
    total = sum(counts.values())
    if total >= batch_size:
        return ""
    return (
        f"train.batch_size = {batch_size}, but {where} has only {total} sample"
        f"{'s' * (total != 1)} per epoch (images × repeats), so it cannot fill one batch. Lower "
        f"the batch size (--set train.batch_size={max(total, 1)}; `prepare` takes "
        f"--batch-size {max(total, 1)}), raise data.repeats, or add images."
    )


def check_fit(counts: Counter, batch_size: int, where: str) -> None:
    bad = underfull(counts, batch_size)
    if bad:
        raise ConfigError(batch_fit_message(bad, batch_size, where))
