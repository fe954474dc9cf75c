"""Preview grids: rows = prompts, columns = seeds, labelled, written atomically as PNG.

The same (prompt, seed, adapter) always gives the same image: each cell draws its starting noise
from its own CPU generator seeded with the column's seed.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from lorakit.config import SampleConfig
from lorakit.data.folder import apply_trigger
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes

DEFAULT_PROMPTS = ["[trigger]"]


@dataclass(frozen=True)
class GridSpec:
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    negative: str
    width: int
    height: int


def read_prompts(source: str | list[str], trigger: str) -> list[str]:
    """Prompts from a list or a file (one per line, `#` comments), with the trigger applied."""
    if isinstance(source, str):
        if not source:
            lines = DEFAULT_PROMPTS
        else:
            path = Path(source)
            if not path.is_file():
                raise LorakitError(
                    f"Prompt file '{source}' (sample.prompts) does not exist. Give a text file "
                    "with one prompt per line, or a list of prompts in the config."
                )
            lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = source or DEFAULT_PROMPTS
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise LorakitError(f"No prompts in sample.prompts ({source!r}); add at least one line.")
    return [apply_trigger(p, trigger) if "trigger]" in p or "{trigger}" in p else p for p in prompts]


def grid_spec(cfg: SampleConfig, trigger: str, resolution: int) -> GridSpec:
    return GridSpec(
        prompts=read_prompts(cfg.prompts, trigger),
        seeds=list(cfg.seeds),
        steps=cfg.steps,
        guidance=cfg.guidance,
        negative=cfg.negative,
        width=cfg.width or resolution,
        height=cfg.height or resolution,
    )


@torch.no_grad()
def render_images(pipe, spec: GridSpec) -> list[list[Image.Image]]:
    rows = []
    for prompt in spec.prompts:
        row = []
        for seed in spec.seeds:
            gen = torch.Generator("cpu").manual_seed(seed)
            out = pipe(
                prompt,
                negative_prompt=spec.negative or None,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                width=spec.width,
                height=spec.height,
                generator=gen,
            )
            row.append(out.images[0])
        rows.append(row)
    return rows


def compose_grid(rows: list[list[Image.Image]], spec: GridSpec, title: str) -> Image.Image:
    """Lay images out with a title, seed labels on top and prompt labels on the left."""
    font = ImageFont.load_default()
    cell_w = max(spec.width, 96)
    cell_h = max(spec.height, 96)
    label_w, head_h, pad = 220, 40, 4
    width = label_w + len(spec.seeds) * (cell_w + pad) + pad
    height = head_h + len(rows) * (cell_h + pad) + pad
    grid = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 4), title, fill=(20, 20, 20), font=font)
    for j, seed in enumerate(spec.seeds):
        draw.text((label_w + j * (cell_w + pad) + pad, 22), f"seed {seed}", fill=(60, 60, 60), font=font)
    for i, (prompt, row) in enumerate(zip(spec.prompts, rows, strict=True)):
        y = head_h + i * (cell_h + pad)
        wrapped = textwrap.wrap(prompt, 34)[: max(1, cell_h // 12)]
        draw.multiline_text((pad, y + 2), "\n".join(wrapped), fill=(20, 20, 20), font=font)
        for j, img in enumerate(row):
            if img.size != (cell_w, cell_h):
                img = img.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(img, (label_w + j * (cell_w + pad) + pad, y))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def render_grid(pipe, spec: GridSpec, title: str, path: Path) -> Path:
    return save_png(compose_grid(render_images(pipe, spec), spec, title), path)
