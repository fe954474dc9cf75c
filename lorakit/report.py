"""`OUT/report.html`: one self-contained page that says which checkpoint to ship and why.

It holds the resolved config, the data summary, loss and learning-rate curves (inline SVG), the
held-out loss and brand-fidelity numbers of every checkpoint, every sample grid (inline base64
PNG) and the recommended checkpoint, with the reason in words. No scripts, stylesheets or images
are fetched: it opens offline and can be mailed as one file.

Brand fidelity, per sample grid against the training images (a checkpoint takes the numbers of
the grid rendered at its step; lower is closer everywhere):

- `palette`: palette distance in CIEDE2000 ΔE00 (`lorakit.palette.palette_distance`).
- `lab_emd`: earth mover's distance between the Lab histograms, in ΔE76 (`palette.lab_emd`).
- `texture`: RMS z-score of random-conv-net Gram statistics (`lorakit.texture`).
- `palette_cie76`: only in history written before ΔE00: those runs stored the palette distance in
  CIE76 ΔE under `palette`. `History.from_dict` moves such values here (a dict without
  `"palette_delta_e": "CIEDE2000"` is such a history) so the two scales are never compared; the
  report shows them in a column of their own, and they take no part in the recommendation.

Recommendation rule: among checkpoints with an adapter file and a held-out loss, the lowest
held-out loss wins; losses equal to 4 significant digits (what the table shows) are ties, broken
by the lower palette ΔE00, then the lower Lab EMD, then the lower texture (each compared at the 3
significant digits the table shows; a missing number loses), then by the later step. With
`eval.pick = "fidelity"` (the style recipe) the fidelity numbers come first, in that order, and
the held-out loss breaks their ties. `explain` says which of these decided, against the
runner-up.

The training loop fills a `History` as it goes:

    history = History()
    history.losses[step] = loss; history.lr[step] = lr
    history.add_checkpoint(step, path, heldout=…)   # step 0: path="" (the base)
    history.add_grid(step, grid_path, palette=…, lab_emd=…, texture=…)
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
    """Palette distance, CIEDE2000 ΔE00; None: take the grid's at this step (`metric_at`)."""
    lab_emd: float | None = None
    """Lab-histogram EMD, ΔE76; None: the grid's at this step."""
    texture: float | None = None
    """Texture RMS z-score; None: the grid's at this step."""
    palette_cie76: float | None = None
    """Palette distance in CIE76 ΔE from a history written before ΔE00 (module docstring)."""
    label: str = ""
    """What the row is when it is not a checkpoint of the run (e.g. a post-hoc EMA of several,
    `lorakit ema`); its step is the last step it averages."""
    bleed: float | None = None
    """Held-out bleed: mean squared difference of adapter and base predictions on the held-out
    captions without the trigger (`lorakit.preserve.heldout_bleed`); None: not scored."""


@dataclass
class GridRecord:
    step: int
    path: str
    palette: float | None = None
    """Palette distance of the grid's images to the brand palette, CIEDE2000 ΔE00."""
    lab_emd: float | None = None
    """EMD between the grid's and the training images' Lab histograms, ΔE76."""
    texture: float | None = None
    """Mean texture RMS z-score of the grid's images against the training images."""
    palette_cie76: float | None = None
    """Palette distance in CIE76 ΔE from a history written before ΔE00 (module docstring)."""


METRICS = ("palette", "lab_emd", "texture")
"""The brand-fidelity fields of a record, in the order they break held-out-loss ties."""
PALETTE_DELTA_E = "CIEDE2000"
"""Written to `History.to_dict()["palette_delta_e"]`: what the `palette` numbers are in."""


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
        bleed: float | None = None,
    ) -> CheckpointRecord:
        rec = CheckpointRecord(step, str(path) if path else "", heldout, palette, bleed=bleed)
        self.checkpoints.append(rec)
        return rec

    def add_grid(
        self,
        step: int,
        path: str | Path,
        palette: float | None = None,
        lab_emd: float | None = None,
        texture: float | None = None,
    ) -> GridRecord:
        rec = GridRecord(step, str(path), palette, lab_emd, texture)
        self.grids.append(rec)
        return rec

    def metric_at(self, step: int, name: str) -> float | None:
        """The number `name` (a `METRICS` field or "palette_cie76") of the latest grid rendered
        at `step` that has one."""
        for g in reversed(self.grids):
            value = getattr(g, name)
            if g.step == step and value is not None:
                return value
        return None

    def palette_at(self, step: int) -> float | None:
        """The palette distance (ΔE00) of the grid rendered at `step`."""
        return self.metric_at(step, "palette")

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
        checkpoints = [CheckpointRecord(**c) for c in d.get("checkpoints", [])]
        grids = [GridRecord(**g) for g in d.get("grids", [])]
        if d.get("palette_delta_e") != PALETTE_DELTA_E:  # older history: `palette` is CIE76
            for rec in (*checkpoints, *grids):
                if rec.palette is not None:
                    rec.palette_cie76, rec.palette = rec.palette, None
        return cls(
            losses={int(k): float(v) for k, v in d.get("losses", {}).items()},
            lr={int(k): float(v) for k, v in d.get("lr", {}).items()},
            checkpoints=checkpoints,
            grids=grids,
            brand_palette=palette,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "losses": {str(k): v for k, v in self.losses.items()},
            "lr": {str(k): v for k, v in self.lr.items()},
            "checkpoints": [vars(c) for c in self.checkpoints],
            "grids": [vars(g) for g in self.grids],
            "brand_palette": self.brand_palette.to_dict() if self.brand_palette else None,
            "palette_delta_e": PALETTE_DELTA_E,
        }


def _sig(x: float, digits: int = 4) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _metric(history: History, c: CheckpointRecord, name: str) -> float | None:
    """A checkpoint's number `name`: its own, else that of the grid rendered at its step."""
    own = getattr(c, name)
    if c.label:  # not the weights the grid at its step was rendered with
        return own
    return own if own is not None else history.metric_at(c.step, name)


_COLUMNS = {"palette": "palette ΔE00", "lab_emd": "Lab EMD", "texture": "texture"}


def _candidates(history: History) -> list[CheckpointRecord]:
    return [
        c
        for c in history.checkpoints
        if c.path and c.heldout is not None and math.isfinite(c.heldout)
    ]


def _key(history: History, c: CheckpointRecord, pick: str = "heldout") -> tuple:
    """Held-out loss at 4 significant digits, the fidelity numbers at 3 (missing: +inf), then
    the later step: the recommendation rule of the module docstring as a sort key. `pick =
    "fidelity"` (`eval.pick`) puts the fidelity numbers first and the held-out loss after them."""
    values = [_metric(history, c, m) for m in METRICS]
    fidelity = [_sig(v, 3) if v is not None and math.isfinite(v) else math.inf for v in values]
    if pick == "fidelity":
        return (*fidelity, _sig(c.heldout), -c.step)  # type: ignore[arg-type]
    return (_sig(c.heldout), *fidelity, -c.step)  # type: ignore[arg-type]


def recommend(history: History, pick: str = "heldout") -> CheckpointRecord | None:
    """The checkpoint to ship (see the module docstring; `pick`: `eval.pick`), or None when none
    was scored."""
    candidates = _candidates(history)
    return min(candidates, key=lambda c: _key(history, c, pick)) if candidates else None


def _explain_fidelity(history: History, best: CheckpointRecord, other: CheckpointRecord) -> str:
    mine, theirs = _key(history, best, "fidelity"), _key(history, other, "fidelity")
    said = []
    for i, name in enumerate(METRICS):
        label = _COLUMNS[name]
        a, b = _metric(history, best, name), _metric(history, other, name)
        if mine[i] != theirs[i]:
            why = (
                f"step {other.step}, the runner-up, has none"
                if b is None
                else f"{_fmt(a, 3)} against {_fmt(b, 3)} (step {other.step}, the runner-up)"
            )
            lead = "eval.pick = 'fidelity' (the style recipe): " if not said else ""
            return (
                "; ".join([*said, f"{lead}{label} decided: {why}"])
                + ". Fidelity comes first here because a style LoRA is judged by how close its "
                "images' colours and textures are to the brand's; held-out loss breaks ties."
            )
        said.append(f"{label} ties ({_fmt(a, 3)})")
    if mine[len(METRICS)] != theirs[len(METRICS)]:
        return "; ".join(said) + (
            f"; held-out loss decided: {_fmt(best.heldout)} against {_fmt(other.heldout)}."
        )
    return "; ".join(said) + f"; every column ties with step {other.step}: the later step wins."


def explain(history: History, best: CheckpointRecord, pick: str = "heldout") -> str:
    """Why `best` (what `recommend` returned) wins, in words: the column that set it apart from
    the runner-up, with both values."""
    ranked = sorted(_candidates(history), key=lambda c: _key(history, c, pick))
    if len(ranked) < 2:
        return "It is the only checkpoint with an adapter file and a held-out loss."
    other = ranked[1] if ranked[0] is best else ranked[0]
    if pick == "fidelity":
        return _explain_fidelity(history, best, other)
    mine, theirs = _key(history, best), _key(history, other)
    vs = f"step {other.step}, the runner-up"
    if mine[0] != theirs[0]:
        return (
            f"Held-out loss decided: {_fmt(best.heldout)} against {_fmt(other.heldout)} "
            f"({vs}). It is the first column the rule looks at because it measures, with fixed "
            "noise, how well the adapter predicts brand images; the fidelity columns only break "
            "ties."
        )
    said = [
        f"Its held-out loss ties with that of step {other.step} (the runner-up) at 4 significant "
        f"digits ({_fmt(best.heldout)})"
    ]
    for i, name in enumerate(METRICS, start=1):
        label = _COLUMNS[name]
        if mine[i] != theirs[i]:
            a, b = _metric(history, best, name), _metric(history, other, name)
            if b is None:
                return "; ".join(said) + f"; {label} decided: step {other.step} has none."
            return "; ".join(said) + f"; {label} decided: {_fmt(a, 3)} against {_fmt(b, 3)}."
        value = _metric(history, best, name)
        said.append(
            f"{label} ties too ({_fmt(value, 3)})"
            if value is not None
            else f"neither has a {label}"
        )
    return "; ".join(said) + "; so the later step wins (it trained longer)."


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


_COLUMN_HELP = (
    "<ul class='help'>"
    "<li><b>held-out loss</b>: the training loss on the fixed validation images (eval.images) "
    "with noise and timesteps fixed by eval.seed, so it compares across checkpoints: how well "
    "the adapter predicts brand images. It decides the recommendation.</li>"
    "<li><b>palette ΔE00</b>: how far the colours of the checkpoint's sample grid are from the "
    "brand palette below, in CIEDE2000 units (0: the brand's colours exactly; about 1 is just "
    "noticeable; above 10 reads as other colours). It rises when off-brand colours appear and "
    "when brand colours go missing.</li>"
    "<li><b>Lab EMD</b>: earth mover's distance between the Lab colour histograms of the grid "
    "and of the training images, in ΔE76: the average distance a pixel's colour would have to "
    "move to match the brand's colour mix. Unlike the palette distance it sees proportions "
    "(a cream-led brand rendered mostly in teal uses brand colours but scores high).</li>"
    "<li><b>texture</b>: how far the grid's style statistics (Gram matrices of a fixed random "
    "conv net on the Lab image: edges, stroke widths, patterns and which colour sits next to "
    "which) are from the training images', in units of the training images' own spread: about "
    "0.5 or less looks like the training set; several times that, another style.</li>"
    "<li>All three fidelity numbers are lower-is-closer, measured on the grid rendered at the "
    "checkpoint's step (– where there was none), and only break held-out-loss ties (equal to 4 "
    "significant digits), in that order, each at the 3 digits shown; then the later step "
    "wins.</li>"
)
_BLEED_HELP = (
    "<li><b>bleed</b>: how much the adapter changes the model's prediction on the validation "
    "images' captions with the trigger word removed (mean squared difference to the base "
    "model, at the held-out loss's noise and timesteps; 0: prompts without the trigger render "
    "as without the LoRA). Rising bleed means the brand leaks into every prompt; "
    "train.preserve_weight holds it down. It does not enter the recommendation.</li>"
)
_LEGACY_HELP = (
    "<li><b>palette ΔE76 (older run)</b>: palette distances recorded before lorakit used "
    "CIEDE2000, in CIE76 ΔE (Euclidean Lab). Not comparable with ΔE00 and not used to "
    "recommend.</li>"
)


def _pick(config: Any) -> str:
    """`eval.pick` of a Config or of its dict form (report.json); "heldout" when absent."""
    section = config.get("eval", {}) if isinstance(config, dict) else getattr(config, "eval", None)
    if isinstance(section, dict):
        return str(section.get("pick", "heldout"))
    return str(getattr(section, "pick", "heldout"))


def render_html(out_dir: Path, config: Any, data_summary: dict[str, Any], history: History) -> str:
    out_dir = Path(out_dir)
    pick = _pick(config)
    best = recommend(history, pick)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lorakit report: {e(out_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>lorakit run report: {e(str(out_dir))}</h1>",
    ]
    if best is not None:
        numbers = "; ".join(f"{_COLUMNS[m]} {_fmt(_metric(history, best, m), 3)}" for m in METRICS)
        parts.append(
            f'<p class="rec" id="recommended">Recommended checkpoint: '
            f"<strong>{e(_rel(best.path, out_dir))}</strong> (step {best.step}"
            f"{'; ' + e(best.label) if best.label else ''}; held-out loss "
            f"{_fmt(best.heldout)}; {numbers}). <span id='why'>{e(explain(history, best, pick))}"
            "</span></p>"
        )
    else:
        parts.append(
            '<p class="rec" id="recommended">No checkpoint was scored (eval.images = 0?), so '
            "none is recommended.</p>"
        )

    parts.append("<h2>Checkpoints</h2>")
    legacy = any(r.palette_cie76 is not None for r in (*history.checkpoints, *history.grids))
    bleed = any(c.bleed is not None for c in history.checkpoints)
    rows = []
    for c in sorted(history.checkpoints, key=lambda c: c.step):
        mark = "★ " if best is not None and c is best else ""
        unsaved = "base model" if c.step == 0 else "not saved"
        name = e(_rel(c.path, out_dir)) if c.path else f'<span class="muted">{unsaved}</span>'
        name += f' <span class="muted">({e(c.label)})</span>' if c.label else ""
        row = [str(c.step), mark + name, _fmt(c.heldout)] + ([_fmt(c.bleed, 3)] if bleed else [])
        row += [_fmt(_metric(history, c, m), 3) for m in METRICS]
        rows.append(row + ([_fmt(_metric(history, c, "palette_cie76"), 3)] if legacy else []))
    head = ["step", "adapter", "held-out loss", *(["bleed"] if bleed else [])]
    head += [_COLUMNS[m] for m in METRICS]
    parts.append(
        _table(rows, head + (["palette ΔE76 (older run)"] if legacy else []))
        if rows
        else '<p class="muted">No checkpoints.</p>'
    )
    parts.append(
        _COLUMN_HELP + (_BLEED_HELP if bleed else "") + (_LEGACY_HELP if legacy else "") + "</ul>"
    )

    parts.append("<h2>Curves</h2>")
    heldout = {
        c.step: c.heldout for c in history.checkpoints if c.heldout is not None and not c.label
    }
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
            "ΔE00 = symmetric weighted nearest-colour CIEDE2000 difference between a grid's "
            "colours and these.</p>"
        )
    else:
        parts.append('<p class="muted">Not extracted.</p>')

    parts.append("<h2>Sample grids</h2>")
    for g in sorted(history.grids, key=lambda g: g.step):
        cap = f"step {g.step}"
        for m in METRICS:
            if getattr(g, m) is not None:
                cap += f" · {_COLUMNS[m]} {getattr(g, m):.3g}"
        if g.palette_cie76 is not None:
            cap += f" · palette ΔE76 {g.palette_cie76:.3g} (older run)"
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
