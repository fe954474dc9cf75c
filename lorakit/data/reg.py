"""DreamBooth prior preservation: class images (`data.reg_folder`) trained beside the instance
images, and `lorakit class-images`, which renders them with the base model.

    loss = instance loss + λ · class loss      λ = train.prior_weight; each loss the mean over
                                               its own batch (DreamBooth; diffusers'
                                               train_dreambooth_lora.py; kohya's
                                               prior_loss_weight)

Pairing. Every micro-batch of B instance images (`order.BatchOrder`) is followed by a class
batch of B class images (`ClassOrder`). diffusers concatenates the two into one batch of 2B;
lorakit runs the class batch as a second forward and backward in the same micro-batch
(`train._prior`). The gradient is the same (no denoiser op mixes the samples of a batch), and:
- the class batch may sit in another aspect-ratio bucket than the instance batch (a
  concatenation needs one shape: square class images rendered by `lorakit class-images` would
  never pair with portrait product shots);
- one graph is alive at a time, so the activation peak is that of a batch of B, not 2B (the
  planner counts two passes and both batches' tensors, `lorakit plan`).
Alternating instance and class batches was not chosen: each optimizer step would then see only
one of the two terms, and Adam normalises every step's update, so λ would no longer set the
balance between them.

Order. The class batches of class-epoch e are `epoch_batches(records, B·W, seed, e, reg=True)`
(each of one bucket, shuffled with a random stream of their own, class images repeated
`data.reg_repeats` times). The global micro-batch number n = (step - 1)·grad_accum + micro picks
class-epoch ⌊n / P⌋ at position n mod P (P class batches per class-epoch), and rank r trains on
slice r of it, as `BatchOrder` slices instance batches. A pure function of (seed, n): a resumed
run draws exactly the class batches of an uninterrupted one, with nothing in the checkpoint.
Noise and timesteps of class sample number m come from `order.draw_noise` with uid
`CLASS_UID + m`, seeds that instance samples (uids 0, 1, 2, …) never draw.

Captions. A class image's caption file is used as it is (`[trigger]` placeholders removed),
else `data.reg_caption`, else `data.default_caption` with the trigger removed: class images
teach what the class looks like without the trigger, so the trigger never goes in.

Class images are prepared, bucketed and cached (latents and caption embeddings, keyed by
content) with the instance images as records with `is_reg` (`data/prepare.py`,
`data/cache.py`); nothing in `data.reg_folder` is ever written.
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError, LorakitError

if TYPE_CHECKING:
    from lorakit.config import Config
    from lorakit.data.layouts import Problem

CLASS_UID = 2**31
"""Class sample m draws its noise, timesteps and caption dropout with uid CLASS_UID + m
(`order.draw_noise`, `order.sample_rng`); instance samples use 0, 1, 2, … . Not 2**62: torch's
CPU generator keeps only the low 32 bits of its seed, so uids must differ modulo 2**32 (the
seed's uid term is uid × an odd constant) — which they do for runs of fewer than 2**31
samples."""

UNUSABLE = frozenset(
    {
        "unreadable",
        "zero_byte",
        "corrupt",
        "truncated",
        "not_image",
        "decompression_bomb",
        "missing_file",
        "mask_unreadable",
    }
)
"""Problem kinds that mean a class image file cannot be used: refused (not silently left out),
since the user (or `lorakit class-images`) meant every image in data.reg_folder to be used.
Other findings (a malformed metadata line, a symlink loop, a duplicate) are reported and
trained around, as for instance images."""

CLASS_PREFIX = "class"
"""`lorakit class-images` writes CLASS_PREFIX_00000.png + .txt, … in its folder."""


# -- config --------------------------------------------------------------------------------------


def check_prior(c: Config) -> None:
    """ConfigError for prior-preservation keys that cannot work (read by `config.validate`)."""
    d, t = c.data, c.train
    if t.prior_weight < 0:
        raise ConfigError(
            f"Config key 'train.prior_weight' is the weight λ of the class-image loss and must be "
            f"0 or more, got {t.prior_weight}. 1.0 is DreamBooth's value: --set "
            "train.prior_weight=1.0."
        )
    if d.reg_repeats < 1:
        raise ConfigError(f"Config key 'data.reg_repeats' must be 1 or more, got {d.reg_repeats}.")
    if d.reg_folder and t.prior_weight == 0:
        raise ConfigError(
            f"Config key 'train.prior_weight' = 0 gives the class images of data.reg_folder "
            f"'{d.reg_folder}' no weight, so they would cost a denoiser pass per step and change "
            "nothing. Set --set train.prior_weight=1.0 (DreamBooth's value), or --set "
            "data.reg_folder='' to train without class images."
        )
    if d.trigger and d.reg_caption and d.trigger in d.reg_caption:
        raise ConfigError(
            f"Config key 'data.reg_caption' = {d.reg_caption!r} contains the trigger "
            f"'{d.trigger}' (data.trigger), so the class images would teach the trigger instead "
            "of holding the class in place. Use the class prompt alone, e.g. --set "
            "data.reg_caption='a photo of a mug'."
        )


def class_images_command(data, model: str = "", folder: str | Path | None = None) -> str:
    """The `lorakit class-images` command that renders class images for `data` (the config's
    data section) with the base model `model` (model.name; "" = the preset's)."""
    prompt = data.reg_caption or "a photo of a CLASS"
    where = shlex.quote(str(folder or data.reg_folder or "class_images"))
    command = f"lorakit class-images {where} --prompt {shlex.quote(prompt)} --count 200"
    return command + (f" --model {shlex.quote(model)}" if model else "")


# -- captions ------------------------------------------------------------------------------------


def class_caption(caption: str | None, data, template: str) -> str:
    """The caption a class image trains on: its own `caption` (None: it has none) with
    `[trigger]` placeholders removed, else `data.reg_caption`, else `template`
    (`data.default_caption` with `{name}` filled in) without the trigger."""
    from lorakit.data.folder import apply_trigger

    if caption is not None and caption.strip():
        return apply_trigger(" ".join(caption.split()), "")
    if data.reg_caption.strip():
        return " ".join(data.reg_caption.split())
    return apply_trigger(" ".join(template.split()), "")


# -- the folder ----------------------------------------------------------------------------------


def check_reg_folder(data_dir: str | Path, data, model: str = "", files: bool = False) -> None:
    """Refuse a data.reg_folder that is, holds or lies inside the data folder `data_dir`, is
    missing or holds no image; `files`: also class image files that cannot be read (each read
    once, its image header checked, nothing decoded), so `train` refuses them before it writes
    anything. `data`: the config's data section; `model`: model.name, for the command that
    renders class images."""
    reg = data.reg_folder
    if not reg or reg.startswith("hf:"):
        return
    reg_path = Path(reg)
    if not str(data_dir).startswith("hf:"):
        d, r = Path(data_dir).resolve(), reg_path.resolve()
        if r == d or d in r.parents or r in d.parents:
            how = "is" if r == d else ("lies inside" if d in r.parents else "holds")
            raise ConfigError(
                f"data.reg_folder '{reg}' {how} the data folder '{data_dir}': class images and "
                "instance images would be the same files (the instance images would be trained "
                "as the class, or the class images as the subject). Keep class images in a "
                f"folder of their own outside the data folder, e.g. "
                f"`{class_images_command(data, model, reg_path.name + '_class')}`, and point "
                "data.reg_folder at it."
            )
    make = class_images_command(data, model)
    if not reg_path.exists():
        raise LorakitError(
            f"data.reg_folder '{reg}' does not exist. Render class images with the base model "
            f"first: `{make}` (a prompt naming the class of your subject, without the trigger), "
            "or point data.reg_folder at a folder of class images; --set data.reg_folder='' "
            "trains without prior preservation."
        )
    if not reg_path.is_dir():
        raise LorakitError(
            f"data.reg_folder '{reg}' is a file; point it at the folder that holds the class "
            f"images (render them with `{make}`)."
        )
    from lorakit.data.layouts import list_source

    try:
        listing = list_source(reg_path, data, is_reg=True)
    except LorakitError:  # "No images found": said here with the command that makes them
        listing = None
    if listing is None or not listing.items:
        raise LorakitError(
            f"data.reg_folder '{reg}' holds no class images. Render them with the base model: "
            f"`{make}` (a prompt naming the class of your subject, without the trigger), or "
            "point data.reg_folder at a folder of class images; --set data.reg_folder='' trains "
            "without prior preservation."
        )
    if not files:
        return
    bad = [f"'{p.file}' ({p.message})" for p in listing.problems if p.kind in UNUSABLE]
    for item in listing.items:
        problem = _unreadable(item)
        if problem:
            bad.append(f"'{item.name}' ({problem})")
    if bad:
        raise LorakitError(_unusable_message(reg, bad, make))


def _unreadable(item) -> str:
    """Why a class image file cannot be used, from its bytes and image header ("" = fine)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = item.read_bytes()
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not raw:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except Exception as e:  # PIL raises many types for damaged files
        return f"damaged image: {e}"
    return ""


def _unusable_message(reg: str, bad: list[str], make: str) -> str:
    shown = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
    return (
        f"{len(bad)} class image file(s) in data.reg_folder '{reg}' cannot be used: {shown}. "
        "Prior preservation trains on every class image, so none is left out silently: "
        f"replace or delete those files (or render the folder again: `{make}`)."
    )


def class_refusal(problems: list[Problem], rows: list[dict], data) -> str:
    """`prepare.build`'s refusal for class images ("" = none): files of data.reg_folder that
    could not be used (read or decode errors), or none usable at all."""
    if not data.reg_folder:
        return ""
    bad = [
        f"'{p.file.removeprefix('[reg] ')}' ({p.message})"
        for p in problems
        if p.file.startswith("[reg] ") and p.severity == "error" and p.kind in UNUSABLE
    ]
    make = class_images_command(data)
    if bad:
        return _unusable_message(data.reg_folder, bad, make)
    if not any(r["is_reg"] for r in rows):
        return (
            f"data.reg_folder '{data.reg_folder}' has no usable class image (see the problems "
            f"listed). Render class images with the base model: `{make}`, or set "
            "data.reg_folder = '' to train without prior preservation."
        )
    return ""


def fit_class_rows(rows: list[dict], data, batch_size: int) -> tuple[list[dict], list[Problem]]:
    """The class rows of a prepared set (`is_reg`) checked on their own: class batches are drawn
    from class images alone (`ClassOrder`), so every class bucket must fill a batch of
    `batch_size`, handled by data.small_buckets as instance buckets are (error: refuse; merge:
    re-cropped into the nearest class bucket; drop: left out). Returns (rows, problems to
    report); instance rows pass unchanged and first."""
    from lorakit.data.buckets import batch_fit_message, samples_per_bucket, underfull
    from lorakit.data.layouts import Problem

    inst = [r for r in rows if not r["is_reg"]]
    cls = [r for r in rows if r["is_reg"]]
    if not cls:
        if data.reg_folder:
            raise ConfigError(
                f"data.reg_folder is '{data.reg_folder}', but the prepared set holds no class "
                "images (it was prepared without them). Prepare it again with them (`lorakit "
                f"prepare SRC OUT --reg {shlex.quote(data.reg_folder)}`), or train from the "
                "source folder directly (train prepares it in memory)."
            )
        return rows, []
    where = f"the class images of data.reg_folder '{data.reg_folder or '(prepared set)'}'"
    counts = samples_per_bucket([(tuple(r["bucket"]), r["repeats"]) for r in cls])
    total = sum(counts.values())
    if total < batch_size:
        raise ConfigError(
            f"train.batch_size = {batch_size}, but {where} give only {total} class sample(s) "
            f"(images × data.reg_repeats), and each step trains on as many class images as "
            f"instance images. Add class images (`lorakit class-images`), raise "
            f"data.reg_repeats (--set data.reg_repeats={-(-batch_size // total)}), or lower "
            "train.batch_size."
        )
    bad = underfull(counts, batch_size)
    problems: list[Problem] = []
    if bad and data.small_buckets == "merge":
        from lorakit.data.training import _merge_prepared

        cls, problems = _merge_prepared(cls, counts, batch_size)
        bad = {}
    elif bad and data.small_buckets == "drop":
        kept = []
        for r in cls:
            if tuple(r["bucket"]) in bad:
                w, h = r["bucket"]
                problems.append(
                    Problem(
                        "bucket_dropped",
                        r["source"],
                        f"class bucket {w}×{h} cannot fill a batch of {batch_size}; left out "
                        "(data.small_buckets = drop)",
                    )
                )
            else:
                kept.append(r)
        cls, bad = kept, {}
    if bad:
        raise ConfigError(batch_fit_message(bad, batch_size, where, data.small_buckets))
    trig = data.trigger
    leaky = [r["source"] for r in cls if trig and trig in r["caption"]]
    if leaky:
        problems.append(
            Problem(
                "class_caption_trigger",
                f"{len(leaky)} class image(s)",
                f"captions contain the trigger '{trig}' (e.g. '{leaky[0]}'): the class images "
                "then teach the trigger instead of holding the class in place",
            )
        )
    return inst + cls, problems


# -- the order -----------------------------------------------------------------------------------


class ClassOrder:
    """Which class images each micro-batch adds (see the module doc): `batch(n)` for the global
    micro-batch number n = (step - 1)·grad_accum + micro is a pure function of (records, batch
    size, seed, world, rank, n). `records`: every record of the run (instance and class); the
    indices returned are positions in it, as `BatchOrder`'s are."""

    def __init__(self, records, batch_size: int, seed: int, world: int = 1, rank: int = 0):
        from lorakit.data.training import epoch_batches

        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.world, self.rank = world, rank
        self._epoch_batches = epoch_batches
        self._epoch, self._batches = 0, self._for_epoch(0)

    def _for_epoch(self, epoch: int) -> list[list[int]]:
        g = self.batch_size * self.world
        batches = self._epoch_batches(self.records, g, self.seed, epoch, reg=True)
        if not batches:
            raise ConfigError(
                f"No class-image bucket can fill a global batch of {g} (train.batch_size "
                f"{self.batch_size} × {self.world} processes), and each step trains on as many "
                "class images as instance images. Add class images, raise data.reg_repeats, "
                "lower the batch size or use fewer processes."
            )
        return batches

    def per_epoch(self) -> int:
        """Global class batches in one pass over the class images."""
        return len(self._batches)

    def batch(self, n: int) -> tuple[list[int], int]:
        """(record indices of this rank's class batch, uid of its first sample) for the global
        micro-batch number `n` (0-based)."""
        epoch, position = divmod(n, self.per_epoch())
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._for_epoch(epoch)
        bs = self.batch_size
        idx = self._batches[position][self.rank * bs : (self.rank + 1) * bs]
        return idx, CLASS_UID + (n * self.world + self.rank) * bs


# -- rendering class images ----------------------------------------------------------------------


def generate_class_images(
    c: Config,
    folder: str | Path,
    prompt: str,
    count: int,
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    negative: str | None = None,
    resolution: int | None = None,
    progress=None,
) -> tuple[list[Path], int]:
    """Render `count` class images of `prompt` with the base model `c.model` (no adapter) into
    `folder` as `class_00000.png` + `class_00000.txt` (the prompt), …, each PNG and caption
    written atomically. Image i is rendered from seed `seed + i`, so it does not depend on
    `count` or on what already exists; files already there are kept and skipped (an interrupted
    run continues where it stopped). Defaults: sample.steps, sample.guidance, sample.negative
    and data.resolution (square: the training bucket of that size). Returns (the paths of all
    `count` images, how many were rendered now). `progress(i, count)` is called per image."""
    prompt = " ".join(prompt.split())
    if not prompt:
        raise LorakitError(
            "--prompt is empty. Give the class prompt, e.g. --prompt 'a photo of a mug'."
        )
    if count < 1:
        raise LorakitError(f"--count must be 1 or more, got {count}.")
    trig = c.data.trigger
    if trig and trig in prompt:
        raise LorakitError(
            f"--prompt {prompt!r} contains the trigger '{trig}' (data.trigger): class images show "
            "the class without your subject. Leave the trigger out, e.g. --prompt "
            "'a photo of a mug'."
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LorakitError(f"'{folder}' is a file; give a folder for the class images.")
    size = resolution or c.data.resolution
    if size <= 0 or size % 8:
        raise LorakitError(f"--resolution must be a positive multiple of 8, got {size}.")
    names = [f"{CLASS_PREFIX}_{i:05d}" for i in range(count)]
    paths = [folder / f"{n}.png" for n in names]
    for path in paths:
        cap = path.with_suffix(".txt")
        if path.exists() and not cap.is_file():  # this command writes the caption first
            raise LorakitError(
                f"'{path}' exists without its caption file '{cap.name}', so lorakit class-images "
                "did not write it, and it will not overwrite it. Move that file, or give another "
                "folder."
            )
        if path.is_file() and cap.is_file():
            had = " ".join(cap.read_text(encoding="utf-8", errors="replace").split())
            if had != prompt:
                raise LorakitError(
                    f"'{path}' already exists, rendered for the prompt {had!r}, not {prompt!r}: "
                    "one folder holds the class images of one prompt. Give another folder, "
                    "or the same prompt to continue that set."
                )
    todo = [i for i, p in enumerate(paths) if not (p.is_file() and p.with_suffix(".txt").is_file())]
    if not todo:
        return paths, 0

    from dataclasses import replace

    import torch

    from lorakit.fileio import atomic_write_text
    from lorakit.models import load_model
    from lorakit.models.loading import load_in
    from lorakit.sampling import GridSpec, PromptRow, render_cells, save_png
    from lorakit.spec import WEIGHT_DTYPES, place_frozen

    use_cuda = c.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = WEIGHT_DTYPES[c.train.mixed_precision] if use_cuda else torch.float32
    with load_in(dtype):  # straight into the dtype it renders in, as train loads
        family, comps = load_model(c.model)
    place_frozen(family, comps, device, dtype)
    denoiser = getattr(comps, family.denoiser_name)
    if getattr(denoiser, "is_quantized", False):
        denoiser.to(device)  # bitsandbytes weights keep their storage dtype
    else:
        denoiser.to(device, dtype)
    pipe = family.pipeline(comps, c.sample.scheduler)
    spec = GridSpec(
        prompts=[prompt],
        seeds=[seed],
        steps=steps or c.sample.steps,
        guidance=c.sample.guidance if guidance is None else guidance,
        negative=c.sample.negative if negative is None else negative,
        width=size,
        height=size,
        rows=(PromptRow(prompt),),
        scheduler=c.sample.scheduler,
        text_length=c.model.text_length(family.text_length),  # as training encodes its captions
    )
    for done, i in enumerate(todo):
        cell = render_cells(pipe, replace(spec, seeds=[seed + i]))[0]
        # caption first: a PNG without its caption is rendered again, never half-counted
        atomic_write_text(paths[i].with_suffix(".txt"), prompt + "\n")
        save_png(cell.image, paths[i])
        if progress is not None:
            progress(done + 1, len(todo))
    return paths, len(todo)
