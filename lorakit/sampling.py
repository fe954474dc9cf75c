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
    return [
        apply_trigger(p, trigger) if "trigger]" in p or "{trigger}" in p else p for p in prompts
    ]


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
        draw.text(
            (label_w + j * (cell_w + pad) + pad, 22), f"seed {seed}", fill=(60, 60, 60), font=font
        )
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


def sample_adapter(
    adapter_path: Path,
    *,
    base: str | None = None,
    prompts: str | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    scale: float = 1.0,
    trigger: str | None = None,
    resolution: int | None = None,
    out_path: Path | None = None,
) -> Path:
    """Render a grid from a saved adapter (file or run folder) on its base model.

    Defaults come from the run's `config.toml` when given a run folder, else from the adapter's
    metadata (`lorakit.base_model`, `modelspec.trigger_phrase`, `modelspec.resolution`).
    """
    from lorakit import config as cfg
    from lorakit.export import EXPORTERS, read_adapter
    from lorakit.lora import apply_adapter
    from lorakit.models import load_model

    run_cfg = None
    if adapter_path.is_dir():
        toml = adapter_path / "config.toml"
        if not toml.is_file():
            raise LorakitError(
                f"'{adapter_path}' is a folder without config.toml: not a lorakit run."
            )
        run_cfg = cfg.build(cfg.check_layer(cfg.read_toml(toml, "Run config"), str(toml)))
        candidates = [
            EXPORTERS[f].default_path(adapter_path, run_cfg.export.name)
            for f in run_cfg.export.formats
        ]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise LorakitError(f"Run folder '{adapter_path}' has no finished adapter yet.")
        adapter_file = found[0]
        default_out = adapter_path / "samples" / "sample.png"
    else:
        adapter_file = adapter_path
        default_out = adapter_path.with_suffix(".png")
    adapter, _ = read_adapter(adapter_file)
    meta = adapter.metadata
    model_cfg = run_cfg.model if run_cfg else cfg.ModelConfig()
    model_cfg.name = base or model_cfg.name or meta.get("lorakit.base_model", "")
    if not model_cfg.name:
        raise LorakitError(
            f"'{adapter_file}' does not record its base model; pass --base (e.g. --base tiny:sd15)."
        )
    sample_cfg = run_cfg.sample if run_cfg else cfg.SampleConfig()
    if prompts is not None:
        sample_cfg.prompts = prompts
    if seeds:
        sample_cfg.seeds = seeds
    if steps is not None:
        sample_cfg.steps = steps
    if guidance is not None:
        sample_cfg.guidance = guidance
    if trigger is None:
        trigger = run_cfg.data.trigger if run_cfg else meta.get("modelspec.trigger_phrase", "")
    if resolution is None:
        if run_cfg:
            resolution = run_cfg.data.resolution
        else:
            resolution = int(meta.get("modelspec.resolution", "512x512").split("x")[0])
    family, comps = load_model(model_cfg)
    if family.name != adapter.family:
        raise LorakitError(
            f"The adapter is for {adapter.family} but the base model '{model_cfg.name}' is "
            f"{family.name}."
        )
    apply_adapter(family, comps, adapter, scale=scale)
    spec = grid_spec(sample_cfg, trigger, resolution)
    title = f"{adapter_file.name} - scale {scale:g} - {model_cfg.name}"
    return render_grid(
        family.pipeline(comps, sample_cfg.scheduler), spec, title, out_path or default_out
    )
