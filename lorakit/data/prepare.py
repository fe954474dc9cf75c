"""`lorakit prepare SRC OUT`: validate, normalise, caption and bucket a set once, incrementally.

    build(src, data, …) -> Prepared        in memory; what `train` uses on a raw folder
    prepare(src, out, data, …) -> Prepared  build + write OUT atomically

OUT holds `dataset/` (a `datasets` dataset: image at the bucket size as uncompressed PPM (see
`doctor.encode_image` for why), caption, bucket, crop, original size, source, content hash, key,
repeats, is_reg, mask: the loss mask at the bucket size or null, see `masks`), `report.json`,
`report.md`, `contact_sheet.png` and `lorakit_prepared.json` (the marker and the per-file results
cache).

Incremental: every source file is read and sha256-hashed (no decode). A file whose hash and
processing parameters match the previous OUT (or the cache passed in) reuses the stored image and
findings; only new or changed files are decoded, in parallel worker processes.

Safety: nothing under SRC is written. OUT is built in a sibling temp folder and swapped in with an
atomic exchange (renameat2 RENAME_EXCHANGE on Linux, else two renames with Ctrl-C deferred and a
recovery step at the next run), so an interrupted run leaves the old or the new OUT, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data.buckets import (
    batch_fit_message,
    merge_plan,
    samples_per_bucket,
    too_few_samples,
    underfull,
)
from lorakit.data.doctor import (
    Params,
    caption_problems,
    estimate_tokens,
    near_duplicates,
    process_image,
)
from lorakit.data.folder import apply_trigger
from lorakit.data.layouts import Problem, SourceItem, list_source
from lorakit.data.masks import attach_masks, read_mask_bytes
from lorakit.data.masks import content_hash as mask_content_hash
from lorakit.data.masks import refusal as mask_refusal
from lorakit.data.reg import class_refusal
from lorakit.errors import ConfigError, LorakitError
from lorakit.fileio import atomic_write_text, owned_tempdir, sweep_dead_tempdirs

MARKER = "lorakit_prepared.json"
FORMAT_VERSION = 1
SHARD_MIN_ROWS = 64
"""Sets of at least this many images are written as two dataset shards, in parallel."""


@dataclass
class Prepared:
    """The prepared set in memory. `rows` are the usable images (see module doc for fields)."""

    source: str
    layout: str
    rows: list[dict]
    problems: list[Problem]
    notes: Counter
    n_files: int
    decoded: int
    reused: int
    params: Params
    cache: dict[str, dict] = field(default_factory=dict)
    fatal: str = ""
    """Non-empty when nothing usable came out or the user must act (exit code 1)."""
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: list_hash (read + sha256), process (decode/resize workers), write."""
    captions: dict[str, str] = field(default_factory=dict)
    """Model captions of images without one (data.caption_missing = "model"), keyed
    `sha256|captioner fingerprint` (`lorakit.caption.captions_for`); kept in OUT's marker."""

    @property
    def warnings(self) -> list[Problem]:
        return self.problems


def check_data(data) -> None:
    """Range checks of the data.* keys that types alone cannot express."""
    if not 0.0 <= data.caption_dropout < 1.0:
        raise ConfigError(
            f"Config key 'data.caption_dropout' must be in [0, 1), got {data.caption_dropout}."
        )
    for key in ("keep_tags", "min_side", "workers", "bucket_step", "max_caption_tokens"):
        if getattr(data, key) < 0:
            raise ConfigError(
                f"Config key 'data.{key}' must be 0 or more, got {getattr(data, key)}."
            )
    if data.repeats < 1:
        raise ConfigError(f"Config key 'data.repeats' must be 1 or more, got {data.repeats}.")
    if data.bucket_step % 8:
        raise ConfigError(
            f"Config key 'data.bucket_step' must be a multiple of 8 (or 0 = auto), got "
            f"{data.bucket_step}."
        )
    if data.bucket_max_ratio < 1.0:
        raise ConfigError(
            f"Config key 'data.bucket_max_ratio' must be 1 or more, got {data.bucket_max_ratio}."
        )
    if data.caption_missing == "model" and not data.caption_model.strip():
        raise ConfigError(
            "Config key 'data.caption_missing' = \"model\" captions the images that have no "
            "caption with data.caption_model, but data.caption_model is empty. Set it to a "
            "captioner (--set data.caption_model=Qwen/Qwen2.5-VL-7B-Instruct, a hub id or a "
            'local folder), or set data.caption_missing = "template".'
        )
    Params.from_data(data)  # parses data.background


def default_workers(data) -> int:
    if data.workers:
        return data.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def _template(template: str, item: SourceItem) -> str:
    stem = Path(item.name.split(" (")[-1].rstrip(")")).stem if item.path is None else item.path.stem
    words = " ".join(stem.replace("_", " ").replace("-", " ").split())
    return template.replace("{name}", words)


def final_caption(item: SourceItem, data) -> str:
    """Caption used for training: the file's caption (or the template), trigger applied."""
    text = item.caption if item.caption is not None and item.caption.strip() else None
    if item.is_reg:  # a class image: its own prompt, never the trigger (lorakit/data/reg.py)
        from lorakit.data.reg import class_caption

        own = None if item.caption_problem else text
        return class_caption(own, data, _template(data.default_caption, item))
    if text is None or item.caption_problem:
        text = _template(data.default_caption, item)
    return apply_trigger(" ".join(text.split()), data.trigger)


# -- parallel processing -------------------------------------------------------------------------


def run_jobs(
    jobs: Iterable, workers: int, advance: Callable[[], None] = lambda: None, expected: int = 0
) -> list[dict]:
    """`process_image` over jobs, in `workers` processes (serially when 1, when fewer than 4 jobs
    are `expected`, or when a pool cannot start here); results in job order.

    `jobs` may be a lazy iterator: the pool is started (forked) first and each job is queued as
    soon as the iterator yields it, so reading + hashing the source overlaps decoding.
    """
    sweep_dead_tempdirs("lorakit-prepare-")  # spool folders of runs killed by SIGKILL
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:
        return []  # nothing to decode (an unchanged re-run): no pool, no imports
    jobs = itertools.chain([first], jobs)
    if workers > 1 and expected >= 4:
        methods = mp.get_all_start_methods()
        # fork: workers start in milliseconds and do not re-import torch.
        ctx = mp.get_context("fork") if "fork" in methods else None
        import imagehash  # noqa: F401  (imported once here, inherited by forked workers)
        import scipy.fftpack  # noqa: F401  (phash's DCT: ~0.2 s per worker otherwise)

        try:
            ex = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
            )
        except (OSError, NotImplementedError, PermissionError):
            ex = None  # no processes here (sandbox, no /dev/shm): one process below
        if ex is not None:
            queued: list = []
            spool = owned_tempdir("lorakit-prepare-")
            try:
                futures = []
                for job in jobs:
                    queued.append(job)
                    futures.append(ex.submit(_spooled, job, spool))
                out = []
                for fut in futures:  # in order; a worker's result is ~1 image, no batching
                    out.append(_unspool(fut.result()))
                    advance()
                ex.shutdown()
                return out
            except BrokenProcessPool:
                ex.shutdown(wait=False, cancel_futures=True)  # redo serially below
                jobs = itertools.chain(queued, jobs)
            except BaseException:  # Ctrl-C: stop at once, queued images are not started
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            finally:
                shutil.rmtree(spool, ignore_errors=True)
    out = []
    for job in jobs:
        out.append(process_image(job))
        advance()
    return out


def _die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when `prepare` dies, even by SIGKILL
    (which runs no cleanup), instead of leaving it hung and holding its memory."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _spooled(job: tuple, spool: str) -> dict:
    """`process_image` in a worker process; the encoded image (0.75 MB at 512²) comes back
    through a file in `spool` instead of the result pipe, which moves it in 64 KiB turns
    between two processes (measured here: ~2.5 ms of CPU per image on both sides together;
    a page-cache file costs ~1 ms)."""
    res = process_image(job)
    if res.get("png") is not None:
        fd, path = tempfile.mkstemp(dir=spool, suffix=".ppm")
        with os.fdopen(fd, "wb") as f:
            f.write(res.pop("png"))
        res["png_file"] = path
    return res


def _unspool(res: dict) -> dict:
    """The worker's encoded image, memory-mapped (read-only) instead of read: no copy into this
    process; the dataset write hands the mapped pages straight to the kernel. The file is
    unlinked at once — the mapping keeps its pages until the image's last reference goes."""
    if "png_file" in res:
        path = res.pop("png_file")
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            try:
                res["png"] = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
            except (OSError, ValueError):  # empty, or out of mappings (vm.max_map_count)
                res["png"] = os.read(fd, size) if size else b""
        finally:
            os.close(fd)
            os.unlink(path)
    return res


def _progress(console, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    live = console is not None and console.is_terminal and total > 0
    prog = Progress(
        TextColumn("[bold]preparing"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not live,
        transient=False,
    )
    return prog


# -- build ---------------------------------------------------------------------------------------


def build(
    src: str | Path,
    data,
    *,
    batch_size: int = 1,
    cache: dict[str, dict] | None = None,
    console=None,
    count_tokens: Callable[[str], int] = estimate_tokens,
    fast_decode: bool = True,
    captions: dict[str, str] | None = None,
) -> Prepared:
    """Validate and process `src` (+ `data.reg_folder`) in memory. Never raises for bad files:
    they become `problems`; only an unreadable source or bad config raises. `captions`: model
    captions of an earlier run (`Prepared.captions`), reused for unchanged images."""
    check_data(data)
    t0 = time.perf_counter()
    params = Params.from_data(data)
    fp = params.fingerprint()
    listing = list_source(src, data)
    attach_masks(listing, src)  # mask files are not images: each goes to its image
    items = list(listing.items)
    problems = list(listing.problems)
    if data.reg_folder:
        from lorakit.data.reg import check_reg_folder

        check_reg_folder(src, data)  # missing, empty or overlapping: one paragraph, at once
        reg = list_source(data.reg_folder, data, is_reg=True)
        attach_masks(reg, data.reg_folder)
        for it in reg.items:
            it.name = f"[reg] {it.name}"
            it.repeats = data.reg_repeats
        items += reg.items
        problems += [
            Problem(p.kind, f"[reg] {p.file}", p.message, p.severity) for p in reg.problems
        ]

    cache = dict(cache or {})
    results: dict[str, dict] = {}

    def ck(h: str, forced) -> str:
        return f"{h}|{fp}|{forced[0]}x{forced[1]}" if forced else f"{h}|{fp}"

    # 1. read + hash every file (no decoding); 2. queue what the cache does not know for the
    # decode workers at once (a generator consumed by run_jobs), so hashing overlaps decoding.
    hashed: list[tuple[SourceItem, bytes, str]] = []
    todo: list[tuple[SourceItem, bytes, str]] = []
    first_by_hash: dict[tuple[str, bool], str] = {}
    queued: set[str] = set()
    t_hash = 0.0

    def new_jobs():
        nonlocal t_hash
        t = time.perf_counter()
        for it in items:
            try:
                raw = it.read_bytes()
            except OSError as e:
                problems.append(
                    Problem("unreadable", it.name, f"cannot be read: {e.strerror or e}", "error")
                )
                continue
            if not raw:
                problems.append(Problem("zero_byte", it.name, "empty file (0 bytes)", "error"))
                continue
            try:
                mask_raw = it.extra["mask_raw"] = read_mask_bytes(it)
            except OSError as e:
                problems.append(
                    Problem(
                        "mask_unreadable",
                        it.extra.get("mask_name", it.name),
                        f"mask file cannot be read: {e.strerror or e}",
                        "error",
                    )
                )
                continue
            # image + mask: a changed mask is processed again, an unchanged pair is reused
            h = mask_content_hash(hashlib.sha256(raw).hexdigest(), mask_raw)
            if (h, it.is_reg) in first_by_hash:
                problems.append(
                    Problem(
                        "exact_duplicate",
                        it.name,
                        f"byte-identical to '{first_by_hash[(h, it.is_reg)]}'; left out",
                        "error",
                    )
                )
                continue
            first_by_hash[(h, it.is_reg)] = it.name
            hashed.append((it, raw, h))
            if ck(h, None) not in cache and h not in queued:
                queued.add(h)
                todo.append((it, raw, h))
                t_hash += time.perf_counter() - t
                yield (it.name, raw, params, None, fast_decode, h, mask_raw)
                t = time.perf_counter()
        t_hash += time.perf_counter() - t

    decoded = 0
    with _progress(console, len(items)) as prog:
        task = prog.add_task("prepare", total=None)
        res_list = run_jobs(
            new_jobs(), default_workers(data), lambda: prog.advance(task), expected=len(items)
        )
        prog.update(task, total=len(todo))
        for (_it, _raw, h), res in zip(todo, res_list, strict=True):
            decoded += res["decoded"]
            cache[ck(h, None)] = res
    reused = len(hashed) - len(todo)
    t_process = time.perf_counter() - t0 - t_hash
    for _it, _raw, h in hashed:
        results[h] = cache[ck(h, None)]

    # 3. per-file findings
    rows: list[dict] = []
    notes: Counter = Counter()
    phashes: dict[str, str] = {}
    for it, _raw, h in hashed:
        res = results[h]
        problems += [Problem(k, it.name, m, s) for k, m, s in res["problems"]]
        if not res["ok"]:
            continue
        by_model = data.caption_missing == "model" and not (it.caption or "").strip()
        by_model = by_model and not (it.is_reg and data.reg_caption.strip())
        if it.caption_problem:
            problems.append(Problem("bad_caption", it.name, f"{it.caption_problem}; template used"))
        # class captions: data.reg_caption, no trigger; a model caption is checked once written
        # (_model_captions)
        elif not by_model and not it.is_reg:
            problems += caption_problems(
                it.name, it.caption, data.trigger, data.max_caption_tokens, count_tokens
            )
        for n in res["notes"]:
            notes[n.split(" '")[0] if n.startswith("colour profile '") else n] += 1
        phashes[it.name] = res["phash"]
        rows.append(
            {
                "source": it.name,
                "content_hash": h,
                "caption": final_caption(it, data),
                "repeats": it.repeats,
                "is_reg": it.is_reg,
                "_raw": _raw,
                "_mask_raw": it.extra.get("mask_raw"),
                **{k: res[k] for k in ("key", "bucket", "crop", "original_size", "png")},
                "mask": res.get("mask"),
                "thumb": res.get("thumb"),
                "_by_model": by_model and not it.caption_problem,
            }
        )
    for a, b, d in near_duplicates(phashes, data.near_duplicate_distance):
        problems.append(
            Problem("near_duplicate", b, f"looks like '{a}' (perceptual hash distance {d}); kept")
        )

    # 4. buckets that cannot fill a batch (instance images: class images fill batches of their
    # own, `reg.fit_class_rows` when a run loads the set)
    counts = samples_per_bucket(
        [(tuple(r["bucket"]), r["repeats"]) for r in rows if not r["is_reg"]]
    )
    bad = underfull(counts, batch_size)
    fatal = too_few_samples(counts, batch_size, f"'{src}'") if rows else ""
    if fatal:
        bad = {}  # no bucket choice can fill a batch: say so once, offer no merge/drop
    if bad and data.small_buckets == "merge":
        plan = merge_plan(counts, batch_size)
        redo = [r for r in rows if tuple(r["bucket"]) in plan and not r["is_reg"]]
        jobs = [
            (
                r["source"],
                r["_raw"],
                params,
                plan[tuple(r["bucket"])],
                fast_decode,
                r["content_hash"],
                r["_mask_raw"],
            )
            for r in redo
            if ck(r["content_hash"], plan[tuple(r["bucket"])]) not in cache
        ]
        merged = run_jobs(jobs, default_workers(data), expected=len(jobs))
        for job, res in zip(jobs, merged, strict=True):
            decoded += res["decoded"]
            cache[ck(job[5], job[3])] = res
        for r in redo:
            target = plan[tuple(r["bucket"])]
            res = cache[ck(r["content_hash"], target)]
            problems.append(merged_problem(r, target, batch_size))
            r.update({k: res[k] for k in ("key", "bucket", "crop", "original_size", "png")})
            r["mask"], r["thumb"] = res.get("mask"), res.get("thumb")
        counts = samples_per_bucket(
            [(tuple(r["bucket"]), r["repeats"]) for r in rows if not r["is_reg"]]
        )
        bad = underfull(counts, batch_size)
    dropped_all = False
    if bad and data.small_buckets == "drop":
        dropped_all = all(tuple(r["bucket"]) in bad for r in rows if not r["is_reg"])
        kept = []
        for r in rows:
            if tuple(r["bucket"]) in bad and not r["is_reg"]:
                problems.append(
                    Problem(
                        "bucket_dropped",
                        r["source"],
                        f"bucket {r['bucket'][0]}×{r['bucket'][1]} cannot fill a batch of "
                        f"{batch_size}; left out (data.small_buckets = drop)",
                    )
                )
            else:
                kept.append(r)
        rows = kept
        bad = {}
    if bad:
        fatal = batch_fit_message(bad, batch_size, f"'{src}'", data.small_buckets)
    if not fatal and dropped_all:
        fatal = (
            f"Every aspect-ratio bucket of '{src}' was left out because none can fill a batch of "
            f"{batch_size} (data.small_buckets = drop). Use --set data.small_buckets=merge, "
            "lower train.batch_size, or --set data.bucketing=false (one square bucket)."
        )
    if not fatal and not [r for r in rows if not r["is_reg"]]:
        fatal = (
            f"Nothing usable in '{src}': {len(items)} image file(s) found, none could be used. "
            "See the problems listed above, fix or replace the files, and run again."
        )
    captions = _model_captions(
        rows, data, dict(captions or {}), problems, notes, count_tokens, console, run=not fatal
    )
    for r in rows:
        r.pop("_raw", None)
        r.pop("_mask_raw", None)
    for v in cache.values():
        v.pop("thumb", None)  # rows keep theirs; the cache need not hold them
    # Keep only entries of files still present (with these parameters): the cache never grows.
    live = {h for _, _, h in hashed}
    cache = {k: v for k, v in cache.items() if k.split("|")[0] in live and f"|{fp}" in k}
    return Prepared(
        source=str(src),
        layout=listing.layout,
        rows=rows,
        problems=problems,
        notes=notes,
        n_files=len(items),
        decoded=decoded,
        reused=reused,
        params=params,
        cache=cache,
        fatal=mask_refusal(problems, str(src)) or class_refusal(problems, rows, data) or fatal,
        seconds=time.perf_counter() - t0,
        timings={"list_hash": t_hash, "process": t_process},
        captions=captions,
    )


def _model_captions(
    rows, data, captions, problems, notes, count_tokens, console, run: bool
) -> dict[str, str]:
    """data.caption_missing = "model": caption the kept rows whose image has none, with the
    trigger put in as `lorakit caption` writes it. Runs after the bucket checks (`run` = not
    fatal), so a set that cannot train loads no captioner. Returns the caption cache, keyed by
    the image bytes' sha256 (a changed mask keeps its caption), holding this set's images."""
    todo = [r for r in rows if r.pop("_by_model", False)]
    if not run:
        return captions
    shas = [hashlib.sha256(r["_raw"]).hexdigest() for r in todo]
    if todo:
        from lorakit.caption import captions_for

        images = [(r["source"], r["_raw"], sha) for r, sha in zip(todo, shas, strict=True)]
        texts = captions_for(images, data, captions, console)
    for r, sha in zip(todo, shas, strict=True):
        trigger = "" if r["is_reg"] else data.trigger  # class images never get the trigger
        r["caption"] = apply_trigger(" ".join(texts[sha].split()), trigger)
        problems += caption_problems(
            r["source"], r["caption"], trigger, data.max_caption_tokens, count_tokens
        )
        notes["captioned by data.caption_model"] += 1
    live = set(shas)
    return {k: v for k, v in captions.items() if k.split("|")[0] in live}


def merged_problem(row: dict, target: tuple[int, int], batch_size: int) -> Problem:
    """The report line for a prepared row whose small bucket was merged into `target`."""
    (w, h), (tw, th) = row["bucket"], target
    return Problem(
        "bucket_merged",
        row["source"],
        f"bucket {w}×{h} could not fill a batch of {batch_size}; moved to {tw}×{th}",
    )


# -- summaries -----------------------------------------------------------------------------------


def summary_line(rows: list[dict]) -> str:
    """ "N images × repeats = M samples per epoch (+ R class images × r …)" for prepared rows."""
    return summary_text([(r["repeats"], r["is_reg"]) for r in rows])


def summary_text(items: list[tuple[int, bool]]) -> str:
    """[(repeats, is_reg)] → "20 images × 2 repeats = 40 samples per epoch (+ 5 class images × 1
    for prior preservation)"."""

    def reps(values: list[int]) -> str:
        u = sorted(set(values))
        if not u:
            return "0"
        return str(u[0]) if len(u) == 1 else f"{u[0]}–{u[-1]}"

    train = [r for r, is_reg in items if not is_reg]
    reg = [r for r, is_reg in items if is_reg]
    rt = reps(train)
    text = f"{len(train)} images × {rt} repeat{'' if rt == '1' else 's'} = {sum(train)} samples"
    text += " per epoch"
    if reg:  # drawn beside the instance samples, as many per step (lorakit/data/reg.py)
        text += f" (+ {len(reg)} class images × {reps(reg)} for prior preservation)"
    return text


def report_dict(p: Prepared) -> dict:
    by_kind = Counter(pr.kind for pr in p.problems)
    caps = [r["caption"] for r in p.rows]
    words = [len(c.split()) for c in caps] or [0]
    toks = [estimate_tokens(c) for c in caps] or [0]
    buckets = Counter(f"{r['bucket'][0]}x{r['bucket'][1]}" for r in p.rows)
    excluded = sorted({pr.file for pr in p.problems if pr.severity == "error"})
    return {
        "lorakit_prepare_version": FORMAT_VERSION,
        "source": p.source,
        "layout": p.layout,
        "summary": summary_line(p.rows),
        "counts": {
            "files": p.n_files,
            "usable": len(p.rows),
            "train_images": sum(not r["is_reg"] for r in p.rows),
            "reg_images": sum(r["is_reg"] for r in p.rows),
            "samples_per_epoch": sum(r["repeats"] for r in p.rows if not r["is_reg"]),
            "excluded": len(excluded),
            "problems": len(p.problems),
            "decoded": p.decoded,
            "reused": p.reused,
        },
        "problems_by_kind": dict(sorted(by_kind.items())),
        "problems": [pr.to_dict() for pr in p.problems],
        "normalised": dict(sorted(p.notes.items())),
        "buckets": dict(sorted(buckets.items())),
        "captions": {
            "words_min": min(words),
            "words_mean": round(statistics.fmean(words), 1),
            "words_max": max(words),
            "tokens_max_estimate": max(toks),
            "too_long": by_kind.get("caption_too_long", 0),
        },
        "params": {k: v for k, v in vars(p.params).items()},
        "fatal": p.fatal,
        "seconds": round(p.seconds, 2),
    }


def report_md(rep: dict) -> str:
    c = rep["counts"]
    lines = [
        "# lorakit prepare report",
        "",
        f"Source: `{rep['source']}` (layout: {rep['layout']})",
        "",
        f"**{rep['summary']}**",
        "",
        f"- files found: {c['files']}; usable: {c['usable']} ({c['train_images']} training, "
        f"{c['reg_images']} regularization); left out: {c['excluded']}",
        f"- decoded this run: {c['decoded']}; reused from the previous run: {c['reused']}",
        "",
    ]
    if rep["fatal"]:
        lines += ["## Must fix", "", rep["fatal"], ""]
    lines += ["## Problems", ""]
    if rep["problems"]:
        lines += ["| kind | severity | file | what |", "|---|---|---|---|"]
        for pr in rep["problems"]:
            msg = pr["message"].replace("|", "\\|")
            lines.append(f"| {pr['kind']} | {pr['severity']} | `{pr['file']}` | {msg} |")
        lines.append("")
        lines.append(
            "Severity `error`: the file is left out. `warning`: kept; check it. Counts: "
            + ", ".join(f"{k} {v}" for k, v in rep["problems_by_kind"].items())
        )
    else:
        lines.append("None.")
    lines += ["", "## Normalised", ""]
    lines += [f"- {k}: {v}" for k, v in rep["normalised"].items()] or ["- nothing to do"]
    lines += ["", "## Buckets (width × height: images)", "", "| bucket | images |", "|---|---|"]
    total = max(1, sum(rep["buckets"].values()))
    for b, n in rep["buckets"].items():
        lines.append(f"| {b.replace('x', '×')} | {n} {'█' * max(1, round(20 * n / total))} |")
    cs = rep["captions"]
    lines += [
        "",
        "## Captions",
        "",
        f"- words per caption: min {cs['words_min']}, mean {cs['words_mean']}, "
        f"max {cs['words_max']}",
        f"- longest caption ≈ {cs['tokens_max_estimate']} tokens; over the limit: {cs['too_long']}",
        "",
        "![contact sheet](contact_sheet.png)",
        "",
    ]
    return "\n".join(lines)


def png_bytes(rgb) -> bytes:
    """An 8-bit RGB PNG of `rgb` (H×W×3 uint8 array), every row "Up"-filtered, zlib level 1.

    Pillow's PNG encoder tries five filters on every row while holding the GIL (0.2–0.3 s for a
    200-image contact sheet, even at compress level 0); one vectorised Up filter + zlib, which
    releases the GIL, costs ~0.05 s and runs beside the dataset write (`write`). Any PNG reader
    decodes it (tests compare Pillow's decode with the array)."""
    import struct
    import zlib

    import numpy as np

    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = arr.shape
    up = arr.copy()
    np.subtract(arr[1:], arr[:-1], out=up[1:])  # uint8 wrap-around is the PNG mod-256 rule
    rows = np.empty((h, 1 + 3 * w), np.uint8)
    rows[:, 0] = 2  # filter type Up (row 0 minus an all-zero prior row: itself)
    rows[:, 1:] = up.reshape(h, 3 * w)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, truecolour, no interlace
    idat = zlib.compress(rows.tobytes(), 1)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def contact_sheet(rows: list[dict], cell: int = 96, cols: int = 8, limit: int = 256) -> bytes:
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    shown = rows[:limit]
    n_rows = max(1, -(-len(shown) // cols))
    sheet = Image.new("RGB", (cols * cell, n_rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(shown):
        if r.get("thumb"):  # made by the worker: no decode here
            size, raw = r["thumb"]
            im = Image.frombytes("RGB", tuple(size), raw)
        else:
            with Image.open(io.BytesIO(r["png"])) as src:
                im = src.convert("RGB")
                im.thumbnail((cell - 4, cell - 4), Image.Resampling.BOX)
        x, y = (i % cols) * cell, (i // cols) * (cell + 14)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        label = f"{r['bucket'][0]}x{r['bucket'][1]}" + (" reg" if r["is_reg"] else "")
        draw.text((x + 3, y + cell), label, fill=(60, 60, 60))
    return png_bytes(np.asarray(sheet))


# -- writing OUT ---------------------------------------------------------------------------------


def _is_within(a: Path, b: Path) -> bool:
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


def _check_paths(src: str | Path, out: Path, data) -> None:
    sources = [] if str(src).startswith("hf:") else [Path(src)]
    if data.reg_folder and not data.reg_folder.startswith("hf:"):
        sources.append(Path(data.reg_folder))
    for s in sources:
        if _is_within(out, s) or _is_within(s, out):
            raise ConfigError(
                f"OUT '{out}' and the source '{s}' overlap. lorakit never writes into a source; "
                "choose an OUT folder outside it."
            )
    if out.exists() and not out.is_dir():
        raise LorakitError(f"OUT '{out}' is a file; choose a folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LorakitError(
            f"OUT '{out}' is a non-empty folder that lorakit prepare did not write. Choose a new "
            "or empty folder (lorakit does not write among other files)."
        )


def _recover(out: Path) -> None:
    """Finish or undo a swap that was cut short (two-rename fallback only)."""
    for stale in out.parent.glob(f".{out.name}.new-*"):
        shutil.rmtree(stale, ignore_errors=True)
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():
        olds[-1].rename(out)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def load_cache(out: Path) -> dict[str, dict]:
    """Per-file results of the prepared folder `out`, with PNGs read back from its dataset."""
    marker = out / MARKER
    if not marker.is_file():
        return {}
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        if meta.get("version") != FORMAT_VERSION:
            return {}
        from datasets import Image as HFImage
        from datasets import load_from_disk

        ds = load_from_disk(str(out / "dataset"))
        ds = ds.cast_column("image", HFImage(decode=False))
        png_by_key = dict(zip(ds["key"], (v["bytes"] for v in ds["image"]), strict=True))
        masks = ds["mask"] if "mask" in ds.column_names else [None] * len(png_by_key)
        mask_by_key = dict(zip(ds["key"], masks, strict=True))
    except Exception:  # a damaged previous OUT only means a full re-run
        return {}
    cache = {}
    for k, entry in meta.get("cache", {}).items():
        entry = dict(entry)
        if entry.get("ok"):
            png = png_by_key.get(entry["key"])
            if png is None:
                continue
            entry["png"] = png
            entry["mask"] = mask_by_key.get(entry["key"])
            entry["bucket"] = tuple(entry["bucket"])
            entry["crop"] = tuple(entry["crop"])
            entry["original_size"] = tuple(entry["original_size"])
        entry["problems"] = [tuple(x) for x in entry["problems"]]
        cache[k] = entry
    return cache


def load_captions(out: Path) -> dict[str, str]:
    """Model captions kept in the marker of the prepared folder `out` (`Prepared.captions`)."""
    try:
        meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    captions = meta.get("captions") if meta.get("version") == FORMAT_VERSION else None
    if not isinstance(captions, dict):
        return {}
    return {k: v for k, v in captions.items() if isinstance(k, str) and isinstance(v, str)}


def _dataset(rows: list[dict]):
    from datasets import Dataset, Features, Value, disable_progress_bars
    from datasets import Image as HFImage

    disable_progress_bars()  # our own progress bar is enough

    features = Features(
        {
            "image": HFImage(),
            "caption": Value("string"),
            "bucket_width": Value("int32"),
            "bucket_height": Value("int32"),
            "crop_top": Value("int32"),
            "crop_left": Value("int32"),
            "original_height": Value("int32"),
            "original_width": Value("int32"),
            "source": Value("string"),
            "content_hash": Value("string"),
            "key": Value("string"),
            "repeats": Value("int32"),
            "is_reg": Value("bool"),
            "mask": Value("binary"),
        }
    )
    cols = {
        "caption": [r["caption"] for r in rows],
        "bucket_width": [r["bucket"][0] for r in rows],
        "bucket_height": [r["bucket"][1] for r in rows],
        "crop_top": [r["crop"][0] for r in rows],
        "crop_left": [r["crop"][1] for r in rows],
        "original_height": [r["original_size"][0] for r in rows],
        "original_width": [r["original_size"][1] for r in rows],
        "source": [r["source"] for r in rows],
        "content_hash": [r["content_hash"] for r in rows],
        "key": [r["key"] for r in rows],
        "repeats": [r["repeats"] for r in rows],
        "is_reg": [r["is_reg"] for r in rows],
        "mask": [None if r.get("mask") is None else bytes(r["mask"]) for r in rows],
    }
    import numpy as np
    import pyarrow as pa
    from datasets import DatasetInfo
    from datasets.table import InMemoryTable

    # Built directly (not Dataset.from_dict) with our own fingerprint: datasets would otherwise
    # dill-hash every image byte again (~0.3 s per 200 images) for a cache we never use.
    schema = features.arrow_schema
    meta = pa.Table.from_arrays(
        [pa.array(cols[name], schema.field(name).type) for name in schema.names[1:]],
        schema=pa.schema([schema.field(name) for name in schema.names[1:]]),
    )
    # One record batch per image whose bytes column wraps the encoded bytes without copying
    # them (pa.py_buffer): the image bytes (≈ all of the data) are copied only when written.
    batches = []
    no_path = pa.nulls(1, pa.string())
    for i, r in enumerate(rows):
        offsets = pa.py_buffer(np.array([0, len(r["png"])], np.int32).tobytes())
        data = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(r["png"])])
        image = pa.StructArray.from_arrays([data, no_path], names=["bytes", "path"])
        cols_i = [image] + [c.slice(i, 1) for c in meta.columns]
        batches.append(
            pa.RecordBatch.from_arrays(
                [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols_i],
                schema=schema,
            )
        )
    table = pa.Table.from_batches(batches, schema=schema)
    fingerprint = hashlib.sha256("".join(cols["key"]).encode()).hexdigest()[:16]
    return Dataset(
        InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=fingerprint
    )


def _save_dataset(ds, path: Path) -> None:
    """`ds.save_to_disk(path)` for our in-memory, already-embedded dataset, minus
    its extra passes over the image bytes (re-embedding and size estimation: ~0.4 s per 150 MB
    here). Same files as `save_to_disk`: Arrow stream shard(s), `state.json`,
    `dataset_info.json`; `load_from_disk` reads it (tests check the round trip)."""
    import dataclasses

    import pyarrow as pa

    path.mkdir(parents=True)
    table = ds.data.table
    # Two shards written by two threads (Arrow releases the GIL): the write is the serial tail of
    # `prepare`, and a second core is idle then.
    shards = 2 if table.num_rows >= SHARD_MIN_ROWS else 1
    step = -(-table.num_rows // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]

    def write_shard(i: int) -> None:
        part = table.slice(i * step, step)
        with pa.OSFile(str(path / names[i]), "wb") as f, pa.ipc.new_stream(f, part.schema) as w:
            w.write_table(part)

    if shards == 1:
        write_shard(0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(shards) as pool:
            list(pool.map(write_shard, range(shards)))
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": ds._fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), "utf-8")
    info = dataclasses.asdict(ds.info)
    info = {k: info[k] for k in sorted(info)}
    (path / "dataset_info.json").write_text(json.dumps(info, indent=2), "utf-8")


def _rows_digest(rows: list[dict]) -> str:
    """Identity of the dataset's content: the image key (a hash of its pixels, bucket and crop)
    and every other column of every row, in order."""
    cols = ("key", "caption", "source", "content_hash", "repeats", "is_reg", "original_size")
    text = json.dumps([[r[c] for c in cols] for r in rows], default=list)
    return hashlib.sha256(f"{FORMAT_VERSION}|{text}".encode()).hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)  # the old OUT is replaced, never modified: sharing is safe
        except OSError:
            shutil.copy2(f, dst / f.name)


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C until the block is done (main thread only); re-raise it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if hit:
            raise KeyboardInterrupt


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if not there."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _swap_in(new: Path, out: Path) -> None:
    with _defer_sigint():
        if out.exists():
            if _exchange(new, out):
                shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old OUT
                return
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            new.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            new.rename(out)


def _paint_sheet(rows: list[dict], into: list) -> None:
    try:
        into.append(contact_sheet(rows))
    except BaseException as e:  # re-raised by `write` in the main thread
        into.append(e)


def write(
    p: Prepared,
    out: Path,
    old_sheet: tuple[set[str], bytes] | None = None,
    old_digest: str = "",
) -> None:
    """Write OUT from scratch in a temp sibling, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    new = out.parent / f".{out.name}.new-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        digest = _rows_digest(p.rows)
        keys = {r["key"] for r in p.rows}
        sheet: list = []
        if old_sheet is not None and old_sheet[0] == keys:
            sheet.append(old_sheet[1])  # unchanged set: no decoding for the contact sheet either
            painter = None
        else:
            # zlib and the Arrow write release the GIL: the sheet is made beside the dataset.
            painter = threading.Thread(target=_paint_sheet, args=(p.rows, sheet), daemon=True)
            painter.start()
        if old_digest == digest and (out / "dataset").is_dir():
            _link_or_copy(out / "dataset", new / "dataset")  # unchanged: no bytes rewritten
        else:
            _save_dataset(_dataset(p.rows), new / "dataset")
        rep = report_dict(p)
        atomic_write_text(new / "report.json", json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(new / "report.md", report_md(rep))
        if painter is not None:
            painter.join()
        if isinstance(sheet[0], BaseException):
            raise sheet[0]
        (new / "contact_sheet.png").write_bytes(sheet[0])
        cache = {}
        for k, v in p.cache.items():
            cache[k] = {kk: vv for kk, vv in v.items() if kk not in ("png", "thumb", "mask")}
        meta = {
            "version": FORMAT_VERSION,
            "source": p.source,
            "params": p.params.fingerprint(),
            "keys": sorted(keys),
            "rows_digest": digest,
            "cache": cache,
            "captions": p.captions,
        }
        atomic_write_text(new / MARKER, json.dumps(meta) + "\n")
        _swap_in(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def prepare(
    src: str | Path,
    out: str | Path,
    data,
    *,
    batch_size: int = 1,
    strict: bool = False,
    console=None,
    fast_decode: bool = True,
) -> Prepared:
    """Build and write OUT. OUT is left untouched when the result is fatal (or strict and any
    problem was found); the caller reports `fatal` / problems and picks the exit code."""
    out = Path(out)
    _check_paths(src, out, data)
    _recover(out)
    cache = load_cache(out)
    captions = load_captions(out)
    old_sheet, old_digest = None, ""
    if (out / MARKER).is_file() and (out / "contact_sheet.png").is_file():
        try:
            meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
            old_sheet = (set(meta.get("keys", [])), (out / "contact_sheet.png").read_bytes())
            old_digest = meta.get("rows_digest", "") if cache else ""
        except (OSError, ValueError):
            old_sheet = None
    p = build(
        src,
        data,
        batch_size=batch_size,
        cache=cache,
        console=console,
        fast_decode=fast_decode,
        captions=captions,
    )
    if strict and p.problems and not p.fatal:
        p.fatal = (
            f"--strict: {len(p.problems)} problem(s) found (listed above); OUT was not written. "
            "Fix them or run without --strict."
        )
    if not p.fatal:
        t0 = time.perf_counter()
        write(p, out, old_sheet, old_digest)
        p.timings["write"] = time.perf_counter() - t0
        p.seconds += p.timings["write"]
    return p


def load_prepared(out: Path) -> list[dict]:
    """Rows of a folder written by `prepare` (PNG bytes included, not decoded)."""
    from datasets import Image as HFImage
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(out / "dataset")).cast_column("image", HFImage(decode=False))
    except Exception as e:
        raise LorakitError(
            f"'{out}' has a lorakit marker but its dataset cannot be read ({e}). Run "
            "`lorakit prepare` again into a new folder."
        ) from None
    rows = []
    for r in ds:
        rows.append(
            {
                "source": r["source"],
                "content_hash": r["content_hash"],
                "caption": r["caption"],
                "repeats": r["repeats"],
                "is_reg": r["is_reg"],
                "key": r["key"],
                "bucket": (r["bucket_width"], r["bucket_height"]),
                "crop": (r["crop_top"], r["crop_left"]),
                "original_size": (r["original_height"], r["original_width"]),
                "png": r["image"]["bytes"],
                "mask": r.get("mask"),  # None: no mask (or a set prepared before masks)
            }
        )
    return rows


def print_result(p: Prepared, out: Path, console) -> None:
    """Every problem (one line each), the summary, and where OUT is (or why it was not written)."""
    from rich.markup import escape

    if p.problems:
        console.print(f"[bold]{len(p.problems)} problem(s):[/bold]")
        for pr in p.problems:
            colour = "red" if pr.severity == "error" else "yellow"
            console.print(
                f"  [{colour}]{pr.severity:<7}[/{colour}] {pr.kind:<26} {escape(pr.file)}: "
                f"{escape(pr.message)}",
                highlight=False,
                soft_wrap=True,
            )
    if p.fatal:
        return  # the caller raises it as the error paragraph
    console.print(
        f"[bold green]prepared[/bold green] {escape(summary_line(p.rows))} "
        f"({p.decoded} decoded, {p.reused} unchanged, {p.seconds:.1f} s) → {escape(str(out))}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  report: {escape(str(out / 'report.md'))}", highlight=False)
