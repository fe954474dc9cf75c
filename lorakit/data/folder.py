"""A folder of images with same-name caption files (`img.png` + `img.txt`).

Images are returned as `[3, R, R]` float tensors in [-1, 1]: EXIF orientation applied, converted
to RGB (transparency flattened onto white), short side resized to R, then cropped to a square.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lorakit.errors import LorakitError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str


def apply_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word into a caption: replace `[trigger]`/`{trigger}`, else prefix it."""
    if not trigger:
        return caption.replace("[trigger]", "").replace("{trigger}", "").strip(" ,")
    if "[trigger]" in caption or "{trigger}" in caption:
        return caption.replace("[trigger]", trigger).replace("{trigger}", trigger)
    if trigger in caption:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def scan_folder(
    folder: str | Path, caption_ext: str = ".txt", trigger: str = "", default_caption: str = ""
) -> list[Item]:
    """All images under `folder` (recursively, sorted) with their captions."""
    root = Path(folder)
    if not root.is_dir():
        raise LorakitError(
            f"Training data folder '{folder}' does not exist or is not a folder. Pass a folder of "
            "images with same-name .txt captions, e.g. samples/brand."
        )
    ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise LorakitError(
            f"No images found in '{folder}' (looked for {', '.join(sorted(IMAGE_EXTS))}, "
            "case-insensitive, in all sub-folders)."
        )
    items = []
    for img in images:
        cap_path = img.with_suffix(ext)
        caption = default_caption
        if cap_path.is_file():
            try:
                caption = cap_path.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise LorakitError(
                    f"Caption file '{cap_path}' is not UTF-8 text. Re-save it as UTF-8."
                ) from None
        items.append(Item(img, apply_trigger(" ".join(caption.split()), trigger)))
    return items


def load_image(
    path: Path, resolution: int, center_crop: bool = True, rng: random.Random | None = None
) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise LorakitError(
            f"Image '{path}' cannot be read ({e}). Remove or replace the file."
        ) from None
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
