"""`OUT/report.html`: one self-contained page that says which checkpoint to ship and why.

It holds the resolved config, the data summary, loss and learning-rate curves (inline SVG), the
held-out loss and palette distance of every checkpoint, every sample grid (inline base64 PNG)
and the recommended checkpoint. No scripts, stylesheets or images are fetched: it opens offline
and can be mailed as one file.

Recommendation rule: among checkpoints with an adapter file and a held-out loss, the lowest
held-out loss wins; losses equal to 4 significant digits (what the table shows) are ties, broken
by the lower palette distance, then by the later step.

The training loop fills a `History` as it goes:

    history = History()
    history.losses[step] = loss; history.lr[step] = lr
    history.add_checkpoint(step, path, heldout=…, palette=…)   # step 0: path="" (the base)
    history.add_grid(step, grid_path, palette=…)
    write_report(out_dir, config, data_summary, history)
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.fileio import atomic_write_text
from lorakit.palette import Palette


@dataclass
class CheckpointRecord:
    step: int
    path: str
    """Adapter file of this checkpoint; "" for the base model (step 0, nothing to ship)."""
    heldout: float | None = None
    palette: float | None = None


@dataclass
class GridRecord:
    step: int
    path: str
    palette: float | None = None


@dataclass
class History:
    losses: dict[int, float] = field(default_factory=dict)
    """Step → smoothed training loss."""
    lr: dict[int, float] = field(default_factory=dict)
    """Step → learning rate."""
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    grids: list[GridRecord] = field(default_factory=list)
    brand_palette: Palette | None = None

    def add_checkpoint(
        self,
        step: int,
        path: str | Path,
        heldout: float | None = None,
        palette: float | None = None,
    ) -> CheckpointRecord:
        rec = CheckpointRecord(step, str(path) if path else "", heldout, palette)
        self.checkpoints.append(rec)
        return rec

    def add_grid(self, step: int, path: str | Path, palette: float | None = None) -> GridRecord:
        rec = GridRecord(step, str(path), palette)
        self.grids.append(rec)
        return rec

    def palette_at(self, step: int) -> float | None:
        """A checkpoint's palette distance, or that of the grid rendered at its step."""
        for g in reversed(self.grids):
            if g.step == step and g.palette is not None:
                return g.palette
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Inverse of `to_dict` (for resume: keep `to_dict()` in the checkpoint's history)."""
        import numpy as np

        pal = d.get("brand_palette")
        palette = None
        if pal:
            palette = Palette(
                lab=np.array(pal["lab"], dtype=np.float64),
                weights=np.array(pal["weights"], dtype=np.float64),
                rgb=np.array(
                    [[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in pal["colors"]], np.uint8
                ),
            )
        return cls(
            losses={int(k): float(v) for k, v in d.get("losses", {}).items()},
            lr={int(k): float(v) for k, v in d.get("lr", {}).items()},
            checkpoints=[CheckpointRecord(**c) for c in d.get("checkpoints", [])],
            grids=[GridRecord(**g) for g in d.get("grids", [])],
            brand_palette=palette,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": {str(k): v for k, v in self.losses.items()},
            "lr": {str(k): v for k, v in self.lr.items()},
            "checkpoints": [vars(c) for c in self.checkpoints],
            "grids": [vars(g) for g in self.grids],
            "brand_palette": self.brand_palette.to_dict() if self.brand_palette else None,
        }


def _sig(x: float, digits: int = 4) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _palette(history: History, c: CheckpointRecord) -> float | None:
    return c.palette if c.palette is not None else history.palette_at(c.step)


def recommend(history: History) -> CheckpointRecord | None:
    """The checkpoint to ship (see the module docstring), or None when none was scored."""
    candidates = [
        c
        for c in history.checkpoints
        if c.path and c.heldout is not None and math.isfinite(c.heldout)
    ]
    if not candidates:
        return None

    def key(c: CheckpointRecord):
        pal = _palette(history, c)
        return (_sig(c.heldout), pal if pal is not None else math.inf, -c.step)  # type: ignore[arg-type]

    return min(candidates, key=key)


# ---------------------------------------------------------------------------------------------
# rendering


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}"


def svg_plot(points: dict[int, float], title: str, width: int = 560, height: int = 220) -> str:
    """A line plot of step → value as inline SVG (axes, min/max labels, no scripts)."""
    pts = sorted((int(k), float(v)) for k, v in points.items() if math.isfinite(float(v)))
    esc = html.escape(title)
    if not pts:
        return f'<p class="muted">{esc}: no data.</p>'
    left, right, top, bottom = 60, 10, 24, 30
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, y in pts[:200])
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc}">'
        f'<text x="{left}" y="15" font-size="13" font-weight="bold">{esc}</text>'
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#888"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>'
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{left}" y="{height - 8}" font-size="10">step {x0}</text>'
        f'<text x="{left + pw}" y="{height - 8}" font-size="10" text-anchor="end">step {x1}</text>'
        f'<polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" points="{line}"/>'
        f'<g fill="#2b6cb0">{dots}</g></svg>'
    )


def _img_tag(path: Path, alt: str) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f'<p class="muted">{html.escape(alt)}: file {html.escape(str(path))} is missing.</p>'
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _rel(path: str, out_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return path


def _table(rows: list[list[str]], head: list[str]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1a202c;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}tr.best{background:#e6ffed}.muted{color:#718096}pre{background:#f7fafc;
padding:8px;font-size:12px;overflow:auto}.rec{font-size:16px;padding:10px;background:#e6ffed;
border:1px solid #9ae6b4}img{max-width:100%;border:1px solid #ddd}.sw{display:inline-block;
width:48px;height:32px;margin-right:4px;border:1px solid #999;vertical-align:middle}
figure{margin:12px 0}figcaption{font-size:13px;color:#4a5568}
"""


def render_html(out_dir: Path, config: Any, data_summary: dict[str, Any], history: History) -> str:
    out_dir = Path(out_dir)
    best = recommend(history)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lorakit report: {e(out_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>lorakit run report: {e(str(out_dir))}</h1>",
    ]
    if best is not None:
        pal = _palette(history, best)
        parts.append(
            f'<p class="rec" id="recommended">Recommended checkpoint: '
            f"<strong>{e(_rel(best.path, out_dir))}</strong> (step {best.step}; held-out loss "
            f"{_fmt(best.heldout)}; palette distance {_fmt(pal, 3)} ΔE). Lowest held-out loss, "
            "ties broken by palette distance.</p>"
        )
    else:
        parts.append(
            '<p class="rec" id="recommended">No checkpoint was scored (eval.images = 0?), so '
            "none is recommended.</p>"
        )

    parts.append("<h2>Checkpoints</h2>")
    rows = []
    for c in sorted(history.checkpoints, key=lambda c: c.step):
        mark = "★ " if best is not None and c is best else ""
        unsaved = "base model" if c.step == 0 else "not saved"
        name = e(_rel(c.path, out_dir)) if c.path else f'<span class="muted">{unsaved}</span>'
        rows.append([str(c.step), mark + name, _fmt(c.heldout), _fmt(_palette(history, c), 3)])
    parts.append(
        _table(rows, ["step", "adapter", "held-out loss", "palette ΔE"])
        if rows
        else '<p class="muted">No checkpoints.</p>'
    )

    parts.append("<h2>Curves</h2>")
    heldout = {c.step: c.heldout for c in history.checkpoints if c.heldout is not None}
    parts.append(svg_plot(history.losses, "training loss (smoothed)"))
    parts.append(svg_plot(history.lr, "learning rate"))
    if heldout:
        parts.append(svg_plot(heldout, "held-out loss"))

    parts.append("<h2>Brand palette</h2>")
    if history.brand_palette is not None:
        sw = "".join(
            f'<span class="sw" style="background:{h}" title="{h} {w:.0%}"></span>'
            for h, w in zip(history.brand_palette.hex(), history.brand_palette.weights, strict=True)
        )
        parts.append(
            f"<p>{sw}</p><p class='muted'>k-means in CIELAB over the training images; palette "
            "distance = symmetric weighted nearest-colour ΔE (CIE76) between a grid's colours "
            "and these.</p>"
        )
    else:
        parts.append('<p class="muted">Not extracted.</p>')

    parts.append("<h2>Sample grids</h2>")
    for g in sorted(history.grids, key=lambda g: g.step):
        cap = f"step {g.step}"
        if g.palette is not None:
            cap += f" · palette distance {g.palette:.3g} ΔE"
        parts.append(
            f'<figure class="grid" data-step="{g.step}">{_img_tag(Path(g.path), cap)}'
            f"<figcaption>{e(cap)} · {e(_rel(g.path, out_dir))}</figcaption></figure>"
        )
    if not history.grids:
        parts.append('<p class="muted">No sample grids (sample.every = 0).</p>')

    parts.append("<h2>Data</h2>")
    parts.append(
        _table([[e(str(k)), e(_value(v))] for k, v in data_summary.items()], ["item", "value"])
    )
    parts.append("<h2>Resolved config</h2>")
    text = config.to_toml() if hasattr(config, "to_toml") else json.dumps(config, indent=2)
    parts.append(f"<pre>{e(text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def write_report(
    out_dir: str | Path, config: Any, data_summary: dict[str, Any], history: History
) -> Path:
    """Write `OUT/report.html` atomically and return its path."""
    out_dir = Path(out_dir)
    return atomic_write_text(
        out_dir / "report.html", render_html(out_dir, config, data_summary, history)
    )
