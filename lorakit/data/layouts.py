"""Reading training inputs in every supported layout into one flat list of `SourceItem`s.

Layouts (detected from the source, in this order):

- `hf:SPEC` — `datasets.load_dataset(SPEC, split=data.dataset_split)`: a hub id (network only
  because the user named it) or a local folder / file `load_dataset` understands.
- a folder written by `Dataset.save_to_disk` (`dataset_info.json` + `state.json`, or a
  `dataset_dict.json` whose `data.dataset_split` is used).
- an HF `imagefolder`: a folder with `metadata.jsonl` or `metadata.csv` (`file_name` + caption
  column `data.caption_column`, falling back to `text` / `caption`).
- a folder tree of images with same-name caption sidecars (`data.caption_ext`), where kohya-style
  sub-folders `N_name` mean "repeat these images N times".

Nothing here decodes an image: items carry the raw file bytes (or a path to read them from), so
hashing and incremental re-runs cost one read per file. Problems found while listing (unreadable
files, symlink loops, bad metadata lines, …) are returned as `Problem`s, never raised, so the
doctor can report everything at once. Only "this source cannot be read at all" raises.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lorakit.errors import LorakitError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Problem:
    """One finding of the doctor. `error` = the file is left out; `warning` = kept, but look."""

    kind: str
    file: str
    message: str
    severity: str = "warning"

    def to_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "file": self.file,
            "message": self.message,
            "severity": self.severity,
        }


@dataclass
class SourceItem:
    """One image of a source, not yet decoded.

    `name` is the path relative to the source root (or `row N` for datasets) and is what
    reports show. `caption` is None when the image has no caption at all (the template is then
    used); `caption_problem` names a caption that exists but cannot be used.
    """

    name: str
    path: Path | None = None
    data: bytes | None = None
    caption: str | None = None
    caption_problem: str | None = None
    repeats: int = 1
    is_reg: bool = False
    extra: dict = field(default_factory=dict)

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


@dataclass
class Listing:
    layout: str
    items: list[SourceItem]
    problems: list[Problem]


def list_source(source: str | Path, data, *, is_reg: bool = False) -> Listing:
    """All images of `source` in a stable order, with what was wrong while listing them."""
    text = str(source)
    if text.startswith("hf:"):
        listing = _from_load_dataset(text[3:], data)
    else:
        root = Path(source)
        if not root.exists():
            raise LorakitError(
                f"Data source '{source}' does not exist. Pass a folder of images with caption "
                "files, an imagefolder with metadata.jsonl/.csv, a folder written by "
                "Dataset.save_to_disk, or hf:DATASET_ID."
            )
        if not root.is_dir():
            raise LorakitError(
                f"Data source '{source}' is a file; pass the folder that holds the images."
            )
        if (root / "dataset_dict.json").is_file() or (
            (root / "dataset_info.json").is_file() and (root / "state.json").is_file()
        ):
            listing = _from_saved_dataset(root, data)
        elif (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
            listing = _from_imagefolder(root, data)
        else:
            listing = _from_folder_tree(root, data)
    for it in listing.items:
        it.is_reg = is_reg
    return listing


# -- folder tree ---------------------------------------------------------------------------------


def _walk(root: Path, problems: list[Problem]) -> list[Path]:
    """Every regular-file path under `root` (following symlinked folders once; loops reported)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> None:
        try:
            st = folder.stat()
        except OSError as e:
            problems.append(
                Problem("unreadable", _rel(folder, root), f"cannot open folder: {e}", "error")
            )
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            problems.append(
                Problem(
                    "symlink_loop",
                    _rel(folder, root),
                    "symbolic link points back into a folder already read; skipped",
                    "warning",
                )
            )
            return
        seen.add(ident)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append(
                Problem("unreadable", _rel(folder, root), f"cannot list folder: {e}", "error")
            )
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError as e:  # ELOOP on a self-referencing link
                problems.append(
                    Problem("symlink_loop", _rel(path, root), f"broken link: {e}", "error")
                )
                continue
            if is_dir:
                if path.suffix.lower() in IMAGE_EXTS:
                    problems.append(
                        Problem(
                            "directory_named_like_image",
                            _rel(path, root),
                            "is a folder with an image extension; its contents are read as a "
                            "sub-folder",
                            "warning",
                        )
                    )
                visit(path)
            else:
                found.append(path)

    visit(root)
    return found


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _repeats_for(rel: Path, default: int) -> int:
    """The innermost `N_name` folder on the way to a file sets its repeats (kohya layout)."""
    repeats = default
    for part in rel.parts[:-1]:
        m = KOHYA_DIR.match(part)
        if m:
            repeats = int(m.group(1))
    return repeats


def _read_caption(path: Path, item: SourceItem, root: Path) -> None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        item.caption_problem = f"caption file '{_rel(path, root)}' cannot be read: {e}"
        return
    try:
        item.caption = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        item.caption_problem = f"caption file '{_rel(path, root)}' is not UTF-8 text"


def _from_folder_tree(root: Path, data) -> Listing:
    problems: list[Problem] = []
    files = _walk(root, problems)
    ext = data.caption_ext if data.caption_ext.startswith(".") else f".{data.caption_ext}"
    by_lower: dict[str, list[Path]] = {}
    for f in files:
        by_lower.setdefault(f.as_posix().lower(), []).append(f)
    items: list[SourceItem] = []
    image_stems: set[Path] = set()
    for f in files:
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        rel = f.relative_to(root)
        item = SourceItem(name=rel.as_posix(), path=f, repeats=_repeats_for(rel, data.repeats))
        cap = f.with_suffix(ext)
        if cap.is_file():
            _read_caption(cap, item, root)
        items.append(item)
        image_stems.add(f.with_suffix(""))
        same = by_lower[f.as_posix().lower()]
        if len(same) > 1 and same[0] == f:
            problems.append(
                Problem(
                    "case_conflict",
                    rel.as_posix(),
                    "file names differ only in case ("
                    + ", ".join(_rel(p, root) for p in same)
                    + "); they collide on Windows/macOS — rename one",
                    "warning",
                )
            )
    for f in files:
        if f.suffix.lower() == ext.lower() and f.with_suffix("") not in image_stems:
            problems.append(
                Problem("orphan_caption", _rel(f, root), "caption file without an image", "warning")
            )
    if not items and not problems:
        raise LorakitError(
            f"No images found in '{root}' (looked for {', '.join(sorted(IMAGE_EXTS))}, "
            "case-insensitive, in all sub-folders)."
        )
    return Listing("folder", items, problems)


# -- imagefolder with metadata -------------------------------------------------------------------


def _caption_from_row(row: dict, data, where: str) -> tuple[str | None, str | None]:
    for col in (data.caption_column, "text", "caption"):
        if col in row:
            value = row[col]
            if value is None:
                return None, None
            return str(value), None
    return None, f"{where} has no caption column '{data.caption_column}'"


def _from_imagefolder(root: Path, data) -> Listing:
    problems: list[Problem] = []
    rows: list[tuple[str, dict]] = []
    jsonl, csvf = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        text = jsonl.read_bytes().decode("utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                problems.append(
                    Problem("bad_metadata", f"metadata.jsonl:{n}", f"malformed line ({e})", "error")
                )
                continue
            rows.append((f"metadata.jsonl:{n}", row))
    else:
        text = csvf.read_bytes().decode("utf-8-sig", errors="replace")
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2):
            rows.append((f"metadata.csv:{n}", dict(row)))
    items: list[SourceItem] = []
    listed: set[str] = set()
    for where, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append(Problem("bad_metadata", where, "row has no 'file_name'", "error"))
            continue
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts:
            # a metadata file must not make lorakit read (or train on) files outside SRC
            problems.append(
                Problem(
                    "bad_metadata",
                    where,
                    f"file_name '{name}' points outside the data folder (absolute or '..'); "
                    "left out. Write file_name relative to the folder holding the metadata "
                    "file, and copy the image into that folder.",
                    "error",
                )
            )
            continue
        path = root / name
        if not path.is_file():
            problems.append(
                Problem("missing_file", name, f"listed in {where} but not found", "error")
            )
            continue
        rel = path.relative_to(root)
        caption, problem = _caption_from_row(row, data, where)
        items.append(
            SourceItem(
                name=rel.as_posix(),
                path=path,
                caption=caption,
                caption_problem=problem,
                repeats=_repeats_for(rel, data.repeats),
            )
        )
        listed.add(rel.as_posix())
    for f in _walk(root, problems):
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() in IMAGE_EXTS and rel not in listed:
            problems.append(
                Problem(
                    "unlisted_image",
                    rel,
                    "image not listed in the metadata file; left out",
                    "warning",
                )
            )
    return Listing("imagefolder", items, problems)


# -- datasets ------------------------------------------------------------------------------------


def _rows_of(ds, data, label: str) -> Listing:
    from datasets import Image as HFImage

    cols = ds.column_names
    if data.image_column not in cols:
        raise LorakitError(
            f"Dataset {label} has no image column '{data.image_column}' (columns: "
            f"{', '.join(cols)}). Set data.image_column to the right one."
        )
    cap_col = next((c for c in (data.caption_column, "text", "caption") if c in cols), None)
    if isinstance(ds.features[data.image_column], HFImage):
        ds = ds.cast_column(data.image_column, HFImage(decode=False))  # bytes, no decoding
    items: list[SourceItem] = []
    problems: list[Problem] = []
    has_repeats = "repeats" in cols
    for i, row in enumerate(ds):
        value = row[data.image_column]
        name = f"row {i}"
        raw: bytes | None = None
        if isinstance(value, dict):
            raw = value.get("bytes")
            if raw is None and value.get("path"):
                try:
                    raw = Path(value["path"]).read_bytes()
                except OSError as e:
                    problems.append(Problem("unreadable", name, f"image file: {e}", "error"))
                    continue
            if value.get("path"):
                name = f"row {i} ({Path(value['path']).name})"
        elif isinstance(value, (bytes, bytearray)):
            raw = bytes(value)
        if raw is None:
            problems.append(Problem("not_image", name, "row has no image bytes", "error"))
            continue
        caption = None if cap_col is None or row[cap_col] is None else str(row[cap_col])
        repeats = int(row["repeats"]) if has_repeats and row["repeats"] else data.repeats
        items.append(SourceItem(name=name, data=raw, caption=caption, repeats=repeats))
    return Listing("datasets", items, problems)


def _from_saved_dataset(root: Path, data) -> Listing:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise LorakitError(
            f"'{root}' looks like a saved `datasets` dataset but cannot be loaded ({e})."
        ) from None
    if isinstance(ds, DatasetDict):
        if data.dataset_split not in ds:
            raise LorakitError(
                f"Saved dataset '{root}' has no split '{data.dataset_split}' (splits: "
                f"{', '.join(ds)}). Set data.dataset_split."
            )
        ds = ds[data.dataset_split]
    return _rows_of(ds, data, f"'{root}'")


def _from_load_dataset(spec: str, data) -> Listing:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec, split=data.dataset_split)
    except Exception as e:
        raise LorakitError(
            f"load_dataset('{spec}', split='{data.dataset_split}') failed: {e}. Check the id or "
            "path, data.dataset_split, and that you are online for a hub dataset."
        ) from None
    return _rows_of(ds, data, f"hf:{spec}")
