"""What the training loop consumes: records at their buckets, epoch batches, per-step captions.

    ts = load_training_set(source, config.data, batch_size, seed)
    print(ts.summary())                       # "20 images × 1 repeat = 20 samples per epoch"
    for epoch in …: for batch in epoch_batches(ts.records, batch_size, seed, epoch): …
        pixels = torch.stack([ts.pixels(i) for i in batch])   # [B, 3, H, W] in [-1, 1]
        prompts = [caption_for_step(ts.records[i].caption, data, rng) for i in batch]

Buckets: sides are multiples of 64 px for data.resolution ≥ 256 and of 8 px below (so the tiny
64-px test resolution has buckets such as 64×64, 56×72, 72×56 …; 8 is the VAE factor, so every
bucket still maps to whole latents). `data.bucket_step` overrides the step.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorakit.data.buckets import (
    batch_fit_message,
    family_step,
    merge_plan,
    samples_per_bucket,
    too_few_samples,
    underfull,
)
from lorakit.data.layouts import Problem
from lorakit.data.prepare import (
    MARKER,
    Prepared,
    build,
    load_prepared,
    merged_problem,
    prepare,
    summary_text,
)
from lorakit.errors import ConfigError, LorakitError


@dataclass(frozen=True)
class Record:
    key: str
    """Content hash of the normalised image (+ its loss mask) + bucket + crop (stable id; latent
    cache key)."""
    caption: str
    """Trigger applied; tag shuffle / dropout NOT applied (see `caption_for_step`)."""
    bucket: tuple[int, int]
    """(width, height) in pixels."""
    crop_top_left: tuple[int, int]
    """(top, left) in pixels of the resized image (SDXL's crop conditioning)."""
    original_size: tuple[int, int]
    """(height, width) before resizing, after EXIF orientation."""
    repeats: int
    is_reg: bool


class TrainingSet:
    """Records plus their prepared PNGs (decoded only when `pixels(i)` is called), their loss
    masks (`masks[i]`: `data.masks.encode_mask` bytes at the bucket size, or None) and source
    names (`sources[i]`, as reports show them)."""

    def __init__(
        self,
        records: list[Record],
        pngs: list[bytes],
        problems: list[Problem],
        masks: list[bytes | None] | None = None,
        sources: list[str] | None = None,
    ):
        self.records = records
        self._pngs = pngs
        self.problems = problems
        self.masks = masks if masks is not None else [None] * len(records)
        self.sources = sources if sources is not None else [r.key for r in records]
        self.decodes = 0

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, i: int) -> torch.Tensor:
        """[3, H, W] float32 in [-1, 1] at the record's bucket (W, H = bucket)."""
        from PIL import Image

        self.decodes += 1
        with Image.open(io.BytesIO(self._pngs[i])) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def samples_per_epoch(self) -> int:
        """Instance samples per epoch (class images are drawn beside them: data/reg.py)."""
        return sum(r.repeats for r in self.records if not r.is_reg)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (each bucket's remainder is dropped)."""
        counts = samples_per_bucket([(r.bucket, r.repeats) for r in self.records if not r.is_reg])
        return sum(n // batch_size for n in counts.values())

    def summary(self) -> str:
        """ "N images × repeats (+ R reg × r) = M samples per epoch"."""
        return summary_text([(r.repeats, r.is_reg) for r in self.records])


def _records(rows: list[dict]) -> list[Record]:
    return [
        Record(
            key=r["key"],
            caption=r["caption"],
            bucket=tuple(r["bucket"]),
            crop_top_left=tuple(r["crop"]),
            original_size=tuple(r["original_size"]),
            repeats=int(r["repeats"]),
            is_reg=bool(r["is_reg"]),
        )
        for r in rows
    ]


def check_prepared(source: Path, rows: list[dict], data, pixel_multiple: int) -> None:
    """A set written by `lorakit prepare` is used as it is, so it must have been prepared for
    this run: the same `data.resolution` (and bucketing), and bucket sides the model can patch.
    Otherwise stop with one paragraph naming both values, never train on something else
    silently."""
    import json

    params: dict = {}
    report = source / "report.json"
    if report.is_file():
        try:
            params = json.loads(report.read_text(encoding="utf-8")).get("params", {})
        except (OSError, ValueError):
            params = {}
    fixes = (
        "Prepare it again with this run's settings (`lorakit prepare SRC NEW_FOLDER` with the "
        "same --preset/--model/--set as this run), or train from the source folder directly "
        "(train prepares it in memory)."
    )
    prepared_res = params.get("resolution")
    if prepared_res is not None and prepared_res != data.resolution:
        raise ConfigError(
            f"The prepared set '{source}' was prepared at data.resolution={prepared_res}, but this "
            f"run asks for data.resolution={data.resolution}; training on it would train at "
            f"{prepared_res} px while the adapter claims {data.resolution}. Train at the set's "
            f"resolution (--set data.resolution={prepared_res}), or use a set prepared at "
            f"{data.resolution}. {fixes}"
        )
    if "mask_flatten" in params and params["mask_flatten"] != data.mask_flatten:
        was, now = str(params["mask_flatten"]).lower(), str(data.mask_flatten).lower()
        raise ConfigError(
            f"The prepared set '{source}' was prepared with data.mask_flatten={was}, but this run "
            f"asks for data.mask_flatten={now} (whether images are flattened through their mask "
            f"files). Use --set data.mask_flatten={was}, or a set prepared with this run's "
            f"setting. {fixes}"
        )
    if "bucketing" in params and params["bucketing"] != data.bucketing:
        raise ConfigError(
            f"The prepared set '{source}' was prepared with data.bucketing="
            f"{str(params['bucketing']).lower()}, but this run asks for data.bucketing="
            f"{str(data.bucketing).lower()}. Use --set data.bucketing="
            f"{str(params['bucketing']).lower()}, or a set prepared with this run's setting. "
            f"{fixes}"
        )
    bad = sorted({tuple(r["bucket"]) for r in rows if any(v % pixel_multiple for v in r["bucket"])})
    if bad:
        shown = ", ".join(f"{w}×{h}" for w, h in bad[:4])
        raise ConfigError(
            f"The prepared set '{source}' has buckets ({shown}) whose sides are not multiples of "
            f"{pixel_multiple} px, which this model needs (each side must map to whole latent "
            f"patches). It was prepared for another model family. Prepare it again for this "
            f"model (`lorakit prepare SRC NEW_FOLDER --model MODEL`, or --set "
            f"data.bucket_step={family_step(data.resolution, data.bucket_step, pixel_multiple)}"
            f"), or train from the source folder directly (train prepares it in memory)."
        )


def load_training_set(
    source: str | Path,
    data,
    batch_size: int,
    seed: int = 0,
    console=None,
    pixel_multiple: int = 8,
) -> TrainingSet:
    """A raw source (any layout `lorakit prepare` reads) or a folder written by `lorakit prepare`.

    Raw sources are prepared in memory, or into `data.cache_dir/prepared/<id>` when
    `data.cache_dir` is set (then re-runs decode nothing). Batch fit is checked up front:
    a bucket that cannot fill `batch_size` raises `ConfigError` saying what to do.
    `seed` does not change the records: crops are a function of the image content, so the
    latent cache stays valid across seeds; it is accepted for symmetry with `epoch_batches`.
    `pixel_multiple`: the family's (bucket sides must be multiples of it; `check_prepared`).
    """
    del seed
    problems: list[Problem] = []
    if not str(source).startswith("hf:") and (Path(source) / MARKER).is_file():
        rows = load_prepared(Path(source))
        check_prepared(Path(source), rows, data, pixel_multiple)
        # class images (is_reg) fill batches of their own: fitted by `fit_class_rows` below
        class_rows = [r for r in rows if r["is_reg"]]
        rows = [r for r in rows if not r["is_reg"]]
        counts = samples_per_bucket([(tuple(r["bucket"]), r["repeats"]) for r in rows])
        bad = underfull(counts, batch_size)
        too_few = too_few_samples(counts, batch_size, f"the prepared set '{source}'")
        if too_few:
            raise ConfigError(too_few)
        if bad and data.small_buckets == "merge":
            rows, problems = _merge_prepared(rows, counts, batch_size)
            bad = underfull(
                samples_per_bucket([(tuple(r["bucket"]), r["repeats"]) for r in rows]),
                batch_size,
            )
        if bad and data.small_buckets == "drop":
            rows = [r for r in rows if tuple(r["bucket"]) not in bad]
        elif bad:
            raise ConfigError(
                batch_fit_message(
                    bad, batch_size, f"the prepared set '{source}'", data.small_buckets
                )
            )
        if not rows:
            raise LorakitError(f"The prepared set '{source}' has no images.")
        rows += class_rows
    else:
        if data.cache_dir:
            ident = hashlib.sha256(
                f"{Path(str(source)).resolve() if not str(source).startswith('hf:') else source}"
                f"|{data.reg_folder}|{batch_size}".encode()
            ).hexdigest()[:16]
            p: Prepared = prepare(
                source,
                Path(data.cache_dir) / "prepared" / ident,
                data,
                batch_size=batch_size,
                console=console,
            )
        else:
            p = build(source, data, batch_size=batch_size, console=console)
        if p.fatal:
            listed = "; ".join(
                f"{pr.file}: {pr.kind}" for pr in p.problems if pr.severity == "error"
            )[:800]
            msg = p.fatal + (f" Problems: {listed}." if listed else "")
            raise (ConfigError if "cannot fill one batch" in p.fatal else LorakitError)(msg)
        rows, problems = p.rows, p.problems
    from lorakit.data.reg import fit_class_rows  # (reg imports this module)

    rows, class_problems = fit_class_rows(rows, data, batch_size)
    problems = [*problems, *class_problems]
    return TrainingSet(
        _records(rows),
        [r["png"] for r in rows],
        problems,
        [r.get("mask") for r in rows],
        [r["source"] for r in rows],
    )


def _merge_prepared(rows: list[dict], counts, batch_size: int) -> tuple[list[dict], list[Problem]]:
    """data.small_buckets = "merge" for a prepared set: the images of buckets that cannot fill a
    batch are re-cropped from their prepared pixels into the bucket `merge_plan` picks (the same
    plan `lorakit prepare --batch-size` applies to the source images)."""
    from lorakit.data.doctor import rebucket

    plan = merge_plan(counts, batch_size)
    out, problems = [], []
    for r in rows:
        target = plan.get(tuple(r["bucket"]))
        if target is None:
            out.append(r)
            continue
        moved = rebucket(r["png"], tuple(r["crop"]), target, r.get("mask"))
        problems.append(merged_problem(r, target, batch_size))
        out.append({**r, **moved})
    return out, problems


def epoch_batches(
    records: list[Record], batch_size: int, seed: int, epoch: int, *, reg: bool = False
) -> list[list[int]]:
    """The batches of one epoch: a pure function of (records, batch_size, seed, epoch).

    Each record appears `repeats` times; every batch holds indices of ONE bucket; within a
    bucket the order is shuffled and the samples that do not fill a last batch are dropped (a
    different remainder each epoch); the batches of all buckets are then shuffled together.
    Only the instance records take part; `reg=True`: only the class images (`is_reg`), shuffled
    by a random stream of their own (the class order of prior preservation, data/reg.py).
    """
    rng = random.Random(f"class|{seed}|{epoch}" if reg else seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.is_reg == reg:
            by_bucket[r.bucket].extend([i] * r.repeats)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        batches += [
            idx[s : s + batch_size] for s in range(0, len(idx) - batch_size + 1, batch_size)
        ]
    rng.shuffle(batches)
    return batches


def caption_for_step(caption: str, data, rng: random.Random) -> str:
    """Per-step caption: dropout to "" with probability `data.caption_dropout`, else with
    `data.shuffle_tags` the comma-separated tags after the first `data.keep_tags` shuffled."""
    if data.caption_dropout > 0 and rng.random() < data.caption_dropout:
        return ""
    if not data.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep, rest = tags[: data.keep_tags], tags[data.keep_tags :]
    rng.shuffle(rest)
    return ", ".join(keep + rest)
