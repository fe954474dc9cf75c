"""`lorakit` command line: a thin Typer layer over the library functions.

Errors a user can fix (`LorakitError`) are printed as one paragraph with a non-zero exit code and
no traceback. Heavy libraries are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lorakit import __version__
from lorakit.errors import LorakitError

app = typer.Typer(
    name="lorakit",
    help="Train LoRA adapters of a brand's visual style on diffusion models, preview them, and "
    "export files that ComfyUI, Automatic1111/Forge and diffusers load.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
presets_app = typer.Typer(help="List, show and copy the shipped presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")

out = Console()
err = Console(stderr=True)


def friendly(fn):
    """Run a command; turn LorakitError (and surprises) into a short message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            from lorakit.stop import Interrupted

            label = (
                "[bold yellow]stopped:[/bold yellow]"
                if isinstance(e, Interrupted)
                else ("[bold red]error:[/bold red]")
            )
            err.print(f"{label} {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("LORAKIT_DEBUG"):
                raise
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                from lorakit.fileio import disk_full  # a write that did not go through fileio

                where = e.filename or os.getcwd()
                err.print(f"[bold red]error:[/bold red] {escape(disk_full(where))}",
                          highlight=False, soft_wrap=True)  # fmt: skip
                raise typer.Exit(1) from None
            err.print(
                f"[bold red]internal error:[/bold red] {type(e).__name__}: {escape(str(e))}. "
                "This is a lorakit bug or an unexpected environment problem; rerun with "
                "LORAKIT_DEBUG=1 for the traceback and include it in a bug report.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    from lorakit.quiet import quiet

    quiet()


# -- shared options -------------------------------------------------------------------------------

PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Preset name (see `lorakit presets ls`).")
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-r",
        help="Recipe layered on the preset: style or product (see `lorakit presets ls`).",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (same sections as config.toml)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable)."),
]


def _resolve(preset, config, sets, recipe=None, **flags):
    from lorakit import config as cfg

    return cfg.resolve(
        preset=preset, config_file=config, sets=sets or [], flags=flags, recipe=recipe
    )


PickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Consent to read pickled files (.ckpt/.pt/.bin adapters or model weights; "
        "tensors only). Pickles can run code: only for files you trust.",
    ),
]

# -- train ----------------------------------------------------------------------------------------


@app.command()
@friendly
def train(
    data: Annotated[Path, typer.Argument(help="Folder of images with same-name .txt captions.")],
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None, typer.Option(help="model.name: tiny:sd15, hub id or folder.")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="train.out: output folder.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="train.steps.")] = None,
    rank: Annotated[int | None, typer.Option(help="lora.rank.")] = None,
    lr: Annotated[float | None, typer.Option(help="train.lr.")] = None,
    trigger: Annotated[str | None, typer.Option(help="data.trigger: the trigger word.")] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite", help="train.overwrite: replace a run in --out.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="train.resume: `latest` or a checkpoint folder to continue exactly."),
    ] = None,
    strict_memory: Annotated[
        bool | None,
        typer.Option(
            "--strict-memory", help="train.strict_memory: refuse to start if it will not fit."
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(help="Run under `accelerate launch` with N processes (one per GPU)."),
    ] = None,
    accelerate_config: Annotated[
        Path | None,
        typer.Option(help="accelerate config file (DDP, DeepSpeed, FSDP; see presets/accelerate)."),
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Train a LoRA on a folder of captioned images.

    Example (offline tiny model, a few minutes on a laptop CPU):

      lorakit train samples/brand --preset tiny-cpu --out runs/demo

    Real model on a GPU:

      lorakit train my_brand/ --preset sd15 --trigger mybrnd --out runs/mybrand

    Continue a stopped run exactly (same command plus):

      lorakit train my_brand/ --preset sd15 --trigger mybrnd --out runs/mybrand --resume latest
    """
    c = _resolve(
        preset,
        config,
        set_,
        recipe=recipe,
        **{
            "model.name": model,
            "train.out": out_dir,
            "train.steps": steps,
            "lora.rank": rank,
            "train.lr": lr,
            "data.trigger": trigger,
            "train.overwrite": overwrite,
            "train.resume": resume,
            "train.strict_memory": strict_memory,
            "model.allow_pickle": allow_pickle or None,
        },
    )
    if (num_processes or accelerate_config) and not os.environ.get("LORAKIT_LAUNCHED"):
        raise typer.Exit(_relaunch(c, data, num_processes, accelerate_config))
    from lorakit.train import train as run_training

    result = run_training(c, data)
    if not result.adapters:
        return  # not the main process of a multi-process run: rank 0 reports
    out.print("\n[bold green]done.[/bold green]")
    for fmt, path in result.adapters.items():
        out.print(f"  adapter ({fmt}): {path}", highlight=False)
    if result.samples:
        out.print(
            f"  sample grids: {result.samples[0].parent}/ ({len(result.samples)} grids)",
            highlight=False,
        )
    out.print(f"  config: {result.out_dir / 'config.toml'}", highlight=False)
    if result.report is not None:
        out.print(f"  report: {result.report}", highlight=False)


# -- prepare --------------------------------------------------------------------------------------


@app.command()
@friendly
def prepare(
    src: Annotated[
        str,
        typer.Argument(
            help="Images: folder (+ .txt captions, N_name repeat folders), "
            "imagefolder with metadata.jsonl/.csv, save_to_disk folder, or hf:DATASET."
        ),
    ],
    dest: Annotated[Path, typer.Argument(help="Output folder (created or updated atomically).")],
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    trigger: Annotated[str | None, typer.Option(help="data.trigger: the trigger word.")] = None,
    resolution: Annotated[int | None, typer.Option(help="data.resolution.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="model.name: bucket for this model's family (default: buckets that suit "
            "every family)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="train.batch_size: checked against buckets.")
    ] = None,
    reg: Annotated[
        str | None,
        typer.Option("--reg", help="data.reg_folder: class images for prior preservation."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Any problem (even a warning) fails, exit 1.")
    ] = False,
) -> None:
    """Check, normalise, caption and bucket an image set into OUT (never touches SRC).

    Re-runs only process new or changed images. Exit 0 = prepared (warnings listed),
    1 = nothing usable or something to fix (OUT untouched), 2 = bad usage/config.

    Example:

      lorakit prepare samples/brand prepared/brand --preset tiny-cpu --batch-size 2
    """
    c = _resolve(
        preset,
        config,
        set_,
        recipe=recipe,
        **{
            "data.trigger": trigger,
            "data.resolution": resolution,
            "model.name": model,
            "train.batch_size": batch_size,
            "data.reg_folder": reg,
        },
    )
    from lorakit.data.prepare import prepare as run_prepare
    from lorakit.data.prepare import print_result

    result = run_prepare(
        src, dest, _prepare_data(c), batch_size=c.train.batch_size, strict=strict, console=err
    )
    print_result(result, dest, out)
    if result.fatal:
        raise LorakitError(result.fatal + " OUT was not changed.")


# -- caption --------------------------------------------------------------------------------------


@app.command()
@friendly
def caption(
    data: Annotated[Path, typer.Argument(help="Folder of images (sub-folders included).")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="data.caption_model: captioner hub id or local folder (BLIP, Florence-2, "
            "Qwen2-VL/Qwen2.5-VL), or tiny:blip / tiny:florence2 / tiny:qwen2_5_vl (offline).",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="data.caption_prompt: the instruction (Qwen-VL), task token (Florence-2) or "
            "prefix (BLIP); default: describe the content, not the style."
        ),
    ] = None,
    trigger: Annotated[
        str | None, typer.Option(help="data.trigger: put in front of every caption.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing captions too.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Caption and print a table; write nothing."),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 4,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest caption, in model tokens.")
    ] = 96,
    limit: Annotated[int, typer.Option(help="Caption at most N images this run (0 = all).")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cuda or cpu.")] = "auto",
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Write a caption file (data.caption_ext, .txt) next to every image that has none, with an
    image-to-text model; the trigger word goes in front. Existing captions are kept unless
    --overwrite. Stopped runs resume: run the same command again.

    Example:

      lorakit caption my_brand/ -m Qwen/Qwen2.5-VL-7B-Instruct --trigger mybrnd --dry-run --limit 8

      lorakit caption my_brand/ --model florence-community/Florence-2-large --trigger mybrnd
    """
    c = _resolve(
        preset,
        config,
        set_,
        **{
            "data.caption_model": model,
            "data.caption_prompt": prompt,
            "data.trigger": trigger,
        },
    )
    from rich.table import Table
    from rich.text import Text

    from lorakit.caption import caption_folder

    try:
        run = caption_folder(
            data,
            c.data,
            overwrite=overwrite,
            dry_run=dry_run,
            batch_size=batch_size,
            limit=limit,
            max_new_tokens=max_new_tokens,
            device=device,
            allow_pickle=allow_pickle or c.model.allow_pickle,
            console=err,
        )
    except KeyboardInterrupt:
        err.print(
            "[bold yellow]stopped:[/bold yellow] every caption written so far is complete and "
            "kept; run the same command again to caption the rest.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    if dry_run:
        table = Table("image", "existing caption", "proposed caption", "action", show_lines=True)
        for e in run.entries:
            existing = "—" if e.existing is None else (e.existing.strip() or "(empty)")
            table.add_row(Text(e.name), Text(existing), Text(e.proposed or "—"), Text(e.action))
        out.print(table)
    counts = {a: run.count(a) for a in ("write", "overwrite", "keep", "done", "later")}
    done = counts["write"] + counts["overwrite"]
    parts = [f"{'would write' if dry_run else 'wrote'} {done} caption(s)"]
    parts += [f"kept {counts['keep']} existing"] if counts["keep"] else []
    parts += [f"{counts['done']} done by the stopped run"] if counts["done"] else []
    parts += [f"{counts['later']} left for the next run (--limit)"] if counts["later"] else []
    label = f"{run.source.name} ({run.source.model_type})"
    out.print(
        f"[bold green]{'dry run' if dry_run else 'captioned'}[/bold green] {escape(str(data))}: "
        f"{', '.join(parts)}; {escape(label)}, {run.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    if run.empty:
        shown = ", ".join(run.empty[:5]) + (
            f" and {len(run.empty) - 5} more" if len(run.empty) > 5 else ""
        )
        err.print(
            f"[yellow]warning:[/yellow] the model wrote no text for {len(run.empty)} image(s) "
            f"({escape(shown)}); their caption is the trigger alone (or empty). Try another "
            "--prompt or --model.",
            highlight=False,
            soft_wrap=True,
        )


def _prepare_data(c):
    """`data` as `prepare` buckets it: for the family of the configured model (the same step
    `train` uses), or, when no model is named or it cannot be told offline, with sides that suit
    every registered family, so the set trains on any of them."""
    import contextlib

    from lorakit.errors import ConfigError
    from lorakit.models import FAMILIES, get_family
    from lorakit.spec import any_family_multiple, bucketed_data, build_spec, masked_data

    if c.model.name or c.model.family != "auto":
        from lorakit.planner import family_of

        with contextlib.suppress(ConfigError):  # a hub id it cannot place: suit every family
            return build_spec(c, get_family(family_of(c))).data
    return masked_data(c, bucketed_data(c.data, any_family_multiple(FAMILIES.values())))


def _relaunch(c, data: Path, num_processes: int | None, accelerate_config: Path | None) -> int:
    """Re-execute `lorakit train` under `accelerate launch` with the resolved config; the
    children read exactly this config (written to a temp file), so every rank agrees."""
    import subprocess
    import tempfile

    if accelerate_config is not None:
        if not accelerate_config.is_file():
            raise LorakitError(f"--accelerate-config '{accelerate_config}' does not exist.")
        from lorakit.distributed import check_accelerate_config

        check_accelerate_config(c, accelerate_config)  # refuse before starting N processes
    fd, cfg_path = tempfile.mkstemp(prefix="lorakit-", suffix=".toml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(c.to_toml())
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    n = num_processes or 1
    if num_processes:
        cmd += ["--num_processes", str(n), "--num_machines", "1"]
        if n > 1 and accelerate_config is None:
            cmd += ["--multi_gpu"]  # with no GPU, accelerate runs MULTI_CPU on gloo
    if accelerate_config is None:
        cmd += ["--mixed_precision", c.train.mixed_precision, "--dynamo_backend", "no"]
    cmd += ["-m", "lorakit", "train", str(data), "--config", cfg_path]
    env = dict(os.environ, LORAKIT_LAUNCHED="1")
    out.print(f"launching {n} processes: {' '.join(cmd)}", highlight=False)
    try:
        proc = subprocess.Popen(cmd, env=env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the children got the Ctrl-C too; wait for their clean stop
    finally:
        os.unlink(cfg_path)


# -- sample ---------------------------------------------------------------------------------------


@app.command()
@friendly
def sample(
    adapter: Annotated[
        Path | None,
        typer.Argument(help="Adapter .safetensors (any lorakit format) or a run folder."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model; default: the one the adapter was trained on.")
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help="Prompt file: one prompt per line with kohya flags, or .toml."),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds, one grid column each.")
    ] = "0,1",
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale.")] = None,
    scale: Annotated[float, typer.Option(help="LoRA strength (0 = base model).")] = 1.0,
    scales: Annotated[
        str | None,
        typer.Option(help="LoRA-scale sweep, e.g. 0,0.5,1: each seed column once per scale."),
    ] = None,
    trigger: Annotated[
        str | None, typer.Option(help="Trigger word for \\[trigger] in prompts.")
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size in pixels.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Output PNG.")] = None,
    mix: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            "-a",
            help="FILE[:WEIGHT] (repeatable): sample several adapters of one family together, "
            "Σ weight·ΔW, in one grid; ADAPTER, if given, joins them at weight 1, and a run "
            "folder stands for its final adapter.",
        ),
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Render a preview grid (rows = prompts, columns = seeds) from a saved adapter; for a
    run folder, one grid per saved checkpoint (and the final adapter) side by side. With
    --adapter, several adapters mixed with their weights in one grid.

    Example:

      lorakit sample runs/demo                     # every checkpoint, the run's model and prompts

      lorakit sample runs/demo --scales 0,0.5,1    # add a LoRA-strength sweep (0 = base model)

      lorakit sample runs/demo/lorakit.safetensors --base tiny:sd15 --prompts samples/prompts.txt

      lorakit sample --adapter style.safetensors:0.8 --adapter product.safetensors:1.0
    """
    from lorakit.sampling import sample_adapter

    mixed = None
    if mix:
        from lorakit.mix import parse_spec

        specs = ([str(adapter)] if adapter is not None else []) + list(mix)
        mixed = [(_adapter_file(p), w) for p, w in (parse_spec(s, "--adapter") for s in specs)]
    elif adapter is None:
        raise LorakitError(
            "Give the adapter to sample: an adapter file or run folder (lorakit sample FILE), or "
            "several with their weights (--adapter FILE:WEIGHT, repeatable)."
        )

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise LorakitError(
            f"--seeds '{seeds}' must be comma-separated integers, e.g. 0,1,2."
        ) from None
    try:
        scale_list = [float(s) for s in scales.split(",") if s.strip()] if scales else None
    except ValueError:
        raise LorakitError(
            f"--scales '{scales}' must be comma-separated numbers, e.g. 0,0.5,1."
        ) from None
    path = sample_adapter(
        adapter,
        base=base,
        prompts=prompts,
        seeds=seed_list,
        steps=steps,
        guidance=guidance,
        scale=scale,
        scales=scale_list,
        trigger=trigger,
        resolution=resolution,
        out_path=out_path,
        allow_pickle=allow_pickle,
        mix=mixed,
    )
    if mixed:
        from lorakit.mix import display_names

        names = display_names([p for p, _ in mixed])
        labels = [f"{n}:{w:g}" for n, (_, w) in zip(names, mixed, strict=True)]
        out.print(f"mixed: {' + '.join(labels)}", highlight=False)
    out.print(f"sample grid: {path}", highlight=False)


# -- class-images ---------------------------------------------------------------------------------


@app.command("class-images")
@friendly
def class_images(
    folder: Annotated[Path, typer.Argument(help="Folder for the class images (data.reg_folder).")],
    prompt: Annotated[
        str, typer.Option(help="The class prompt, without the trigger: 'a photo of a mug'.")
    ],
    count: Annotated[int, typer.Option(help="How many class images (DreamBooth: 100-200).")] = 200,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None, typer.Option(help="model.name: the base model you will train on.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Image i is rendered from seed SEED + i.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (default sample.steps).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="CFG scale (default sample.guidance).")
    ] = None,
    negative: Annotated[
        str | None, typer.Option(help="Negative prompt (default sample.negative).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Square image size in px (default data.resolution).")
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Render class images for DreamBooth prior preservation with the BASE model (no adapter):
    FOLDER/class_00000.png + .txt (the prompt), ... . Re-running continues: images already
    there are kept. Train with them via data.reg_folder.

    Example (the same preset/model as the training run):

      lorakit class-images reg/mug --prompt "a photo of a mug" --count 200 --preset sd15

      lorakit train product/ --preset sd15 --trigger sks --set data.reg_folder=reg/mug
    """
    c = _resolve(
        preset,
        config,
        set_,
        **{"model.name": model, "model.allow_pickle": allow_pickle or None},
    )
    from lorakit.data.reg import generate_class_images

    def progress(i: int, n: int) -> None:
        err.print(f"class image {i}/{n}", highlight=False)

    paths, made = generate_class_images(
        c, folder, prompt, count, seed=seed, steps=steps, guidance=guidance, negative=negative,
        resolution=resolution, progress=progress,
    )  # fmt: skip
    kept = len(paths) - made
    out.print(
        f"class images: {folder} ({made} rendered now, {kept} already there) — train with "
        f"--set data.reg_folder='{folder}'",
        highlight=False,
    )


# -- export ---------------------------------------------------------------------------------------


@app.command()
@friendly
def export(
    src: Annotated[
        Path, typer.Argument(help="A lorakit run folder or an adapter .safetensors file.")
    ],
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="kohya, diffusers, lycoris or all (every format that can hold the adapter); "
            "default: the family's (kohya; SD3: diffusers).",
        ),
    ] = None,
    out_path: Annotated[
        Path, typer.Option("--out", "-o", help="Output file (.safetensors) or folder.")
    ] = Path("."),
    naming: Annotated[
        str,
        typer.Option(
            help="kohya names: original (SDXL SGM, FLUX BFL fused, SD3 joint_blocks) or diffusers "
            "(one key per diffusers module; FLUX/SD3: lora_transformer_…)."
        ),
    ] = "original",
    dtype: Annotated[str, typer.Option(help="Stored weight dtype: fp32, fp16 or bf16.")] = "fp32",
    allow_pickle: PickleOpt = False,
) -> None:
    """Write an adapter in another format (exact: the same ΔW per module, at the same strength).

    With a folder as --out each format gets its own file: OUT/<name>.safetensors (kohya),
    OUT/<name>.lycoris.safetensors (LyCORIS), OUT/diffusers/pytorch_lora_weights.safetensors.
    Every file is built before the first is written, so a refused format writes nothing.

    Example:

      lorakit export runs/demo --format diffusers --out exported/

      lorakit export runs/demo/lorakit.safetensors --format all --out exported/
    """
    from lorakit.export import (
        EXPORTERS,
        holds,
        kinds,
        loads_in,
        prepare,
        read_adapter,
        write_prepared,
    )
    from lorakit.export.lycoris import DORA_NOTE, FILENAME_SUFFIX
    from lorakit.models import get_family

    source = _adapter_file(src)
    adapter, src_fmt = read_adapter(source, allow_pickle=allow_pickle)
    format_ = format_ or get_family(adapter.family).default_export_format
    if format_ != "all" and format_ not in EXPORTERS:
        raise LorakitError(
            f"--format '{format_}' is unknown; choose {', '.join(EXPORTERS)} or all."
        )
    formats = [f for f in EXPORTERS if holds(f, adapter)] if format_ == "all" else [format_]
    if adapter.metadata.get("lorakit.split_fused"):
        out.print(
            f"split {adapter.metadata['lorakit.split_fused']} fused modules (qkv/linear1) into "
            "their diffusers projections (exact ΔW)",
            highlight=False,
        )
    name = adapter.metadata.get("ss_output_name") or source.name.removesuffix(FILENAME_SUFFIX)
    name = name.removesuffix(".safetensors")
    if out_path.suffix == ".safetensors" and len(formats) > 1:
        raise LorakitError(
            "--format all writes one file per format: give --out a folder, not a .safetensors file."
        )
    targets = {
        fmt: out_path if out_path.suffix == ".safetensors" else EXPORTERS[fmt].default_path(
            out_path, name)
        for fmt in formats
    }  # fmt: skip
    for target in targets.values():
        if target.resolve() == source.resolve():
            raise LorakitError(
                f"Refusing to overwrite the source '{source}'; choose another --out."
            )
    # build every file first: a refused format (wrong kind, unnamed module) writes nothing
    prepared = {f: prepare(adapter, f, naming=naming, dtype=dtype) for f in formats}
    family = adapter.family
    for fmt, target in targets.items():
        write_prepared(prepared[fmt], target)
        out.print(
            f"{src_fmt} → {fmt}: {target} ({len(adapter.modules)} modules; loads in "
            f"{loads_in(fmt, family, naming)})",
            highlight=False,
        )
    skipped = [f for f in EXPORTERS if f not in formats]
    if format_ == "all" and skipped:
        label = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
        held = "/".join(sorted(label.get(k, k) for k in kinds(adapter)))
        out.print(
            f"not written: {', '.join(skipped)} (they hold plain LoRA only; this is a {held} "
            "adapter)",
            highlight=False,
        )
    if "dora" in kinds(adapter):
        out.print(f"DoRA: {DORA_NOTE}", highlight=False)


@app.command("inspect")
@friendly
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="A LoRA file (.safetensors) or a lorakit run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Show a LoRA file's format, family, adapter kind, components, rank/alpha per module group,
    size, metadata, trigger phrase, and whether every key maps to a module of the family (exit 1
    if not). A damaged file (missing or mismatched LoRA/DoRA/LoHa/LoKr tensors) exits 1 with the
    message export gives.

    Example:

      lorakit inspect runs/demo/lorakit.safetensors --json
    """
    import json

    from lorakit.inspect import check_line, inspect_file, render

    info = inspect_file(_adapter_file(file), allow_pickle=allow_pickle)
    if as_json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        out.print(escape(render(info)), highlight=False, soft_wrap=True)
    if not info["all_keys_mapped"]:
        if as_json:  # the text report already ends with this line; JSON readers get it on stderr
            err.print(escape(check_line(info)), highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
@friendly
def resize(
    adapter_path: Annotated[Path, typer.Argument(help="Adapter file or lorakit run folder.")],
    rank: Annotated[int | None, typer.Option(help="Target rank per module.")] = None,
    energy: Annotated[
        float | None, typer.Option(help="Keep this fraction of Frobenius energy per module.")
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors.")] = Path(
        "resized.safetensors"
    ),
    format_: Annotated[
        str | None, typer.Option("--format", "-f", help="kohya or diffusers (default: input's).")
    ] = None,
    allow_pickle: PickleOpt = False,
) -> None:
    """Lower the rank by truncated SVD per module; prints the retained energy.

    Example:

      lorakit resize runs/demo --rank 4 --out small.safetensors
    """
    from lorakit.export import EXPORTERS, read_adapter, write_adapter
    from lorakit.resize import resize_adapter

    source = _adapter_file(adapter_path)
    adapter, src_fmt = read_adapter(source, allow_pickle=allow_pickle)
    fmt = format_ or (src_fmt if src_fmt in EXPORTERS else "kohya")
    if fmt not in EXPORTERS:
        raise LorakitError(f"--format '{fmt}' is unknown; choose {', '.join(EXPORTERS)}.")
    new, per, overall = resize_adapter(adapter, rank, energy)
    if out_path.resolve() == source.resolve():
        raise LorakitError(f"Refusing to overwrite the source '{source}'; choose another --out.")
    for name, kept in sorted(per.items()):
        r = new.modules[tuple(name.split(".", 1))].rank
        out.print(f"  {name}: rank {r}, energy {kept:.4f}", highlight=False)
    write_adapter(new, fmt, out_path)
    out.print(f"retained energy overall: {overall:.4f} → {out_path} ({fmt})", highlight=False)


@app.command()
@friendly
def merge(
    adapters: Annotated[
        list[str], typer.Argument(help="Adapter files, each optionally FILE:WEIGHT.")
    ],
    base: Annotated[str, typer.Option(help="Base model: tiny:FAMILY, folder, hub id or file.")],
    scale: Annotated[float, typer.Option(help="Overall LoRA strength.")] = 1.0,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output diffusers folder.")] = Path(
        "merged"
    ),
    single_file: Annotated[
        bool, typer.Option(help="Also write OUT.safetensors: original-layout single file.")
    ] = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Fuse adapters into the base weights and save a diffusers folder.

    Example:

      lorakit merge runs/demo/lorakit.safetensors:0.8 other.safetensors:0.5 --base tiny:sd15
    """
    from lorakit.config import ModelConfig
    from lorakit.export import read_adapter
    from lorakit.merge import merge_into
    from lorakit.models import load_model

    loaded = []
    for spec in adapters:
        path, weight = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not tail.startswith(("\\", "/")):
            try:
                path, weight = head, float(tail)
            except ValueError:
                path = spec
        adapter, _ = read_adapter(_adapter_file(Path(path)), allow_pickle=allow_pickle)
        loaded.append((adapter, weight * scale))
    family, comps = load_model(ModelConfig(name=base, allow_pickle=allow_pickle))
    n = merge_into(family, comps, loaded)
    if out_path.exists() and any(out_path.iterdir()):
        raise LorakitError(f"--out '{out_path}' exists and is not empty; choose a new folder.")
    family.save(comps, str(out_path))
    out.print(f"merged {len(loaded)} adapter(s) into {n} modules → {out_path}", highlight=False)
    if single_file:
        from lorakit.export.single_file import write_single_file

        target = out_path.with_name(out_path.name + ".safetensors")
        write_single_file(family, comps, target)
        out.print(f"single-file checkpoint (original key names) → {target}", highlight=False)


@app.command("merge-loras")
@friendly
def merge_loras_cmd(
    adapters: Annotated[
        list[str],
        typer.Argument(help="Adapter files (any format lorakit reads), each FILE[:WEIGHT]."),
    ],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    rank: Annotated[
        int | None,
        typer.Option(help="Rank per module of the result (default: the exact sum's full rank)."),
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option("--format", "-f", help="kohya, diffusers or lycoris (default: the family's)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Mix adapters of one family into one LoRA file: Σ weight·ΔW per module, re-factorised by
    SVD to --rank; prints the retained energy and records the sources in the file's metadata.

    Example:

      lorakit merge-loras style.safetensors:0.7 product.safetensors:0.5 --rank 16 -o m.safetensors
    """
    from lorakit.export import loads_in
    from lorakit.mix import merge_loras, parse_spec

    specs = [parse_spec(s, "merge-loras") for s in adapters]
    specs = [(_adapter_file(p), w) for p, w in specs]
    result = merge_loras(
        specs, out_path, rank=rank, fmt=format_, overwrite=overwrite, allow_pickle=allow_pickle
    )
    for s in result.sources:
        out.print(f"  {s.label} ({s.fmt}, {len(s.adapter.modules)} modules)", highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)
    ranks = sorted({r for r, _ in result.modules.values()})
    # the modules the truncation cost most (none when every module kept its full rank)
    cut = [kv for kv in result.modules.items() if kv[1][1] < 1 - 1e-6]
    lowest = sorted(cut, key=lambda kv: kv[1][1])[:5]
    if lowest:
        out.print("lowest retained energy per module:", highlight=False)
        for name, (r, kept) in lowest:
            out.print(f"  {name}: rank {r}, energy {kept:.4f}", highlight=False)
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    out.print(
        f"retained energy overall: {result.energy:.6f} (rank {span}, {len(result.modules)} "
        f"modules) → {result.path} ({result.fmt}; loads in "
        f"{loads_in(result.fmt, result.adapter.family)})",
        highlight=False,
    )


def _adapter_file(src: Path) -> Path:
    if src.is_dir():
        from lorakit import config as cfg

        toml = src / "config.toml"
        if not toml.is_file():
            raise LorakitError(f"'{src}' is a folder without config.toml, so not a lorakit run.")
        c = cfg.build(cfg.check_layer(cfg.read_toml(toml, "Run config"), str(toml)))
        from lorakit.export import find_adapter

        path = find_adapter(src, c.export.name, list(c.export.formats))
        if path is not None:
            return path
        raise LorakitError(f"Run folder '{src}' has no finished adapter yet (training not done?).")
    return src


# -- ema ----------------------------------------------------------------------------------------


@app.command("ema")
@friendly
def ema_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A lorakit run folder with 2+ checkpoints.")],
    decay: Annotated[
        float | None,
        typer.Option(help="EMA decay per training step, e.g. 0.99 (averages ~100 steps)."),
    ] = None,
    sigma_rel: Annotated[
        float | None,
        typer.Option(
            "--sigma-rel",
            help="Power-function profile width instead (EDM2 / musubi-tuner), e.g. 0.1.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Training data folder for the held-out score (default: the run's)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier result with these settings.")
    ] = False,
) -> None:
    """Post-hoc EMA: average the adapters a run saved in its checkpoints, weighted by their
    steps, into a new adapter RUN/ema/<setting>/; score it with the run's held-out loss and add
    it to the run's report next to the checkpoints.

    Example:

      lorakit ema runs/demo --decay 0.99

      lorakit ema runs/demo --sigma-rel 0.1
    """
    import json

    from lorakit.ema import describe, run_posthoc

    result = run_posthoc(run_dir, decay=decay, sigma_rel=sigma_rel, data=data, overwrite=overwrite)
    scores = {}
    try:
        state = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        scores = {
            int(r["step"]): float(r["heldout"])
            for r in state["history"]["checkpoints"]
            if r.get("path") and r.get("heldout") is not None and not r.get("label")
        }
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for note in result.notes:
        err.print(f"[yellow]warning:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    out.print(f"post-hoc EMA ({result.tag}) over {len(result.steps)} checkpoints", highlight=False)
    for line in describe(result, scores):
        out.print(escape(line), highlight=False, soft_wrap=True)


# -- presets, config, tiny-model ------------------------------------------------------------------


@presets_app.command("ls")
@friendly
def presets_ls() -> None:
    """List the shipped presets.

    Example:  lorakit presets ls
    """
    from lorakit.config import list_presets, list_recipes, preset_description, read_toml

    for name in list_presets():
        out.print(f"[bold]{name:<14}[/bold] {escape(preset_description(name))}", highlight=False)
    recipes = list_recipes()
    if recipes:
        out.print("\nrecipes (--recipe NAME, layered on any preset):", highlight=False)
        for name, path in recipes.items():
            text = str(read_toml(path, f"recipe '{name}'").get("description", ""))
            out.print(f"[bold]{name:<14}[/bold] {escape(text)}", highlight=False)


@presets_app.command("show")
@friendly
def presets_show(name: Annotated[str, typer.Argument(help="Preset or recipe name.")]) -> None:
    """Print a preset's TOML.

    Example:  lorakit presets show tiny-cpu
    """
    from lorakit.config import list_recipes, preset_path

    recipes = list_recipes()
    path = recipes[name] if name in recipes else preset_path(name)
    sys.stdout.write(path.read_text(encoding="utf-8"))


@presets_app.command("cp")
@friendly
def presets_cp(
    name: Annotated[str, typer.Argument(help="Preset name.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy (file or folder).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a preset to edit it, then use it with --config.

    Example:  lorakit presets cp sd15 my.toml && lorakit train data/ --config my.toml
    """
    from lorakit.config import preset_path
    from lorakit.fileio import atomic_write_bytes

    src = preset_path(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise LorakitError(f"'{target}' already exists; pass --force to overwrite it.")
    atomic_write_bytes(target, src.read_bytes())
    out.print(f"copied preset {name} → {target}", highlight=False)


@app.command("config")
@friendly
def show_config(
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    keys: Annotated[
        bool, typer.Option("--keys", help="List every key with its documentation.")
    ] = False,
) -> None:
    """Print the resolved config (or, with --keys, every documented key).

    Example:  lorakit config --preset tiny-cpu --set train.steps=50
    """
    from lorakit import config as cfg

    if keys:
        defaults = cfg.Config().to_dict()
        for dotted, doc in cfg.field_docs().items():
            section, key = dotted.split(".")
            value = escape(repr(defaults[section][key]))  # docs hold `[trigger]`: not markup
            out.print(f"[bold]{dotted}[/bold] = {value}\n    {escape(doc)}", highlight=False)
        return
    sys.stdout.write(_resolve(preset, config, set_, recipe=recipe).to_toml())


@app.command("env")
@friendly
def env_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Versions, GPUs and free memory, and whether bitsandbytes' 8-bit optimizer and 4-bit
    quantization really work here (each is run for a moment, with the fix when it fails).

    Example:  lorakit env
    """
    import json

    from lorakit.envcheck import report

    rep = report()
    if as_json:
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        return
    for key, value in rep["versions"].items():
        out.print(f"{key:<20} {value}", highlight=False)
    for gpu in rep["gpus"]:
        out.print(
            f"GPU {gpu['index']}: {gpu['name']} (sm {gpu['capability']}), {gpu['free_gib']} of "
            f"{gpu['total_gib']} GiB free, bf16 {'yes' if gpu['bf16'] else 'no'}",
            highlight=False,
        )
    for check in rep["checks"]:
        mark = "[green]ok[/green]  " if check["ok"] else "[red]FAIL[/red]"
        out.print(f"{mark} {escape(check['name'])}: {escape(check['detail'])}", highlight=False)
        if check["fix"]:
            out.print(f"      fix: {escape(check['fix'])}", highlight=False)


@app.command("plan")
@friendly
def plan_cmd(
    preset: PresetOpt = None,
    recipe: RecipeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    vram: Annotated[
        float | None,
        typer.Option(help="GPU memory in GiB to check against (default: the detected GPU)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Estimate the peak GPU memory of a training config without loading any weights, and with
    --vram propose the settings that make it fit (as --set lines).

    Example:  lorakit plan --preset sdxl-12gb --vram 12
    """
    import json

    from lorakit import planner

    c = _resolve(preset, config, set_, recipe=recipe)
    target = vram if vram is not None else planner.detected_vram_gib()
    p = planner.plan(c)
    sets: list[str] = []
    if target is not None and not p.fits(target):
        sets, _ = planner.propose(c, target)
    if as_json:
        rep = dict(p.to_dict(), vram_gib=target, fits=None if target is None else p.fits(target))
        rep["proposal"] = sets
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
        return
    out.print(
        f"[bold]{p.family}[/bold] training plan (real architecture: {p.real})", highlight=False
    )
    out.print(escape(planner.table(p, target)), highlight=False)
    if sets:
        out.print("to fit, add:", highlight=False)
        for s in sets:
            out.print(f"  --set {escape(s)}", highlight=False)


@app.command("tiny-model")
@friendly
def tiny_model(
    family: Annotated[str, typer.Argument(help="Model family, e.g. sd15.")],
    folder: Annotated[Path, typer.Argument(help="Output folder (a diffusers model folder).")],
    force: Annotated[bool, typer.Option(help="Write into an existing non-empty folder.")] = False,
) -> None:
    """Save the offline tiny random-weight model of a family as a diffusers folder.

    Example:

      lorakit tiny-model sd15 models/tiny-sd15

      lorakit train samples/brand --preset tiny-cpu --model models/tiny-sd15
    """
    from lorakit.models import get_family

    fam = get_family(family)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise LorakitError(
            f"'{folder}' exists and is not empty; pass --force or choose another folder."
        )
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fam.save(fam.build_tiny(seed=0), str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # the folder appears only once it is complete
    out.print(f"saved tiny {family} model → {folder}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
