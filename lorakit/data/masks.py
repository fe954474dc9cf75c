"""Masked loss: a per-image weight mask that decides which pixels the adapter learns.

Where an image's mask comes from (`attach_masks`, `source_mask`), first match wins:

1. a sidecar mask file: `DIR/name.mask.EXT` next to `DIR/name.ext`, or `SRC/masks/REL/name.EXT`
   (a `masks/` folder at the data root mirroring the data's sub-folders); any image format,
   the same size as its image (as displayed: EXIF orientation applied to both);
2. the image's alpha channel, when it has transparent pixels (brand assets exported as
   transparent PNGs): the alpha is kept as the mask, the RGB flattened onto `data.background`
   is still what the VAE sees;
3. none: the image weighs 1 everywhere.

Mask values are 8-bit grey: 255 (white, opaque) = learned at full weight, 0 (black,
transparent) = weight `train.mask_background`, grey in between. A mask file with an alpha channel
is read composited onto black (a white shape on transparency means: learn the shape).

The mask is bucketed and cropped with its image in `doctor.process_image` (the same resize box
and crop, box-filtered so a weight never rings outside [0, 255]), stored next to the prepared
image (`mask` column, 8-bit PGM), and is part of the image's content key, so the latent cache
and the resume fingerprint change when only the mask changes. lorakit has no flip augmentation;
a future one must flip `Cached.masks[i]` with `Cached.latents[i]`.

At latent resolution (`reduce_to_latent`) a latent cell's mask value is the mean of the pixel
mask over the `f × f` pixels it covers (`f` = the VAE factor: 8; F.adaptive_avg_pool2d, which for
bucket sides that are multiples of `f` is exactly the box mean). It is cached next to the latents
(`MaskCache`, keyed by the record's content key and the latent size).

The loss (`masked_mse`): weights `w = b + (1 - b)·m` (`b` = `train.mask_background`, `m` the
latent mask in [0, 1]); per sample `Σ w·(pred − target)² / Σ w` over channels and latent cells, so
the loss scale does not depend on the mask's area (a sample whose mask keeps 10 % of the image
weighs as much as a full one). The training loop sets the batch's weights with `loss_mask(...)`
around `family.loss`; `flow.weighted_mse` and `ddpm.ddpm_loss` read them (`active_weights`), so no
family names the mask, and every family's `loss` compares `pred` and `target` in the unpacked
`[B, C, h, w]` latent layout in which the mask is given (packing into 2×2 patches happens inside
`predict`).

What `mask_background = 0` guarantees: the loss and its gradient do not depend on the
denoiser's output at latent cells whose mask is 0 (exactly: those terms are multiplied by 0).
The pixels outside the mask still reach the denoiser's INPUT (the noisy latent is the whole image,
and the VAE's receptive field spans the mask edge), so they are context the adapter sees but is
never trained to produce — unless they are removed from the input too: the image is flattened
onto `data.background` through its mask before anything else (as a transparent PNG's alpha is).
That happens with `data.mask_flatten = true`, and by itself at `mask_background = 0`
(`spec.masked_data`): two data sets that differ only where their masks are 0 then give
bit-identical adapters (tests/test_masked_loss.py). Above 0 the surroundings stay as context.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.errors import ConfigError, LorakitError

if TYPE_CHECKING:
    from lorakit.data.layouts import Listing, SourceItem

MASK_DIR = "masks"
"""The folder at the data root that mirrors the data's sub-folders with one mask per image."""
MASK_SUFFIX = ".mask"
"""`name.mask.png` is the mask of `name.<ext>` in the same folder."""
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
REDUCTION = "area-v1"
"""Identity of the pixel → latent reduction rule (part of the mask cache key)."""

PROBLEM_KINDS = ("mask_orphan", "mask_ambiguous", "mask_unreadable", "mask_not_image", "mask_size")
"""Problems that stop `prepare` / `train` (one paragraph, nothing written)."""


# -- listing: which file is whose mask -----------------------------------------------------------


def mask_target(rel: str) -> str | None:
    """The image stem (relative path without extension, lower case) a mask file belongs to, or
    None when `rel` (a path relative to the data root, `/`-separated) is not a mask file."""
    p = Path(rel)
    if p.suffix.lower() not in IMAGE_EXTS:
        return None
    parts = p.parts
    if len(parts) > 1 and parts[0].lower() == MASK_DIR:
        return Path(*parts[1:]).with_suffix("").as_posix().lower()
    stem = p.with_suffix("")
    if stem.suffix.lower() == MASK_SUFFIX:
        return stem.with_suffix("").as_posix().lower()
    return None


def attach_masks(listing: Listing, root: str | Path) -> None:
    """Take the mask files out of `listing` (a folder tree lists them as images; an imagefolder
    reports them as unlisted images) and give each image its mask: `item.extra["mask"]` = the
    mask's path, `item.extra["mask_name"]` = its name relative to `root`. A mask without an
    image, or an image with two masks, becomes an error `Problem` (see `refusal`). Layouts
    without files (`datasets`, hf:) have no sidecar masks: their alpha channels still count."""
    from lorakit.data.layouts import Problem

    root = Path(root)
    found: dict[str, list[tuple[str, Path]]] = {}
    kept: list[SourceItem] = []
    for it in listing.items:
        target = mask_target(it.name) if it.path is not None else None
        if target is None:
            kept.append(it)
        else:
            found.setdefault(target, []).append((it.name, it.path))
    problems = []
    for pr in listing.problems:
        target = mask_target(pr.file) if pr.kind == "unlisted_image" else None
        if target is None:
            problems.append(pr)
        else:
            found.setdefault(target, []).append((pr.file, root / pr.file))
    if not found:
        return
    used: set[str] = set()
    for it in kept:
        if it.path is None:
            continue
        stem = Path(it.name).with_suffix("").as_posix().lower()
        mine = found.get(stem, [])
        if len(mine) > 1:
            names = " and ".join(f"'{n}'" for n, _ in mine)
            problems.append(
                Problem("mask_ambiguous", it.name, f"has two masks ({names}); keep one", "error")
            )
        elif mine:
            it.extra["mask"], it.extra["mask_name"] = mine[0][1], mine[0][0]
        if mine:
            used.add(stem)
    for stem, masks in sorted(found.items()):
        if stem not in used:
            for name, _ in masks:
                problems.append(
                    Problem(
                        "mask_orphan",
                        name,
                        f"mask file without an image (no image '{stem}.*' in the data)",
                        "error",
                    )
                )
    listing.items[:] = kept
    listing.problems[:] = problems


def read_mask_bytes(item: SourceItem) -> bytes | None:
    """The raw bytes of the item's sidecar mask file (None when it has none); OSError when the
    file cannot be read."""
    path = item.extra.get("mask")
    return None if path is None else Path(path).read_bytes()


def content_hash(image_hash: str, mask_raw: bytes | None) -> str:
    """The prepare cache's content id of an image with its sidecar mask: the image's sha256,
    plus that of the mask file when there is one (so a changed mask is processed again)."""
    if mask_raw is None:
        return image_hash
    return f"{image_hash}+{hashlib.sha256(mask_raw).hexdigest()[:16]}"


# -- per image (prepare's worker side: PIL only, no torch work) ----------------------------------

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def source_mask(im, mask_raw: bytes | None):
    """(mask, origin, failure) for a decoded image `im` (EXIF orientation applied): `mask` an 8-bit
    `L` image of `im.size` or None, `origin` "file" / "alpha" / "", `failure` None or a
    (kind, message) pair for a mask file that cannot be used."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if mask_raw is not None:
        try:
            with Image.open(io.BytesIO(mask_raw)) as raw:
                raw.load()
                m = ImageOps.exif_transpose(raw)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None, "", ("mask_not_image", "its mask file is not an image PIL can read")
        except Image.DecompressionBombError as e:
            return None, "", ("mask_not_image", f"its mask file was refused: {e}")
        if m.size != im.size:
            (mw, mh), (w, h) = m.size, im.size
            return (
                None,
                "",
                (
                    "mask_size",
                    f"its mask is {mw}×{mh} px but the image is {w}×{h} px (both as displayed, "
                    "EXIF orientation applied)",
                ),
            )
        return _grey(m), "file", None
    has_alpha = im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha, "alpha", None
    return None, "", None


def _grey(m):
    """A mask file as 8-bit grey: alpha composited onto black, 16-bit / float scaled."""
    import numpy as np
    from PIL import Image

    if m.mode in _ALPHA_MODES or (m.mode == "P" and "transparency" in m.info):
        rgba = m.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if m.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(m).astype(np.float64)
        peak = 1.0 if m.mode == "F" and arr.max() <= 1.0 else 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return m.convert("L")


def flatten(im, mask, background: tuple[int, int, int]):
    """`im` (RGB) where the mask is 255, `background` where it is 0, blended in between: what
    `data.mask_flatten` feeds the VAE (the same rule as a transparent PNG's alpha). Exact at 0
    and 255, so pixels under a 0 mask never reach the result."""
    from PIL import Image

    return Image.composite(im, Image.new("RGB", im.size, background), mask)


def fit_mask(mask, size: tuple[int, int], resized: tuple[int, int], crop, bucket):
    """The mask cropped and resized exactly as its image: `size` the image's size when the plan
    was made, `resized` the size it is scaled to before cropping at `crop` = (top, left) to
    `bucket` = (w, h). Box-filtered (area mean): a weight map must not ring outside [0, 255]."""
    from PIL import Image

    top, left = crop
    if resized == size and mask.size == size:
        return mask.crop((left, top, left + bucket[0], top + bucket[1]))
    sx, sy = mask.width / resized[0], mask.height / resized[1]
    box = (left * sx, top * sy, (left + bucket[0]) * sx, (top + bucket[1]) * sy)
    return mask.resize(bucket, Image.Resampling.BOX, box=box)


def coverage_problem(mask, origin: str) -> tuple[str, str, str] | None:
    """A report line for a mask that is empty (all 0) or full (all 255) after cropping."""
    lo, hi = mask.getextrema()
    where = "its alpha channel" if origin == "alpha" else "its mask file"
    if hi == 0:
        return (
            "mask_empty",
            f"the mask ({where}) is empty after cropping to {mask.width}×{mask.height}: with "
            "train.masked_loss this image would train nothing. Paint the part to learn white "
            "(masks are white where the loss counts), or remove the image",
            "warning",
        )
    if lo == 255:
        return (
            "mask_full",
            f"the mask ({where}) covers the whole image after cropping to "
            f"{mask.width}×{mask.height}: masked loss changes nothing for it",
            "warning",
        )
    return None


def encode_mask(mask) -> bytes:
    """8-bit binary PGM (uncompressed, like the prepared images: see `doctor.encode_image`)."""
    buf = io.BytesIO()
    mask.save(buf, format="PPM")
    return buf.getvalue()


def decode_mask(encoded: bytes) -> torch.Tensor:
    """`encode_mask` bytes → `[H, W]` float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)


def refusal(problems, where: str) -> str:
    """One paragraph for every unusable mask file among `problems` ('' when there is none):
    what is wrong with each and what to do."""
    bad = [p for p in problems if p.kind in PROBLEM_KINDS]
    if not bad:
        return ""
    listed = "; ".join(f"'{p.file}': {p.message}" for p in bad[:8])
    more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
    return (
        f"The masks of '{where}' cannot be used: {listed}{more}. A mask is a greyscale image of "
        "exactly its image's size (white = learn, black = ignore), named 'name.mask.png' next to "
        "'name.jpg' or placed at 'masks/<same sub-folders>/name.png' under the data folder; "
        "re-export the listed masks at their image's size as PNG, give each image one mask, "
        "and remove or rename mask files whose image is gone (nothing was written)."
    )


# -- at train time ---------------------------------------------------------------------------------


def check_masks(data, train) -> None:
    """With `train.masked_loss`: refuse a set without any mask and images whose mask is empty
    (all 0), and note images without a mask (they train on the whole image) in
    `data.problems`. `data`: a `TrainingSet`."""
    if not train.masked_loss:
        return
    from lorakit.data.layouts import Problem

    masks = data.masks
    if not any(m is not None for m in masks):
        raise ConfigError(
            "train.masked_loss = true, but no image of the data set has a mask, so every image "
            "would train as a whole. Give the images masks: transparent PNGs (the alpha channel "
            "is the mask), a 'name.mask.png' next to 'name.jpg', or a 'masks/' folder at the data "
            "root mirroring the data's sub-folders (white = learn, black = ignore); a set "
            "written by an older `lorakit prepare` kept no masks: prepare it again. Or set "
            "train.masked_loss = false."
        )
    empty = [data.sources[i] for i, m in enumerate(masks) if m is not None and is_empty(m)]
    if empty:
        shown = ", ".join(f"'{s}'" for s in empty[:8]) + (
            f" (+{len(empty) - 8} more)" if len(empty) > 8 else ""
        )
        raise LorakitError(
            f"train.masked_loss = true, but the masks of {len(empty)} image(s) are empty (all "
            f"black or fully transparent after cropping to their bucket): {shown}. An empty mask "
            "trains nothing at train.mask_background = 0 and the whole image otherwise, which is "
            "never what a mask means (an inverted mask, black = learn, is the usual cause: masks "
            "are white where the loss counts). Fix or remove those masks or images, or set "
            "train.masked_loss = false."
        )
    missing = sum(m is None for m in masks)
    if missing:
        data.problems.append(
            Problem(
                "no_mask",
                f"{missing} image(s)",
                "have no mask (no alpha, no mask file): with train.masked_loss they train on the "
                "whole image",
            )
        )


def is_empty(encoded: bytes) -> bool:
    """Whether an `encode_mask` PGM is all 0 (its pixel bytes follow the 3-line header)."""
    body = bytes(encoded).split(b"\n", 3)[-1]
    return not body.strip(b"\x00")


def reduce_to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask `[H, W]` → latent mask `[h, w]` = `size`: each cell the mean of the pixels it
    covers (area / box mean)."""
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(mask[None, None].float(), size)[0, 0].contiguous()


class MaskCache:
    """Latent-resolution masks on disk next to the latents: one safetensors entry per record,
    keyed by its content key (image + mask + bucket + crop), the latent size and the reduction
    rule; a second run (or process) reads them instead of decoding the masks again."""

    def __init__(self, folder: Path, write: bool = True):
        from lorakit.data.cache import _Store

        self.store = _Store(Path(folder), REDUCTION, "mask")
        self.write = write
        self.computed = 0

    def get(self, key: str, encoded: bytes, size: tuple[int, int]) -> torch.Tensor:
        full = f"{key}|{size[0]}x{size[1]}"
        entry = self.store.read(full)
        if entry is not None and "mask" in entry and tuple(entry["mask"].shape) == size:
            return entry["mask"]
        m = reduce_to_latent(decode_mask(encoded), size)
        self.computed += 1
        if self.write:
            self.store.write(full, {"mask": m})
        return m


def latent_masks(data, latents: list, cache_dir: Path, write: bool = True) -> list:
    """Per record: its mask at the latent's spatial size `[h, w]` (fp32 in [0, 1]), or None
    for records without a mask. `data`: a `TrainingSet`; `latents`: per record `[C, h, w]`;
    `write`: False on processes other than the main one (they only read)."""
    from lorakit.data.cache import latent_key

    cache = MaskCache(Path(cache_dir) / "latents", write)
    out: list = []
    for i, record in enumerate(data.records):
        encoded = data.masks[i]
        size = tuple(latents[i].shape[-2:])
        out.append(None if encoded is None else cache.get(latent_key(record), encoded, size))
    return out


def batch_weights(masks: list, idx: list[int], background: float, like: torch.Tensor):
    """The loss weights of the batch `idx`: `[B, h, w]` fp32 on `like`'s device, `background +
    (1 - background)·mask` (1 where a record has no mask); None when `masks` is empty (masked
    loss off). `like`: the batch latents `[B, C, h, w]`."""
    if not masks:
        return None
    size = like.shape[-2:]
    rows = [torch.ones(size) if masks[i] is None else masks[i] for i in idx]
    m = torch.stack(rows).to(like.device, torch.float32)
    return background + (1.0 - background) * m


# -- in the loss -----------------------------------------------------------------------------------

_WEIGHTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "lorakit_loss_weights", default=None
)


@contextlib.contextmanager
def loss_mask(weights: torch.Tensor | None):
    """Within the block, `flow.weighted_mse` and `ddpm.ddpm_loss` weight the per-element loss by
    `weights` `[B, h, w]` (None: unweighted, the exact unmasked computation)."""
    token = _WEIGHTS.set(weights)
    try:
        yield
    finally:
        _WEIGHTS.reset(token)


def active_weights() -> torch.Tensor | None:
    """The weights `loss_mask` set for the current loss computation, or None."""
    return _WEIGHTS.get()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted MSE `[B]` (fp32): `Σ w·(pred − target)² / Σ w` over every non-batch
    element, `weights` `[B, h, w]` broadcast over the channel (and frame) dimensions of `pred`
    `[B, C, h, w]` or `[B, C, F, h, w]`."""
    if weights.shape[0] != pred.shape[0] or tuple(weights.shape[-2:]) != tuple(pred.shape[-2:]):
        raise ValueError(
            f"loss weights {tuple(weights.shape)} do not match the prediction {tuple(pred.shape)}"
        )
    err = (pred.float() - target.float()) ** 2
    w = weights.to(err.device, torch.float32)
    w = w.view(w.shape[0], *([1] * (err.dim() - 3)), *w.shape[-2:])
    per_element = err[0].numel() // w[0].numel()  # channels (× frames) per latent cell
    num = (err * w).flatten(1).sum(1)
    den = w.flatten(1).sum(1) * per_element
    # an all-zero weight map is refused before training (`check_masks`); never divide by 0
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)
