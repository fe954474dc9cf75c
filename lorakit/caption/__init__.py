"""Captions from an image-to-text model: `lorakit caption DATA`, and images without captions in
`prepare` / `train` (`data.caption_missing = "model"`).

    run = caption_folder("my_images/", data, overwrite=False, dry_run=False, batch_size=4)
    run.entries   # one Entry per image: name, existing caption, proposed caption, action

`caption_folder` writes one `<image stem><data.caption_ext>` sidecar per image that has none
(an empty sidecar counts as none), in the order `lorakit prepare` lists them. Actions:

    keep       the image has a caption (not read or written; --overwrite replaces it)
    write      no caption yet: captioned and written
    overwrite  --overwrite: captioned and written over the existing file
    done       --overwrite run that resumes: written by the interrupted run, not redone
    later      beyond --limit: left for the next run

The caption is the model's text with the trigger put in (`lorakit.data.folder.apply_trigger`:
`[trigger]`/`{trigger}` replaced, else `TRIGGER, caption`), so training uses it as written.

Resumable: each caption is written atomically (`lorakit.fileio`) as soon as its batch is done,
so a run that is stopped (Ctrl-C, kill, power cut) leaves complete files; run the same command
again and the captioned images are kept like any other. An `--overwrite` run also appends each
written file's sha256 to `DATA/.lorakit_caption_journal.jsonl` (with the settings it was run
with), so its re-run skips what it already replaced; the journal is removed when a run
finishes. Nothing is written before every image to caption has been decoded and the captioner
checked: an unreadable image or a bad captioner stops the run with nothing written.

`captions_for` is the prepare/train hook: captions for images without any, cached by content
(image sha256 × captioner fingerprint) in the prepared set's marker file; never written next
to the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.caption.captioners import (
    KINDS,
    Source,
    describe,
    fingerprint,
    load_captioner,
    open_image,
)
from lorakit.errors import LorakitError

JOURNAL = ".lorakit_caption_journal.jsonl"
MAX_NEW_TOKENS = 96
"""Longest caption the model may write, in its own tokens (the CLI's --max-new-tokens)."""
BATCH_SIZE = 4
"""Images per generate call for data.caption_missing = "model" (the CLI's --batch-size)."""

__all__ = ["KINDS", "CaptionRun", "Entry", "caption_folder", "captions_for"]


@dataclass
class Entry:
    """One image of the folder and what the run does with it."""

    name: str
    """Path relative to DATA (what tables and messages show)."""
    image: Path
    sidecar: Path
    existing: str | None
    """The caption file's text; None = no file; a file that cannot be read shows why."""
    action: str
    proposed: str = ""
    """The caption written (or, in a dry run, that would be), trigger included."""


@dataclass
class CaptionRun:
    entries: list[Entry]
    source: Source
    prompt: str
    seconds: float = 0.0
    empty: list[str] = field(default_factory=list)
    """Images the model gave no text for (their file holds only the trigger, or nothing)."""

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.entries)


def caption_folder(
    root: str | Path,
    data,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    limit: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    device: str = "auto",
    allow_pickle: bool = False,
    console=None,
) -> CaptionRun:
    """Caption the images of the folder `root` (see the module doc) with `data.caption_model`,
    `data.caption_prompt` ("" = the model's default), `data.trigger`, `data.caption_ext` and
    `data.background`. `limit` > 0 captions at most that many images this run."""
    from lorakit.data.doctor import parse_colour
    from lorakit.data.folder import apply_trigger
    from lorakit.data.layouts import list_source

    t0 = time.perf_counter()
    if batch_size < 1 or limit < 0 or max_new_tokens < 1:
        raise LorakitError(
            f"--batch-size ({batch_size}) and --max-new-tokens ({max_new_tokens}) must be 1 or "
            f"more, and --limit ({limit}) 0 (no limit) or more."
        )
    root = Path(root)
    if not root.is_dir():
        raise LorakitError(
            f"'{root}' is not a folder. `lorakit caption` writes a caption file next to each "
            "image of a folder: pass the folder that holds the images."
        )
    source = describe(data.caption_model, allow_pickle)
    listing = list_source(root, data)
    if listing.layout != "folder":
        raise LorakitError(
            f"'{root}' is a {listing.layout} source (its captions live in its metadata or "
            "dataset, not in caption files), so `lorakit caption` cannot write captions for "
            'it. Set data.caption_missing = "model" with data.caption_model instead: prepare '
            "and train then caption its images that have none, in memory."
        )
    ext = data.caption_ext if data.caption_ext.startswith(".") else f".{data.caption_ext}"
    entries = [_entry(it, ext, overwrite) for it in listing.items]
    prompt = data.caption_prompt or KINDS[source.model_type].default_prompt
    run = CaptionRun(entries, source, prompt)
    settings = fingerprint(source, data.caption_prompt, max_new_tokens)
    settings = f"{settings}|{data.trigger}|{ext}"
    journal = root / JOURNAL
    stale = overwrite and not dry_run and _resume_from_journal(journal, settings, entries)
    todo = [e for e in entries if e.action in ("write", "overwrite")]
    if limit:
        for e in todo[limit:]:
            e.action = "later"
        todo = todo[:limit]
    background = parse_colour(data.background)
    _check_images(todo, background)
    finished = overwrite and not dry_run and not any(e.action == "later" for e in entries)
    if not todo:
        if finished:
            journal.unlink(missing_ok=True)  # stopped after its last write: nothing left
        run.seconds = time.perf_counter() - t0
        return run

    cap = load_captioner(
        data.caption_model,
        prompt=data.caption_prompt,
        max_new_tokens=max_new_tokens,
        device=device,
        allow_pickle=allow_pickle,
        source=source,
    )
    if overwrite and not dry_run and (stale or not journal.is_file()):
        from lorakit.fileio import atomic_write_text

        atomic_write_text(journal, json.dumps({"lorakit_caption": 1, "settings": settings}) + "\n")
    with _progress(console, len(todo), dry_run) as (prog, task):
        for batch in _chunks(todo, batch_size):
            images = [open_image(e.image, e.name, background) for e in batch]
            for e, text in zip(batch, cap.caption(images), strict=True):
                if not text:
                    run.empty.append(e.name)
                e.proposed = apply_trigger(text, data.trigger)
                if not dry_run:
                    _write_caption(e, journal if overwrite else None)
                prog.advance(task)
    if finished:
        journal.unlink(missing_ok=True)  # nothing left to resume
    run.seconds = time.perf_counter() - t0
    return run


def _entry(item, ext: str, overwrite: bool) -> Entry:
    sidecar = item.path.with_suffix(ext)
    if not sidecar.is_file():
        existing, has_caption = None, False
    elif item.caption_problem:
        existing, has_caption = f"({item.caption_problem})", True
    else:
        existing = item.caption
        has_caption = bool(existing and existing.strip())
    action = "write" if not has_caption else ("overwrite" if overwrite else "keep")
    return Entry(item.name, item.path, sidecar, existing, action)


def _check_images(todo: list[Entry], background) -> None:
    """Decode every image to caption before anything is loaded or written: a bad file stops
    the run with nothing changed, not after hours with half the folder captioned."""
    bad = []
    for e in todo:
        try:
            open_image(e.image, e.name, background)
        except LorakitError as err:
            bad.append((e.name, str(err)))
    if len(bad) == 1:
        raise LorakitError(bad[0][1])
    if bad:
        names = ", ".join(f"'{n}'" for n, _ in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        raise LorakitError(
            f"{len(bad)} images cannot be read ({names}; first: {bad[0][1].split(' (', 1)[-1]}"
            " Nothing was written. Remove or replace those files (or move them out of the "
            "folder), then run again."
        )


def _write_caption(e: Entry, journal: Path | None) -> None:
    from lorakit.fileio import atomic_write_text

    data = e.proposed + "\n"
    atomic_write_text(e.sidecar, data)
    if journal is not None:
        line = json.dumps({"image": e.name, "sha256": hashlib.sha256(data.encode()).hexdigest()})
        # One short line per caption, appended and synced: rewriting the whole journal
        # atomically for each of 10,000 images would write it 10,000 times over; a line torn by
        # a power cut is skipped when it is read back (that one image is captioned again).
        with open(journal, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def _resume_from_journal(journal: Path, settings: str, entries: list[Entry]) -> bool:
    """Mark `done` the images an interrupted `--overwrite` run with the same settings wrote and
    that still hold exactly what it wrote. True when the journal is of other settings (it is
    then started afresh, once the run is checked and about to write)."""
    if not journal.is_file():
        return False
    lines = journal.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except ValueError:
        head = {}
    if head.get("settings") != settings:
        return True
    written: dict[str, str] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            written[rec["image"]] = rec["sha256"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash
    for e in entries:
        if e.action == "overwrite" and e.name in written:
            try:
                now = hashlib.sha256(e.sidecar.read_bytes()).hexdigest()
            except OSError:
                continue
            if now == written[e.name]:
                e.action = "done"
    return False


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _progress:
    """A rich progress bar on `console` (nothing when it is not a terminal)."""

    def __init__(self, console, total: int, dry_run: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        live = console is not None and console.is_terminal
        self.prog = Progress(
            TextColumn("[bold]captioning" + (" (dry run)" if dry_run else "")),
            MofNCompleteColumn(),
            BarColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not live,
        )
        self.total = total

    def __enter__(self):
        self.prog.__enter__()
        return self.prog, self.prog.add_task("caption", total=self.total)

    def __exit__(self, *exc):
        return self.prog.__exit__(*exc)


def captions_for(
    images: list[tuple[str, bytes, str]], data, cache: dict[str, str], console=None
) -> dict[str, str]:
    """The prepare/train hook (`data.caption_missing = "model"`): {sha256: model caption, trigger
    not applied} for `(name, image bytes, sha256)` images. Captions found in `cache` (keyed
    `sha256|captioner fingerprint`) are reused; the rest are generated with
    `data.caption_model` and added to it. The captioner is loaded only when one is missing and
    released before returning (the diffusion model loads next)."""
    from lorakit.data.doctor import parse_colour

    source = describe(
        data.caption_model,
        pickle_fix=(
            "Convert them to safetensors, or write the captions once with `lorakit caption DATA "
            f"--model {data.caption_model} --allow-pickle` (caption files next to the images) "
            "and train on those."
        ),
    )
    fp = fingerprint(source, data.caption_prompt, MAX_NEW_TOKENS)
    out: dict[str, str] = {}
    missing = []
    for name, raw, h in images:
        if f"{h}|{fp}" in cache:
            out[h] = cache[f"{h}|{fp}"]
        elif h not in {m[2] for m in missing}:
            missing.append((name, raw, h))
    if not missing:
        return out
    import torch

    background = parse_colour(data.background)
    cap = load_captioner(
        data.caption_model,
        prompt=data.caption_prompt,
        max_new_tokens=MAX_NEW_TOKENS,
        source=source,
    )
    try:
        with _progress(console, len(missing), dry_run=False) as (prog, task):
            for batch in _chunks(missing, BATCH_SIZE):
                images_ = [open_image(raw, name, background) for name, raw, _ in batch]
                for (_, _, h), text in zip(batch, cap.caption(images_), strict=True):
                    cache[f"{h}|{fp}"] = out[h] = text
                    prog.advance(task)
    finally:
        on_gpu = cap.device.type == "cuda"
        del cap
        if on_gpu:
            torch.cuda.empty_cache()
    return out
