"""The dataset doctor: per-image decode/normalise/resize (run in worker processes) and the checks
across files (duplicates, captions, trigger).

`process_image(job)` is the only function that decodes an image. It is a pure function of the
raw file bytes and the processing parameters, imports nothing heavy (no torch), and returns a
plain dict, so it runs in a `ProcessPoolExecutor` and its result can be cached by content hash.

Normalisation, in order: EXIF orientation applied; ICC profile converted to sRGB when present;
16-bit → 8-bit; CMYK / palette / greyscale / 1-bit → RGB; alpha flattened onto
`data.background` (and kept as the loss mask, as is a mask file: see `masks`). The result is
resized to cover its bucket (Lanczos) and cropped; the output is an RGB image of exactly the
bucket size, stored uncompressed (binary PPM, see `encode_image`).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageOps, UnidentifiedImageError

from lorakit.data import masks
from lorakit.data.buckets import (
    closest_bucket,
    make_buckets,
    no_upscale_bucket,
    resize_and_crop_plan,
)
from lorakit.data.layouts import Problem

EXTREME_ASPECT = 4.0
"""Images more elongated than this lose most of their area to the crop; reported."""

PROCESS_VERSION = "5"
"""Bumped when `process_image` changes its output, so caches from older versions are not reused."""


@dataclass(frozen=True)
class Params:
    """Everything `process_image` depends on besides the bytes (part of every cache key)."""

    resolution: int
    bucketing: bool
    bucket_step: int
    bucket_max_ratio: float
    no_upscale: bool
    center_crop: bool
    background: tuple[int, int, int]
    min_side: int
    max_pixels: int
    mask_flatten: bool = False

    @classmethod
    def from_data(cls, data, max_pixels: int | None = None) -> Params:
        return cls(
            resolution=data.resolution,
            bucketing=data.bucketing,
            bucket_step=data.bucket_step,
            bucket_max_ratio=data.bucket_max_ratio,
            no_upscale=data.no_upscale,
            center_crop=data.center_crop,
            background=parse_colour(data.background),
            min_side=data.min_side or data.resolution // 2,
            max_pixels=max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485,
            mask_flatten=data.mask_flatten,
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{PROCESS_VERSION}|{self!r}".encode()).hexdigest()[:16]

    def buckets(self) -> list[tuple[int, int]]:
        if not self.bucketing:
            return [(self.resolution, self.resolution)]
        return make_buckets(self.resolution, self.bucket_step, self.bucket_max_ratio)


def parse_colour(text: str) -> tuple[int, int, int]:
    from lorakit.errors import ConfigError

    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise ConfigError(
            f"Config key 'data.background' = {text!r} is not a colour. Use a name ('white') or "
            "hex ('#1a2b3c')."
        ) from None
    return tuple(rgb[:3])  # type: ignore[return-value]


# -- per image (worker side) ---------------------------------------------------------------------


def _fail(kind: str, message: str) -> dict:
    return {"ok": False, "problems": [(kind, message, "error")], "decoded": 1}


def _to_rgb(im: Image.Image, bg: tuple[int, int, int], notes: list[str]) -> Image.Image:
    if getattr(im, "n_frames", 1) > 1:  # animated GIF/WebP/APNG: PIL decodes frame 0
        notes.append("animated: first frame used")
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            desc = ImageCms.getProfileDescription(src).strip()
            if "srgb" not in desc.lower():
                has_alpha = im.mode in ("RGBA", "LA")
                alpha = im.getchannel("A") if has_alpha else None
                base = im.convert("RGB" if im.mode == "RGBA" else "L") if has_alpha else im
                conv = ImageCms.profileToProfile(
                    base, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
                )
                if alpha is not None:
                    conv.putalpha(alpha)
                im = conv
                notes.append(f"colour profile '{desc}' → sRGB")
        except (OSError, ValueError, ImageCms.PyCMSError, TypeError) as e:
            notes.append(f"colour profile ignored ({e})")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append("16-bit → 8-bit")
    elif im.mode == "F":
        arr = np.asarray(im)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append("float → 8-bit")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        notes.append("palette → RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("alpha flattened onto the background colour")
        canvas = Image.new("RGBA", rgba.size, (*bg, 255))
        im = Image.alpha_composite(canvas, rgba)
    if im.mode != "RGB":
        if im.mode == "CMYK":
            notes.append("CMYK → RGB")
        elif im.mode in ("L", "1"):
            notes.append("greyscale → RGB")
        im = im.convert("RGB")
    return im


def process_image(job: tuple) -> dict:
    """Decode, check, normalise and bucket one image.

    job = (name, raw bytes, params, forced bucket or None, fast_decode[, sha256 hex of raw —
    computed here when the caller has not hashed the bytes already[, raw bytes of the image's
    mask file or None]]).
    Returns {"ok", "problems": [(kind, message, severity)], "decoded": 1, and when ok:
    "original_size": (h, w), "bucket": (w, h), "crop": (top, left), "key", "png", "mask"
    (`masks.encode_mask` bytes at the bucket size, or None: no alpha, no mask file), "phash",
    "notes"}. The mask is cropped and resized exactly as the image (`masks.fit_mask`) and is part
    of the key.
    """
    with warnings.catch_warnings():
        # PIL only warns between 1× and 2× its pixel limit: refuse those too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, job[2].max_pixels
        try:
            return _process(job)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _process(job: tuple) -> dict:
    _name, raw, p, forced, fast_decode = job[:5]
    digest = job[5] if len(job) > 5 else hashlib.sha256(raw).hexdigest()
    mask_raw = job[6] if len(job) > 6 else None
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        return _fail("decompression_bomb", f"refused: {e}")
    except Image.DecompressionBombWarning as e:
        return _fail("decompression_bomb", f"refused: {e}")
    except UnidentifiedImageError:
        return _fail(
            "not_image", "not an image file PIL can read (wrong extension or not a picture)"
        )
    except (OSError, ValueError, SyntaxError) as e:
        return _fail("corrupt", f"cannot be read: {e}")
    notes: list[str] = []
    try:
        w0, h0 = im.size
        if im.format != "JPEG":
            # PNG & co. read EXIF only after decoding; load now so a decode error is not lost
            # in the EXIF guard below. JPEG's EXIF is parsed at open (draft() needs no load).
            if min(w0, h0) < p.min_side:
                return _fail(
                    "too_small",
                    f"{w0}×{h0} px is below the minimum side {p.min_side} px (data.min_side)",
                )
            im.load()
        exif_rot = False
        try:
            orientation = im.getexif().get(0x0112, 1)
            exif_rot = orientation in (5, 6, 7, 8)
            if orientation not in (1, None):
                notes.append("EXIF orientation applied")
        except Exception:  # a damaged EXIF block must not lose the image
            orientation = 1
        w, h = (h0, w0) if exif_rot else (w0, h0)
        if min(w, h) < p.min_side:
            return _fail(
                "too_small",
                f"{w}×{h} px is below the minimum side {p.min_side} px (data.min_side)",
            )
        buckets = p.buckets()
        bucket = forced or closest_bucket((w, h), buckets)
        if p.no_upscale and forced is None:
            bucket = no_upscale_bucket(
                (w, h), bucket, max(8, p.bucket_step or (64 if p.resolution >= 256 else 8))
            )
        if fast_decode and im.format == "JPEG" and mask_raw is None:
            # (not with a mask file: it must match the image pixel for pixel)
            # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding; never below the bucket.
            scale = max(bucket[0] / w, bucket[1] / h)
            want = (math.ceil(w0 * scale), math.ceil(h0 * scale))
            im.draft(im.mode, want)
        im.load()
        im = ImageOps.exif_transpose(im) if orientation not in (1, None) else im
        mask, mask_origin, mask_failure = masks.source_mask(im, mask_raw)
        if mask_failure is not None:
            return _fail(*mask_failure)
        im = _to_rgb(im, p.background, notes)
        if mask is not None:
            origin = "its alpha channel" if mask_origin == "alpha" else "a mask file"
            notes.append(f"loss mask from {origin}")
            if p.mask_flatten and mask_origin == "file":
                im = masks.flatten(im, mask, p.background)
                notes.append("flattened through its mask onto the background colour")
    except Image.DecompressionBombError as e:
        return _fail("decompression_bomb", f"refused: {e}")
    except OSError as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        return _fail(kind, f"cannot be decoded: {e}")
    except (ValueError, SyntaxError, MemoryError, Image.DecompressionBombWarning) as e:
        return _fail("corrupt", f"cannot be decoded: {e}")
    problems: list[tuple[str, str, str]] = []
    ratio = max(w / h, h / w)
    if ratio > EXTREME_ASPECT:
        problems.append(
            (
                "extreme_aspect",
                f"aspect ratio {ratio:.1f}:1 ({w}×{h}); the crop to {bucket[0]}×{bucket[1]} "
                "loses most of the image",
                "warning",
            )
        )
    jitter = int(digest[:8], 16) / 0xFFFFFFFF
    (rw, rh), (top, left) = resize_and_crop_plan(im.size, bucket, p.center_crop, jitter)
    if mask is not None:
        mask = masks.fit_mask(mask, im.size, (rw, rh), (top, left), bucket)
        covered = masks.coverage_problem(mask, mask_origin)
        problems += [covered] if covered else []
        mask = masks.encode_mask(mask)
    if (rw, rh) != im.size:
        # Resample only the kept region: the same pixel centres as resize-then-crop, without
        # filtering the columns/rows the crop throws away.
        sx, sy = im.width / rw, im.height / rh
        box = (left * sx, top * sy, (left + bucket[0]) * sx, (top + bucket[1]) * sy)
        im = im.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    else:
        im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    import imagehash

    # One integer box reduction (~0.2 ms) gives the contact-sheet thumbnail, and phash (which
    # squashes to 32×32 anyway) reads the thumbnail instead of the full image.
    thumb = im.reduce(max(1, -(-max(im.size) // THUMB)))
    phash = str(imagehash.phash(thumb))
    encoded = encode_image(im)
    return {
        "ok": True,
        "problems": problems,
        "decoded": 1,
        "original_size": (h, w),
        "bucket": bucket,
        "crop": (top, left),
        "key": image_key(encoded if mask is None else encoded + mask, bucket, (top, left)),
        "png": encoded,
        "mask": mask,
        "phash": phash,
        "notes": notes,
        "thumb": (thumb.size, thumb.tobytes()),
    }


def rebucket(
    encoded: bytes, crop: tuple[int, int], bucket: tuple[int, int], mask: bytes | None = None
) -> dict:
    """Move an already prepared image (bytes from `encode_image`, cropped at `crop` = (top, left))
    into another `bucket` (width, height): Lanczos-resize to cover it, centre-crop, re-encode.
    Its `mask` (`masks.encode_mask` bytes or None) moves with it (`masks.fit_mask`).

    Used to merge small buckets of a prepared set at load time (the source may be gone). The
    returned crop is in the coordinates of the original image resized to the new scale (old
    offset scaled + the new crop), so SDXL's crop conditioning stays meaningful.
    Returns {"png", "mask", "bucket", "crop", "key"} like `process_image`.
    """
    with Image.open(io.BytesIO(encoded)) as src:
        im = src.convert("RGB")
    size = im.size
    (rw, rh), (top, left) = resize_and_crop_plan(size, bucket, True)
    scale = rw / im.width
    if (rw, rh) != im.size:
        im = im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    new_crop = (round(crop[0] * scale) + top, round(crop[1] * scale) + left)
    encoded = encode_image(im)
    if mask is not None:
        with Image.open(io.BytesIO(mask)) as src:
            m = src.convert("L")
        mask = masks.encode_mask(masks.fit_mask(m, size, (rw, rh), (top, left), bucket))
    key = image_key(encoded if mask is None else encoded + mask, bucket, new_crop)
    return {"png": encoded, "mask": mask, "bucket": tuple(bucket), "crop": new_crop, "key": key}


def image_key(encoded: bytes, bucket: tuple[int, int], crop: tuple[int, int]) -> str:
    """Identity of a prepared image: sha256 of its encoded pixels (`encode_image`: a fixed PPM
    header + the raw RGB bytes) + bucket + crop — what the latent cache is keyed by, so the same
    pixels from any layout share latents and any pixel change gets new ones."""
    h = hashlib.sha256(encoded)
    h.update(f"|{tuple(bucket)}|{tuple(crop)}".encode())
    return h.hexdigest()[:32]


THUMB = 92
"""Contact-sheet thumbnail size; made in the worker so the sheet needs no second decode."""


def encode_image(im: Image.Image) -> bytes:
    """Uncompressed binary PPM (RGB, 8 bit): lossless, any PIL (and `datasets.Image`) opens it.

    Measured on 512² crops of the benchmark JPEGs (ms CPU to encode / KB): PPM 0.25 / 768,
    lossless WebP method 0 10 / 326 (147 on a smooth image), PNG level 1 20 / 421, TIFF zstd
    3.6 / 754, lz4 or zstd of the raw bytes 0.3–1.8 / 650–768. Only WebP and PNG save space,
    and they cost as much as the decode + resize itself (prepare would lose to a plain PIL
    loop); the size (3 bytes per pixel, 0.75 MB per 512² image) is the price of speed.
    """
    buf = io.BytesIO()
    im.save(buf, format="PPM")
    return buf.getvalue()


# -- across files (main process) -----------------------------------------------------------------

_TOKEN_RE = re.compile(r"[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """CLIP-style pre-tokenisation count (words, single digits, punctuation runs): a lower bound
    of the BPE token count, good enough to flag captions that will be truncated."""
    return len(_TOKEN_RE.findall(text.lower()))


def near_duplicates(hashes: dict[str, str], max_distance: int) -> list[tuple[str, str, int]]:
    """Pairs (a, b, distance) of perceptual hashes (hex) within `max_distance` bits."""
    if max_distance < 0:
        return []
    names = sorted(hashes)
    ints = [int(hashes[n], 16) for n in names]
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            d = (ints[i] ^ ints[j]).bit_count()
            if d <= max_distance:
                out.append((names[i], names[j], d))
    return out


def caption_problems(
    name: str, caption: str | None, trigger: str, max_tokens: int, count_tokens=estimate_tokens
) -> list[Problem]:
    out: list[Problem] = []
    if caption is None:
        out.append(Problem("missing_caption", name, "no caption; data.default_caption used"))
        return out
    if not caption.strip():
        out.append(
            Problem("empty_caption", name, "caption file is empty; data.default_caption used")
        )
        return out
    if (
        trigger
        and trigger not in caption
        and "[trigger]" not in caption
        and "{trigger}" not in caption
    ):
        out.append(
            Problem(
                "trigger_missing", name, f"caption lacks the trigger '{trigger}'; it is prefixed"
            )
        )
    n = count_tokens(caption)
    if max_tokens and n > max_tokens:
        out.append(
            Problem(
                "caption_too_long",
                name,
                f"caption has about {n} tokens; the text encoder keeps {max_tokens}, the rest is "
                "cut off",
            )
        )
    return out
