"""Preview grids: rows = prompts, columns = seeds (× LoRA scales), labelled, written atomically.

Prompt sources (`sample.prompts`):
- a text file, one prompt per line, `#` comments, with kohya-style flags after the prompt:
  `--n` negative, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--g` FLUX
  guidance (e.g. `[trigger] style, a cup --n blurry --w 512 --h 768 --d 5 --l 6 --s 30`);
- a `.toml` file of `[[prompt]]` tables with the same fields by name (`text`, `negative`,
  `width`, `height`, `seed`, `cfg`, `steps`, `guidance`);
- a list of prompts in the config (each entry may carry the same flags).
`[trigger]` / `{trigger}` is replaced by the trigger word.

Cell rule: column j of row i uses the config seed `sample.seeds[j]`, unless the row has a `--d D`
seed, then it uses `D + j` (column 0 is exactly D, as kohya renders it; the other columns still
differ). With `sample.scales` every seed column is repeated once per scale, side by side (scale
0 = the base model). The same (prompt, seed, scale, adapter) always gives the same image: each
cell draws its starting noise from its own CPU generator seeded with the cell's seed.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import re
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lorakit.config import Config, SampleConfig
from lorakit.data.folder import apply_trigger
from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes

DEFAULT_PROMPTS = ["[trigger]"]

# Grid geometry (pixels).
LABEL_W = 220
HEAD_H = 40
CAPTION_H = 14
PAD = 4
MIN_CELL = 96


@dataclass(frozen=True)
class PromptRow:
    """One prompt with its per-line overrides (None = the config's value)."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None
    guidance: float | None = None
    """FLUX embedded guidance (`--g`); ignored by pipelines without it."""
    where: str = ""
    """`file:line` the prompt came from (for messages)."""

    def flags(self) -> str:
        """The overrides as kohya flags, for labels."""
        parts = []
        for flag, value in (
            ("w", self.width),
            ("h", self.height),
            ("d", self.seed),
            ("l", self.cfg),
            ("s", self.steps),
            ("g", self.guidance),
        ):
            if value is not None:
                parts.append(
                    f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"
                )
        if self.negative:
            parts.append(f"--n {self.negative}")
        return " ".join(parts)


# flag → (PromptRow field, type, what it needs)
FLAGS: dict[str, tuple[str, type, str]] = {
    "n": ("negative", str, "a negative prompt"),
    "w": ("width", int, "a width in pixels (a multiple of 8)"),
    "h": ("height", int, "a height in pixels (a multiple of 8)"),
    "d": ("seed", int, "a whole-number seed"),
    "l": ("cfg", float, "a CFG scale number"),
    "s": ("steps", int, "a whole number of denoising steps"),
    "g": ("guidance", float, "a FLUX guidance number"),
}
TOML_FIELDS = {"text", "prompt", "negative", "width", "height", "seed", "cfg", "steps", "guidance"}
_FLAG_HELP = "--n negative, --w width, --h height, --d seed, --l CFG, --s steps, --g FLUX guidance"


def _convert(value: object, kind: type, field_name: str, needs: str, where: str, shown: str):
    try:
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value.strip()
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)  # type: ignore[arg-type]
        else:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LorakitError(
            f"{where}: {shown} needs {needs}, got {value!r}. Fix the value (valid flags: "
            f"{_FLAG_HELP})."
        ) from None
    if field_name in ("width", "height") and (out <= 0 or out % 8):
        raise LorakitError(f"{where}: {shown} must be a positive multiple of 8, got {out}.")
    if field_name == "steps" and out <= 0:
        raise LorakitError(f"{where}: {shown} must be greater than 0, got {out}.")
    if field_name == "seed" and out < 0:
        raise LorakitError(f"{where}: {shown} must be 0 or more, got {out}.")
    return out


def parse_prompt_line(line: str, where: str) -> PromptRow:
    """`prompt text --flag value …` → PromptRow. Flags start with ` --` like kohya's."""
    parts = re.split(r"\s--(?=\S)", " " + line.strip())
    text = parts[0].strip()
    values: dict[str, object] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"([A-Za-z]+)(?:\s+(.*))?", part.strip(), flags=re.S)
        flag = m.group(1) if m else part.split()[0]
        if not m or flag not in FLAGS:
            raise LorakitError(
                f"{where}: unknown flag '--{flag}'. Valid flags are {_FLAG_HELP}; put a space "
                "before each flag and a value after it."
            )
        name, kind, needs = FLAGS[flag]
        raw = (m.group(2) or "").strip()
        if kind is not str and not raw:
            raise LorakitError(f"{where}: --{flag} needs {needs} after it.")
        values[name] = _convert(raw, kind, name, needs, where, f"--{flag}")
    if not text:
        raise LorakitError(f"{where}: the line has flags but no prompt text before them.")
    return PromptRow(text=text, where=where, **values)  # type: ignore[arg-type]


def _rows_from_toml(path: Path) -> list[PromptRow]:
    from lorakit.config import read_toml

    data = read_toml(path, "Prompt file")
    entries = data.get("prompt")
    extra = sorted(set(data) - {"prompt"})
    if not isinstance(entries, list) or extra:
        raise LorakitError(
            f"Prompt file '{path}' must hold only [[prompt]] tables (fields: "
            f"{', '.join(sorted(TOML_FIELDS - {'prompt'}))})"
            + (f"; found {', '.join(extra)}" if extra else "")
            + "."
        )
    rows = []
    for i, entry in enumerate(entries, 1):
        where = f"Prompt file '{path}', prompt #{i}"
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict):
            raise LorakitError(f"{where}: must be a table with a `text` field.")
        unknown = sorted(set(entry) - TOML_FIELDS)
        if unknown:
            raise LorakitError(
                f"{where}: unknown field '{unknown[0]}'. Valid fields: "
                f"{', '.join(sorted(TOML_FIELDS - {'prompt'}))}."
            )
        text = entry.get("text", entry.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise LorakitError(f"{where}: needs a non-empty `text` field.")
        values: dict[str, object] = {}
        by_name = {name: (kind, needs) for name, kind, needs in FLAGS.values()}
        for key, value in entry.items():
            if key in ("text", "prompt"):
                continue
            kind, needs = by_name[key]
            values[key] = _convert(value, kind, key, needs, where, f"`{key}`")
        rows.append(PromptRow(text=text.strip(), where=where, **values))  # type: ignore[arg-type]
    return rows


def read_prompt_rows(source: str | list[str], trigger: str) -> list[PromptRow]:
    """Prompts with their overrides from a text/TOML file or a list, trigger applied."""
    if isinstance(source, str) and source:
        path = Path(source)
        if not path.is_file():
            raise LorakitError(
                f"Prompt file '{source}' (sample.prompts) does not exist. Give a text file "
                "with one prompt per line, a .toml file of [[prompt]] tables, or a list of "
                "prompts in the config."
            )
        if path.suffix.lower() == ".toml":
            rows = _rows_from_toml(path)
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise LorakitError(f"Prompt file '{path}' is not UTF-8 text.") from None
            rows = [
                parse_prompt_line(ln, f"Prompt file '{path}', line {no}")
                for no, ln in enumerate(lines, 1)
                if ln.strip() and not ln.lstrip().startswith("#")
            ]
    else:
        lines = (source or DEFAULT_PROMPTS) if isinstance(source, list) else DEFAULT_PROMPTS
        rows = [
            parse_prompt_line(ln, f"sample.prompts entry {no}")
            for no, ln in enumerate(lines, 1)
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    if not rows:
        raise LorakitError(f"No prompts in sample.prompts ({source!r}); add at least one line.")
    return [replace(r, text=_trigger(r.text, trigger)) for r in rows]


def _trigger(text: str, trigger: str) -> str:
    return apply_trigger(text, trigger) if "[trigger]" in text or "{trigger}" in text else text


def read_prompts(source: str | list[str], trigger: str) -> list[str]:
    """Prompt texts (flags parsed off) from a list or a file, with the trigger applied."""
    return [r.text for r in read_prompt_rows(source, trigger)]


# ---------------------------------------------------------------------------------------------
# grid specification


@dataclass(frozen=True)
class Cell:
    """One image of the grid: row `row`, column `col`, rendered with `seed` at LoRA `scale`."""

    row: int
    col: int
    seed: int
    scale: float | None
    """None = the adapter as it is (no sweep)."""
    image: Image.Image | None = None


@dataclass(frozen=True)
class GridSpec:
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    negative: str
    width: int
    height: int
    rows: tuple[PromptRow, ...] = ()
    """Per-prompt overrides; empty = plain `prompts`."""
    scales: tuple[float, ...] = ()
    """LoRA-scale sweep; empty = one column per seed with the adapter as it is."""
    scheduler: str = "default"
    text_length: int = 0
    """Tokens the long text encoder encodes each prompt to (the pipeline's
    `max_sequence_length`): the run's `RunSpec.text_length`, so a preview conditions the
    denoiser as training did (FLUX attends to T5's padding: 256 and 512 tokens give different
    images). 0: the pipeline's default; ignored by pipelines without the argument."""

    def prompt_rows(self) -> tuple[PromptRow, ...]:
        return self.rows or tuple(PromptRow(p) for p in self.prompts)

    def columns(self) -> list[tuple[int, float | None]]:
        """(seed index, scale) per column: each seed, repeated once per scale."""
        scales: list[float | None] = list(self.scales) or [None]
        return [(j, s) for j in range(len(self.seeds)) for s in scales]

    def cell_seed(self, row: PromptRow, seed_index: int) -> int:
        if row.seed is not None:
            return row.seed + seed_index
        return self.seeds[seed_index]

    def cells(self) -> list[Cell]:
        return [
            Cell(i, c, self.cell_seed(row, j), scale)
            for i, row in enumerate(self.prompt_rows())
            for c, (j, scale) in enumerate(self.columns())
        ]

    def cell_size(self) -> tuple[int, int]:
        rows = self.prompt_rows()
        w = max(r.width or self.width for r in rows)
        h = max(r.height or self.height for r in rows)
        return max(w, MIN_CELL), max(h, MIN_CELL)


def grid_spec(cfg: SampleConfig, trigger: str, resolution: int, text_length: int = 0) -> GridSpec:
    rows = read_prompt_rows(cfg.prompts, trigger)
    return GridSpec(
        prompts=[r.text for r in rows],
        seeds=list(cfg.seeds),
        steps=cfg.steps,
        guidance=cfg.guidance,
        negative=cfg.negative,
        width=cfg.width or resolution,
        height=cfg.height or resolution,
        rows=tuple(rows),
        scales=tuple(getattr(cfg, "scales", ()) or ()),
        scheduler=cfg.scheduler,
        text_length=text_length,
    )


def sample_due(cfg: SampleConfig, step: int, last_time: float, now: float | None = None) -> bool:
    """Whether a preview grid is due after `step`: every `sample.every` steps, or once
    `sample.every_minutes` passed since `last_time` (a `time.monotonic()` value)."""
    if cfg.every and step % cfg.every == 0:
        return True
    minutes = getattr(cfg, "every_minutes", 0.0)
    now = time.monotonic() if now is None else now
    return bool(minutes) and now - last_time >= minutes * 60


# ---------------------------------------------------------------------------------------------
# LoRA scale without re-injection


def _lora_layers(modules: Iterable[torch.nn.Module]):
    from peft.tuners.lora import LoraLayer

    for top in modules:
        for m in top.modules():
            if isinstance(m, LoraLayer):
                yield m


@contextlib.contextmanager
def lora_scale(modules: Iterable[torch.nn.Module], scale: float) -> Iterator[int]:
    """Multiply every injected LoRA's `scaling` by `scale` inside the block; yields the number
    of LoRA layers found. The exact previous values are put back afterwards (also on error), so
    weights and outputs after a sweep are bit-identical to before."""
    layers = list(_lora_layers(modules))
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    try:
        for layer, scaling in saved:
            for name, value in scaling.items():
                layer.scaling[name] = value * scale
        yield len(layers)
    finally:
        for layer, scaling in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)


def _pipe_modules(pipe) -> list[torch.nn.Module]:
    comps = getattr(pipe, "components", {}) or {}
    return [m for m in comps.values() if isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; each submodule's flag restored afterwards."""
    flags = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for top in modules:
            top.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def pipeline_kwargs(pipe, spec: GridSpec, row: PromptRow) -> dict:
    """Call arguments for one prompt row. Pipelines with `true_cfg_scale` (FLUX) take `--g`
    (default 3.5) as `guidance_scale` and `--l` as `true_cfg_scale` (default 1 = off); the
    others take `--l` (default sample.guidance) as `guidance_scale`."""
    params = inspect.signature(pipe.__call__).parameters
    negative = row.negative if row.negative is not None else spec.negative
    kwargs = {
        "prompt": row.text,
        "negative_prompt": negative or None,
        "num_inference_steps": row.steps or spec.steps,
        "width": row.width or spec.width,
        "height": row.height or spec.height,
    }
    if "true_cfg_scale" in params:
        kwargs["guidance_scale"] = row.guidance if row.guidance is not None else 3.5
        kwargs["true_cfg_scale"] = row.cfg if row.cfg is not None else 1.0
    else:
        kwargs["guidance_scale"] = row.cfg if row.cfg is not None else spec.guidance
    if spec.text_length:
        kwargs["max_sequence_length"] = spec.text_length
    return {k: v for k, v in kwargs.items() if k in params}


# pipeline class → what its `encode_prompt` returns, named as its `__call__` arguments (None:
# not passed; FLUX's text ids are rebuilt by every call). Looked up along the class's MRO.
EMBED_OUTPUTS: dict[str, tuple[str | None, ...]] = {
    "StableDiffusionPipeline": ("prompt_embeds", "negative_prompt_embeds"),
    "StableDiffusionXLPipeline": (
        "prompt_embeds", "negative_prompt_embeds",
        "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
    ),
    "StableDiffusion3Pipeline": (
        "prompt_embeds", "negative_prompt_embeds",
        "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
    ),
    "FluxPipeline": ("prompt_embeds", "pooled_prompt_embeds", None),
    # Qwen-Image pads a batch's captions with a mask, which `__call__` takes beside the embeds
    "QwenImagePipeline": ("prompt_embeds", "prompt_embeds_mask"),
    "Flux2KleinPipeline": ("prompt_embeds", None),  # (text ids: rebuilt by `__call__`)
    # Z-Image: a list with one [L_i, D] tensor per prompt (its L_i unmasked caption tokens)
    "ZImagePipeline": ("prompt_embeds", "negative_prompt_embeds"),
}  # fmt: skip

RowEmbeds = dict[str, "torch.Tensor | list[torch.Tensor]"]
"""`__call__` keyword → tensor (batch 1) for one prompt row: `prompt_embeds` [1, L, D], its
`negative_prompt_embeds` when the row's call would use a negative, and the pooled [1, P] ones for
SDXL / SD3 / FLUX; Z-Image's are one-element lists of [L, D] tensors, as its `encode_prompt`
returns them."""


def _to(value, device):
    """A tensor, or a list of tensors (Z-Image's per-prompt embeddings), on `device`."""
    if isinstance(value, list):
        return [v.detach().to(device) for v in value]
    return value.detach().to(device)


def _runs_cfg(pipe, guidance_scale: float) -> bool:
    """Whether a call with this `guidance_scale` runs classifier-free guidance, by the
    pipeline's own `do_classifier_free_guidance` rule (SD: > 1 without a guidance embedding;
    FLUX.2 klein: > 1 unless distilled; Z-Image: > 0); > 1 for a pipeline without one."""
    rule = getattr(type(pipe), "do_classifier_free_guidance", None)
    if not isinstance(rule, property):
        return guidance_scale > 1
    missing = object()
    saved = getattr(pipe, "_guidance_scale", missing)
    pipe._guidance_scale = guidance_scale
    try:
        return bool(rule.fget(pipe))
    finally:
        if saved is missing:
            del pipe._guidance_scale
        else:
            pipe._guidance_scale = saved


def pre_encodes(family) -> bool:
    """Whether the family's pipeline (`pipeline_class_names[0]`) takes pre-encoded prompts
    (`encode_prompt_rows`), so preview grids need no text encoder on the device."""
    return family.pipeline_class_names[0] in EMBED_OUTPUTS


def _embed_outputs(pipe) -> tuple[str | None, ...] | None:
    for cls in type(pipe).__mro__:
        if cls.__name__ in EMBED_OUTPUTS:
            return EMBED_OUTPUTS[cls.__name__]
    return None


@torch.no_grad()
def encode_prompt_rows(pipe, spec: GridSpec) -> list[RowEmbeds] | None:
    """Embeddings of every prompt row of `spec` (prompt + negative), computed once by the
    pipeline's own `encode_prompt` with the arguments its `__call__` would pass for that row
    (`pipeline_kwargs`: batch 1, no clip skip, no LoRA scale, `max_sequence_length` =
    `spec.text_length` or the call's default), so `render_cells(pipe, spec, embeds)` gives the
    images the prompt strings give, without running — or holding on the device — any text
    encoder. CFG pipelines (SD1.5 / SDXL / SD3 / Z-Image) get the negative's embeddings when
    the call runs CFG by the pipeline's own rule (`_runs_cfg`; the pipeline's empty-prompt /
    zero rule when there is no negative); FLUX only when true CFG is on (`--l` > 1 and a
    negative). Tensors are kept on the CPU, in the text encoders' output dtype.
    The text encoders must be able to run here, and must not change afterwards (text-encoder
    LoRA training: render from strings instead). None for a pipeline not in `EMBED_OUTPUTS`."""
    names = _embed_outputs(pipe)
    if names is None:
        return None
    enc = inspect.signature(pipe.encode_prompt).parameters
    call = inspect.signature(pipe.__call__).parameters
    device = pipe._execution_device

    def encode(prompt: str, negative: str | None, cfg: bool, prefix: str = "") -> RowEmbeds:
        kw: dict = {"prompt": prompt, "device": device, "num_images_per_prompt": 1}
        kw.update({k: None for k in ("prompt_2", "prompt_3") if k in enc})
        if "do_classifier_free_guidance" in enc:
            kw.update(do_classifier_free_guidance=cfg, negative_prompt=negative)
        if "max_sequence_length" in enc and "max_sequence_length" in call:
            kw["max_sequence_length"] = spec.text_length or call["max_sequence_length"].default
        outputs = pipe.encode_prompt(**{k: v for k, v in kw.items() if k in enc})
        return {
            prefix + name: _to(value, "cpu")
            for name, value in zip(names, outputs, strict=True)
            # (None, or Z-Image's empty list: no negative without CFG)
            if name is not None and value is not None and len(value)
        }

    rows = []
    for row in spec.prompt_rows():
        kwargs = pipeline_kwargs(pipe, spec, row)
        negative = kwargs.get("negative_prompt")
        scale = kwargs.get("guidance_scale", 1.0)
        if "do_classifier_free_guidance" in enc:
            rows.append(encode(row.text, negative, _runs_cfg(pipe, scale)))
            continue
        embeds = encode(row.text, None, False)
        if negative is not None and kwargs.get("true_cfg_scale", 1.0) > 1:
            embeds.update(encode(negative, None, False, prefix="negative_"))
        elif (
            "negative_prompt" not in call
            and "negative_prompt_embeds" in call
            and _runs_cfg(pipe, scale)
        ):
            # a pipeline whose CFG negative is always the empty prompt (FLUX.2 klein base;
            # its distilled models run no CFG): encoded when the call would run CFG
            embeds.update(encode("", None, False, prefix="negative_"))
        rows.append(embeds)
    return rows


@torch.no_grad()
def render_cells(pipe, spec: GridSpec, embeds: list[RowEmbeds] | None = None) -> list[Cell]:
    """Render every cell in eval mode without grad; returns the cells with their images.
    Training mode flags and LoRA scales are restored afterwards and memory released.
    `embeds` (from `encode_prompt_rows`, one per prompt row): the pipeline gets these instead of
    the prompt strings and never calls its text encoders, which may then stay off the device."""
    modules = _pipe_modules(pipe)
    if spec.scales and not any(True for _ in _lora_layers(modules)):
        raise LorakitError(
            "sample.scales asks for a LoRA-scale sweep but the model carries no adapter."
        )
    rows = spec.prompt_rows()
    if embeds is not None:
        if len(embeds) != len(rows):
            raise ValueError(f"{len(embeds)} prompt embeddings for {len(rows)} prompt rows")
        # FLUX / SD3 use given embeddings where they are: bring them to the denoiser's device.
        device = pipe._execution_device
        embeds = [{k: _to(v, device) for k, v in e.items()} for e in embeds]
    out: list[Cell] = []
    try:
        with _eval_mode(modules):
            for cell in spec.cells():
                kwargs = pipeline_kwargs(pipe, spec, rows[cell.row])
                if embeds is not None:
                    kwargs.pop("prompt")
                    kwargs.pop("negative_prompt", None)
                    kwargs.update(embeds[cell.row])
                gen = torch.Generator("cpu").manual_seed(cell.seed)
                scaled = (
                    lora_scale(modules, cell.scale)
                    if cell.scale is not None
                    else contextlib.nullcontext()
                )
                with scaled:
                    image = pipe(**kwargs, generator=gen).images[0]
                out.append(replace(cell, image=image))
    finally:
        if torch.cuda.is_available():  # give the pipeline's transient blocks back to training
            gc.collect()  # (~0.3 s in a large process: only where empty_cache needs it)
            torch.cuda.empty_cache()
    return out


def render_images(pipe, spec: GridSpec) -> list[list[Image.Image]]:
    """Images by row and column (see `GridSpec.columns`)."""
    cells = render_cells(pipe, spec)
    ncols = len(spec.columns())
    return [
        [c.image for c in cells[i * ncols : (i + 1) * ncols]]  # type: ignore[misc]
        for i in range(len(spec.prompt_rows()))
    ]


# ---------------------------------------------------------------------------------------------
# composition


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    cell_w: int
    cell_h: int
    boxes: dict[tuple[int, int], tuple[int, int]]
    """(row, col) → top-left corner of the cell's image."""


def grid_layout(spec: GridSpec) -> Layout:
    """Title row and column headers on top, prompt labels on the left, and a caption strip
    (seed · scale) under every cell."""
    cell_w, cell_h = spec.cell_size()
    ncols, nrows = len(spec.columns()), len(spec.prompt_rows())
    boxes = {
        (i, c): (LABEL_W + c * (cell_w + PAD) + PAD, HEAD_H + i * (cell_h + CAPTION_H + PAD))
        for i in range(nrows)
        for c in range(ncols)
    }
    width = LABEL_W + ncols * (cell_w + PAD) + PAD
    height = HEAD_H + nrows * (cell_h + CAPTION_H + PAD) + PAD
    return Layout(width, height, cell_w, cell_h, boxes)


def _scale_label(scale: float | None) -> str:
    if scale is None:
        return ""
    return " · base" if scale == 0 else f" · lora {scale:g}"


def compose_cells(cells: list[Cell], spec: GridSpec, title: str) -> Image.Image:
    font = ImageFont.load_default()
    layout = grid_layout(spec)
    grid = Image.new("RGB", (layout.width, layout.height), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    draw.text((PAD, 4), title, fill=(20, 20, 20), font=font)
    for c, (j, scale) in enumerate(spec.columns()):
        x, _ = layout.boxes[(0, c)]
        draw.text(
            (x, 22), f"seed {spec.seeds[j]}{_scale_label(scale)}", fill=(60, 60, 60), font=font
        )
    rows = spec.prompt_rows()
    for i, row in enumerate(rows):
        _, y = layout.boxes[(i, 0)]
        lines = textwrap.wrap(row.text, 34) or [""]
        if row.flags():
            lines += textwrap.wrap(row.flags(), 34)
        lines = lines[: max(1, layout.cell_h // 12)]
        draw.multiline_text((PAD, y + 2), "\n".join(lines), fill=(20, 20, 20), font=font)
    for cell in cells:
        x, y = layout.boxes[(cell.row, cell.col)]
        img = cell.image
        assert img is not None
        if img.size != (layout.cell_w, layout.cell_h):
            img = ImageOps.contain(img, (layout.cell_w, layout.cell_h), Image.Resampling.NEAREST)
        grid.paste(img, (x, y))
        draw.text(
            (x, y + layout.cell_h + 1),
            f"seed {cell.seed}{_scale_label(cell.scale)}",
            fill=(90, 90, 90),
            font=font,
        )
    return grid


def compose_grid(rows: list[list[Image.Image]], spec: GridSpec, title: str) -> Image.Image:
    """Lay out images given by row and column (see `GridSpec.columns`)."""
    flat = [c for c in spec.cells()]
    ncols = len(spec.columns())
    cells = [replace(c, image=rows[c.row][c.col]) for c in flat]
    assert all(len(r) == ncols for r in rows)
    return compose_cells(cells, spec, title)


def save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class GridResult:
    path: Path
    cells: list[Cell]
    individual: list[Path] = field(default_factory=list)

    def images(self, scale: float | None = 1.0) -> list[Image.Image]:
        """The cell images at `scale` (cells without a sweep count as scale 1)."""
        return [c.image for c in self.cells if (c.scale if c.scale is not None else 1.0) == scale]  # type: ignore[misc]


def render_grid_result(
    pipe,
    spec: GridSpec,
    title: str,
    path: Path,
    individual_dir: Path | None = None,
    embeds: list[RowEmbeds] | None = None,
) -> GridResult:
    """Render, write the grid PNG (and each cell under `individual_dir` if given); `embeds` as
    in `render_cells`."""
    cells = render_cells(pipe, spec, embeds)
    save_png(compose_cells(cells, spec, title), path)
    written = []
    if individual_dir is not None:
        for cell in cells:
            scale = "" if cell.scale is None else f"_scale{cell.scale:g}"
            name = f"r{cell.row:02d}_c{cell.col:02d}_seed{cell.seed}{scale}.png"
            written.append(save_png(cell.image, individual_dir / name))  # type: ignore[arg-type]
    return GridResult(Path(path), cells, written)


def render_grid(
    pipe, spec: GridSpec, title: str, path: Path, individual_dir: Path | None = None
) -> Path:
    return render_grid_result(pipe, spec, title, path, individual_dir).path


def side_by_side(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Grids next to each other, each under its own label (one per checkpoint)."""
    font = ImageFont.load_default()
    head = 18
    width = sum(im.width for _, im in panels) + PAD * (len(panels) + 1)
    height = max(im.height for _, im in panels) + head + PAD
    out = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(out)
    x = PAD
    for label, im in panels:
        draw.text((x, 3), label, fill=(10, 10, 10), font=font)
        out.paste(im, (x, head))
        x += im.width + PAD
    return out


# ---------------------------------------------------------------------------------------------
# sampling saved adapters


def run_adapters(run_dir: Path, name: str, formats: list[str]) -> list[tuple[str, Path]]:
    """(label, adapter file) for every complete checkpoint of a run, by step, then the final."""
    from lorakit.export import find_adapter

    def first_file(folder: Path) -> Path | None:
        return find_adapter(folder, name, formats)

    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        steps = sorted(
            (int(m.group(1)), d)
            for d in ckpts.iterdir()
            if d.is_dir() and (m := re.fullmatch(r"step-(\d+)", d.name))
        )
        for step, folder in steps:
            f = first_file(folder)
            if f is not None:
                found.append((f"step {step}", f))
    final = first_file(run_dir)
    if final is not None:
        found.append(("final", final))
    return found


def _swap_weights(family, comps, adapter) -> bool:
    """Copy an adapter's weights into the LoRA already injected by `apply_adapter` when it has
    the same modules, ranks and alphas (checkpoints of one run); False when it does not fit."""
    from lorakit.lora import ADAPTER_NAME, canonical_name, lora_layers

    targets = {t.component: t for t in family.targets}
    plan = []
    seen = set()
    for component in adapter.components():
        module = getattr(comps, component, None)
        if module is None:
            return False
        for runtime, layer in lora_layers(module):
            key = (component, canonical_name(targets[component], runtime))
            w = adapter.modules.get(key)
            # absent, or DoRA / LoHa / LoKr on either side: re-apply instead
            if getattr(w, "magnitude", True) is not None or not hasattr(layer, "lora_A"):
                return False
            if layer.use_dora.get(ADAPTER_NAME):
                return False
            if layer.r[ADAPTER_NAME] != w.rank:
                return False
            if float(layer.lora_alpha[ADAPTER_NAME]) != w.alpha:
                return False
            plan.append((layer, w))
            seen.add(key)
    if seen != set(adapter.modules):
        return False
    with torch.no_grad():
        for layer, w in plan:
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            a.copy_(w.down.reshape(a.shape))
            b.copy_(w.up.reshape(b.shape))
    return True


def sample_adapter(
    adapter_path: Path,
    *,
    base: str | None = None,
    prompts: str | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    scale: float = 1.0,
    scales: list[float] | None = None,
    trigger: str | None = None,
    resolution: int | None = None,
    out_path: Path | None = None,
    allow_pickle: bool = False,
    mix: list[tuple[Path, float]] | None = None,
) -> Path:
    """Render a grid from a saved adapter on its base model; for a run folder, one grid per
    saved checkpoint (and the final adapter), side by side in one PNG. `allow_pickle`: the
    user's consent (`--allow-pickle`) to read a pickled adapter or base model. `mix`: (file,
    weight) of several adapters of one family instead of `adapter_path`, applied together as
    `Σ wᵢ·ΔWᵢ` (`lorakit.mix.combine`, exact) in one grid titled with the files and weights.

    Defaults come from the run's `config.toml` when given a run folder, else from the adapter's
    metadata (`lorakit.base_model`, `modelspec.trigger_phrase`, `modelspec.resolution`).
    `scales` adds a LoRA-scale sweep (0 = base model); `scale` alone sets one strength.
    """
    from lorakit import config as cfg
    from lorakit.export import read_adapter
    from lorakit.lora import apply_adapter
    from lorakit.models import load_model

    run_cfg = None
    if mix:
        from lorakit.mix import combine, mix_label, read_sources

        sources = read_sources(mix, "--adapter", allow_pickle)
        first = sources[0].path
        files = [(mix_label(sources), first)]
        default_out = first.with_name("+".join(s.path.stem for s in sources) + ".png")
    elif adapter_path.is_dir():
        toml = adapter_path / "config.toml"
        if not toml.is_file():
            raise LorakitError(
                f"'{adapter_path}' is a folder without config.toml: not a lorakit run."
            )
        run_cfg = cfg.build(cfg.check_layer(cfg.read_toml(toml, "Run config"), str(toml)))
        files = run_adapters(adapter_path, run_cfg.export.name, list(run_cfg.export.formats))
        if not files:
            raise LorakitError(f"Run folder '{adapter_path}' has no saved adapter yet.")
        default_out = adapter_path / "samples" / "sample.png"
    else:
        files = [(adapter_path.name, adapter_path)]
        default_out = adapter_path.with_suffix(".png")
    if mix:
        adapters = [(files[0][0], first, combine(sources), "mix")]
    else:
        adapters = [(label, f, *read_adapter(f, allow_pickle=allow_pickle)) for label, f in files]
    meta = adapters[-1][2].metadata
    model_cfg = run_cfg.model if run_cfg else cfg.ModelConfig()
    model_cfg.name = base or model_cfg.name or meta.get("lorakit.base_model", "")
    model_cfg.allow_pickle = model_cfg.allow_pickle or allow_pickle
    if not model_cfg.name:
        raise LorakitError(
            f"'{files[-1][1]}' does not record its base model; pass --base (e.g. --base tiny:sd15)."
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
    if scales is not None:
        sample_cfg.scales = list(scales)
    elif scale != 1.0:
        sample_cfg.scales = [scale]
    if trigger is None:
        trigger = run_cfg.data.trigger if run_cfg else meta.get("modelspec.trigger_phrase", "")
    if run_cfg:  # the run's own decisions, as it trained
        from lorakit.models import resolve_family
        from lorakit.spec import build_spec

        run_spec = build_spec(run_cfg, resolve_family(model_cfg)[0])
        resolution = run_spec.resolution if resolution is None else resolution
        text_length = run_spec.text_length
    else:  # what the adapter records (text length 0: the pipeline's default)
        if resolution is None:
            resolution = int(meta.get("modelspec.resolution", "512x512").split("x")[0])
        text_length = int(meta.get("lorakit.text_length", "0") or 0)
    spec = grid_spec(sample_cfg, trigger, resolution, text_length)

    family = comps = None
    panels = []
    for label, f, adapter, _fmt in adapters:
        if family is None or not _swap_weights(family, comps, adapter):
            family, comps = load_model(model_cfg)
            if family.name != adapter.family:
                raise LorakitError(
                    f"The adapter '{f}' is for {adapter.family} but the base model "
                    f"'{model_cfg.name}' is {family.name}."
                )
            apply_adapter(family, comps, adapter, scale=1.0)
        pipe = family.pipeline(comps, sample_cfg.scheduler)
        what = f"mix of {len(mix)} adapters" if mix else f"{f.name} - {label}"
        title = f"{what} - {model_cfg.name}"
        cells = render_cells(pipe, spec)
        panels.append((label, compose_cells(cells, spec, title)))
    image = panels[0][1] if len(panels) == 1 else side_by_side(panels)
    if mix:
        from lorakit.mix import captioned

        image = captioned(image, sources)
    return save_png(image, out_path or default_out)


def render_preview(family, comps, trainable: list, accelerator, spec, c: Config, step: int,
            path: Path | None, keep_on_device: bool, embeds: list | None = None):  # fmt: skip
    """Render a grid with the current adapter: trained modules in eval mode, no grad; frozen
    modules brought to the device for it and moved off again unless training needs them: only
    the VAE when `embeds` (the prompt rows pre-encoded by `encode_prompt_rows`) are given, else
    the text encoders too. `path` None: only run the denoiser (an FSDP rank other than 0), write
    nothing, return None."""
    frozen = family.frozen_modules(comps)
    if embeds is not None:
        frozen = {"vae": frozen["vae"]}  # the text encoders stay where they are (off the device)
    device = accelerator.device
    for module in frozen.values():
        module.to(device)
    for module in trainable:
        module.eval()
    try:
        pipe = family.pipeline(comps, c.sample.scheduler)
        title = f"{c.export.name} - step {step} - {c.model.name}"
        if path is None:
            render_cells(pipe, spec, embeds)
            return None
        individual = path.with_suffix("") if c.sample.save_individual else None
        return render_grid_result(pipe, spec, title, path, individual, embeds)
    finally:
        for module in trainable:
            module.train()
        if device.type != "cpu" and not keep_on_device:
            for module in frozen.values():
                module.to("cpu")
            torch.cuda.empty_cache()


def preview(family, comps, trainable: list, accelerator, spec, c: Config, step: int,
            path: Path | None, keep_on_device: bool, embeds: list | None = None):  # fmt: skip
    """`render_preview` inside a forked RNG (a preview never perturbs the training RNG)."""
    device = accelerator.device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return render_preview(
            family, comps, trainable, accelerator, spec, c, step, path, keep_on_device, embeds
        )
