"""EMA of the adapter weights: during training (`train.ema`) and post hoc (`lorakit ema RUN`).

During training (`AdapterEMA`)
------------------------------
One fp32 shadow tensor per trainable LoRA tensor (the same list as the optimizer's: denoiser and
text-encoder LoRA, DoRA magnitudes, LoHa/LoKr factors). It starts as the initial LoRA weights
(step 0) and after optimizer step t (t = 1, 2, …) becomes

    shadow ← d_t · shadow + (1 − d_t) · weights,     d_t = min(train.ema_decay, t / (t + 9))

The warm-up t / (t + 9) is diffusers' `EMAModel` default (`(1 + s) / (10 + s)` with s = t − 1,
`use_ema_warmup = False`, `update_after_step = 0`): the first update keeps 10 % of the random
start, d_t reaches 0.99 at t = 891 and 0.999 at t = 8991, so a short run averages over its own
recent past instead of staying near the initial weights. d_t depends only on t, the optimizer
step, so a resumed run continues the same sequence: the checkpoint stores the shadows (in
`state.safetensors`, under the checksums of the complete-or-invisible format) and the step.

`train.ema_device`: `device` keeps the shadows beside the weights (on a GPU one more copy of
the LoRA, MBs); `cpu` keeps them in host memory (the weights are copied to the host after every
step). Multi-process: every rank keeps the EMA of the weights it holds and updates it identically
after each step — whole tensors under DDP and DeepSpeed ZeRO-2 (replicated weights: every rank
computes the same shadows), its own shard under FSDP2 (no rank holds a whole copy); saving a
checkpoint gathers whole tensors (a collective under FSDP, as for the weights themselves).

`applied()` puts the EMA weights into the model for a preview, a held-out score or an export and
puts the raw weights back bit for bit.

Post hoc (`posthoc_weights`, `average`, `run_posthoc`)
-------------------------------------------------------
An EMA over the adapters a run saved in its checkpoints (steps s_1 < … < s_n): result =
Σ w_i · θ_i, factor by factor (lora_down / lora_up, DoRA magnitudes, LyCORIS tensors, as the
training EMA and musubi-tuner average them; rank and file size stay the same). Each checkpoint
stands for the steps since the previous one, so the weights come from one sequential update per
checkpoint, θ̂ ← β_i θ̂ + (1 − β_i) θ_i with β_1 = 0 and

    decay d (per training step):   β_i = d ** (s_i − s_{i−1})
    power profile (σ_rel):         β_i = (s_{i−1} / s_i) ** (γ + 1),  γ from σ_rel (Karras et
                                   al. 2024, EDM2, Algorithm 2)

With a checkpoint at every step, the first is the per-step EMA (started at step 1) and the
second is the per-step power-function EMA, β_t = (1 − 1/t)^(γ+1): the update of musubi-tuner's
`lora_post_hoc_ema.py --sigma_rel`, which counts t = 1, 2, … from its second file (its first
file gets weight 0) and ignores step gaps, where lorakit counts t in training steps.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError

SIGMA_REL_MAX = 12**-0.5
"""σ_rel < 1/√12 ≈ 0.2887 (γ > 0): larger widths have no power-function profile."""


# ---------------------------------------------------------------------------------------------
# during training


def warmup_decay(decay: float, t: int) -> float:
    """The decay of the update after optimizer step `t` (1-based): min(decay, t / (t + 9))."""
    return min(decay, t / (t + 9.0))


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP2 DTensor's local shard (sharing its memory, so a
    copy into it changes the parameter), or `p` itself."""
    return p.to_local() if hasattr(p, "device_mesh") else p


class AdapterEMA:
    """EMA shadows of `params` (the trainable LoRA tensors, FSDP2 shards included); see the
    module docstring for the update rule."""

    def __init__(self, params: list[torch.Tensor], decay: float, device: str = "device"):
        if not 0.0 < decay < 1.0:
            raise LorakitError(f"Config key 'train.ema_decay' must be in (0, 1), got {decay}.")
        self.params = params
        self.decay = decay
        self.device = device
        self.updates = 0
        """Optimizer steps averaged in so far (= the run's step)."""
        with torch.no_grad():
            self.shadow = [self._place(_local(p).detach(), p) for p in params]

    def _place(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A private fp32 copy of `t` (this rank's part of `p`) where the shadows live."""
        target = "cpu" if self.device == "cpu" else _local(p).device
        return t.to(target, torch.float32, copy=True)

    @torch.no_grad()
    def update(self) -> None:
        """Average in the weights after one optimizer step."""
        self.updates += 1
        d = warmup_decay(self.decay, self.updates)
        now = [_local(p).detach() for p in self.params]
        if self.device == "cpu":
            now = [t.to("cpu", torch.float32) for t in now]
        else:
            now = [t.float() for t in now]
        # lerp: shadow + (1 - d)(now - shadow), one kernel for all tensors of a device
        torch._foreach_lerp_(self.shadow, now, 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        """The model runs on the EMA weights inside the block; the raw weights are put back
        exactly (copied aside, not recomputed) on leaving, exceptions included."""
        with torch.no_grad():
            raw = [_local(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow, strict=True):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw, strict=True):
                    _local(p).copy_(r)

    def state_dict(self) -> dict[str, Any]:
        """Whole fp32 shadows (CPU) and the update count. Under FSDP2 a collective: every rank
        must call it, as `capture` does for the weights."""
        from lorakit.distributed import full_tensor

        shadows = []
        for p, s in zip(self.params, self.shadow, strict=True):
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(
                    s.to(_local(p).device), p.device_mesh, p.placements, run_check=False,
                    shape=p.shape, stride=p.stride(),
                )  # fmt: skip
            shadows.append(full_tensor(s).detach().to("cpu", torch.float32))
        return {"decay": self.decay, "updates": self.updates, "shadow": shadows}

    def load_state_dict(self, state: dict[str, Any] | None, where: Path | str = "") -> None:
        """Restore the shadows a checkpoint saved (whole tensors; re-sharded like each param)."""
        from lorakit.distributed import shard_like

        shadows = (state or {}).get("shadow")
        if shadows is None:
            raise LorakitError(
                f"Checkpoint '{where}' holds no EMA of the adapter weights, but train.ema = true. "
                "Resume it with train.ema = false (its own config.toml), or start a new run."
            )
        if len(shadows) != len(self.params) or any(
            tuple(s.shape) != tuple(p.shape) for s, p in zip(shadows, self.params, strict=True)
        ):
            raise LorakitError(
                f"The EMA in checkpoint '{where}' does not match this config's LoRA (rank or "
                "target modules differ). Resume with the run's own config.toml."
            )
        with torch.no_grad():
            self.shadow = [
                self._place(_local(shard_like(s.float(), p)), p)
                for s, p in zip(shadows, self.params, strict=True)
            ]
        self.updates = int(state["updates"])


# ---------------------------------------------------------------------------------------------
# post hoc


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the power-function EMA profile of relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0 (EDM2, Algorithm 2)."""
    import numpy as np

    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise LorakitError(
            f"--sigma-rel {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}): the power-function "
            "profile exists only there. Typical values are 0.05 to 0.2 (EDM2 uses 0.05–0.1); "
            "larger values average over more of the run."
        )
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0))


def posthoc_weights(
    steps: list[int], decay: float | None = None, sigma_rel: float | None = None
) -> list[float]:
    """Weight of each checkpoint (steps ascending, all > 0) in the post-hoc EMA; they sum to 1.
    Exactly one of `decay` (per training step) and `sigma_rel` (power profile)."""
    if (decay is None) == (sigma_rel is None):
        raise LorakitError("Give exactly one of --decay and --sigma-rel.")
    if any(b <= a for a, b in pairwise(steps)) or not steps or steps[0] <= 0:
        raise ValueError(f"checkpoint steps must be positive and ascending, got {steps}")
    if decay is not None:
        if not 0.0 < decay < 1.0:
            raise LorakitError(
                f"--decay {decay} must be in (0, 1): the weight the average keeps per training "
                "step (0.99 averages over about 100 steps, 0.999 over about 1000)."
            )
        betas = [0.0] + [decay ** (b - a) for a, b in pairwise(steps)]
    else:
        g1 = sigma_rel_to_gamma(sigma_rel) + 1.0  # type: ignore[arg-type]
        betas = [0.0] + [(a / b) ** g1 for a, b in pairwise(steps)]
    weights, keep = [0.0] * len(steps), 1.0
    for i in range(len(steps) - 1, -1, -1):  # w_i = (1 - β_i) Π_{j>i} β_j
        weights[i] = (1.0 - betas[i]) * keep
        keep *= betas[i]
    return weights


def average(adapters: list, weights: list[float], where: list[Path] | None = None):
    """Σ w_i · adapter_i, tensor by tensor (fp32). Every adapter must have the same modules,
    kinds, shapes and alphas (checkpoints of one run); `where` names the files in the error."""
    from lorakit.lora import Adapter, LoraWeights, LycorisWeights

    names = [str(p) for p in where] if where else [f"adapter {i}" for i in range(len(adapters))]
    first = adapters[0]
    for a, name in zip(adapters[1:], names[1:], strict=True):
        problem = _mismatch(first, a)
        if problem:
            raise LorakitError(
                f"'{name}' cannot be averaged with '{names[0]}': {problem}. Post-hoc EMA "
                "averages the checkpoints of one run; a resumed run with another rank or "
                "targets starts a new series (average its checkpoints only)."
            )

    def mix(get) -> torch.Tensor:
        total = None
        for a, w in zip(adapters, weights, strict=True):
            t = get(a).float() * w
            total = t if total is None else total + t
        return total

    modules: dict = {}
    for key, w0 in first.modules.items():
        if isinstance(w0, LoraWeights):
            modules[key] = LoraWeights(
                down=mix(lambda a, key=key: a.modules[key].down),
                up=mix(lambda a, key=key: a.modules[key].up),
                alpha=w0.alpha,
                magnitude=None
                if w0.magnitude is None
                else mix(lambda a, key=key: a.modules[key].magnitude),
            )
        else:
            modules[key] = LycorisWeights(
                w0.kind,
                {n: mix(lambda a, key=key, n=n: a.modules[key].tensors[n]) for n in w0.tensors},
                w0.alpha,
                w0.rank,
            )
    return Adapter(first.family, modules, dict(adapters[-1].metadata))


def _mismatch(a, b) -> str:
    from lorakit.lora import LoraWeights

    if a.family != b.family:
        return f"family {b.family} vs {a.family}"
    if set(a.modules) != set(b.modules):
        return f"{len(set(a.modules) ^ set(b.modules))} module(s) differ"
    for key, wa in a.modules.items():
        wb = b.modules[key]
        if type(wa) is not type(wb) or wa.alpha != wb.alpha or wa.rank != wb.rank:
            return f"module {'.'.join(key)} has another kind, rank or alpha"
        if isinstance(wa, LoraWeights):
            shapes = [(wa.down.shape, wb.down.shape), (wa.up.shape, wb.up.shape)]
            if (wa.magnitude is None) != (wb.magnitude is None):
                return f"module {'.'.join(key)} is DoRA in one file only"
        else:
            if set(wa.tensors) != set(wb.tensors):
                return f"module {'.'.join(key)} has other tensors"
            shapes = [(wa.tensors[n].shape, wb.tensors[n].shape) for n in wa.tensors]
        if any(x != y for x, y in shapes):
            return f"module {'.'.join(key)} has other shapes"
    return ""


@dataclass
class PosthocResult:
    tag: str
    """`decay-0.99` / `sigma_rel-0.1`: the folder name under OUT/ema/."""
    files: dict[str, Path]
    """Format → written adapter file."""
    steps: list[int]
    weights: list[float]
    heldout: float | None = None
    not_scored: str = ""
    """Why no held-out score was computed ('' when scored)."""
    report: Path | None = None
    notes: list[str] = field(default_factory=list)
    """Checkpoints passed over (damaged) and other remarks for the output."""


def _tag(decay: float | None, sigma_rel: float | None) -> str:
    return f"decay-{decay:g}" if decay is not None else f"sigma_rel-{sigma_rel:g}"


def checkpoint_adapter(folder: Path, name: str, formats: list[str]) -> Path | None:
    """The adapter post-hoc EMA reads from a checkpoint: the raw weights (`raw/`, written when
    the run kept an in-training EMA) where present, else the checkpoint's adapter."""
    from lorakit.export import find_adapter

    return find_adapter(folder / RAW, name, formats) or find_adapter(folder, name, formats)


RAW = "raw"
"""Sub-folder (of the run folder and of each checkpoint) holding the raw adapter when
`train.ema` made the EMA adapter the main one."""
POSTHOC = "ema"
"""Sub-folder of the run folder holding the post-hoc EMA results, one folder per setting."""
REPORT_STATE = "report.json"
"""The report's data (history, data summary, data folder), written beside report.html at the end
of training so that later commands (`lorakit ema`) can add rows and render it again."""


def run_posthoc(
    run_dir: Path,
    *,
    decay: float | None = None,
    sigma_rel: float | None = None,
    data: Path | None = None,
    overwrite: bool = False,
) -> PosthocResult:
    """Post-hoc EMA over the complete, verified checkpoints of the run in `run_dir`: the new
    adapter in the run's export formats under `OUT/ema/<tag>/`, scored with the run's held-out
    scoring when the training data is available (`data`, else the folder the run recorded),
    and added to the report. Every refusal happens before anything is written."""
    from lorakit import checkpoint as ckpt
    from lorakit import config as cfg
    from lorakit.export import EXPORTERS, read_adapter, write_adapter
    from lorakit.resume import run_lock

    toml = run_dir / "config.toml"
    if not toml.is_file():
        raise LorakitError(
            f"'{run_dir}' is not a lorakit run folder (it has no config.toml). Pass the folder "
            "given to `lorakit train --out`."
        )
    c = cfg.build(cfg.check_layer(cfg.read_toml(toml, "Run config"), str(toml)))
    c.train.out = str(run_dir)  # the run's own cache, wherever the folder is now
    posthoc_weights([1, 2], decay, sigma_rel)  # refuse a bad --decay / --sigma-rel first
    tag = _tag(decay, sigma_rel)
    with run_lock(run_dir, None):
        result = PosthocResult(tag, {}, [], [])
        found = []
        for step, folder in ckpt.complete_checkpoints(run_dir):
            problem = ckpt.damage(folder)
            path = checkpoint_adapter(folder, c.export.name, list(c.export.formats))
            if problem or path is None:
                why = problem or "it holds no adapter file"
                result.notes.append(f"checkpoint '{folder.name}' passed over: {why}")
                continue
            found.append((step, path))
        if len(found) < 2:
            passed = f" ({'; '.join(result.notes)})" if result.notes else ""
            raise LorakitError(
                f"'{run_dir}' has {len(found)} usable checkpoint(s){passed}; post-hoc EMA averages "
                "the adapters of 2 or more. Train with train.save_every = N (a checkpoint every "
                "N steps) and train.keep_last = 0 (keep them all; the default keeps the newest "
                "3), then run `lorakit ema` again."
            )
        result.steps = [s for s, _ in found]
        result.weights = posthoc_weights(result.steps, decay, sigma_rel)
        dest = run_dir / POSTHOC / tag
        if dest.exists() and not overwrite:
            raise LorakitError(
                f"'{dest}' already holds a post-hoc EMA with these settings. Pass --overwrite to "
                "replace it, or choose another --decay / --sigma-rel."
            )
        adapters = [read_adapter(p)[0] for _, p in found]
        mixed = average(adapters, result.weights, [p for _, p in found])
        mixed.metadata["lorakit.posthoc_ema"] = json.dumps(
            {
                "decay": decay,
                "sigma_rel": sigma_rel,
                "steps": result.steps,
                "weights": [round(w, 8) for w in result.weights],
            }
        )
        scorer = _Scorer.build(c, run_dir, data)
        result.not_scored = scorer.problem
        # Written into a hidden sibling folder, then renamed: the tag folder appears complete
        # or not at all, and a replaced one is removed only once the new one is in place.
        tmp = dest.with_name(f".{tag}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for fmt in c.export.formats:
                path = EXPORTERS[fmt].default_path(tmp, c.export.name)
                write_adapter(mixed, fmt, path, naming=c.export.kohya_names, dtype=c.export.dtype)
            if dest.exists():
                old = dest.with_name(f".{tag}.old")
                shutil.rmtree(old, ignore_errors=True)
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        result.files = {
            fmt: EXPORTERS[fmt].default_path(dest, c.export.name) for fmt in c.export.formats
        }
        if scorer.ready:
            result.heldout = scorer.score(read_adapter(result.files[c.export.formats[0]])[0])
        result.report = _add_to_report(run_dir, c, result, decay, sigma_rel)
    return result


def _add_to_report(run_dir: Path, c, result: PosthocResult, decay, sigma_rel) -> Path | None:
    """Add (or replace) the post-hoc row in report.json and render report.html again; None when
    the run has no report.json (training not finished, or a run older than post-hoc EMA)."""
    from lorakit.fileio import atomic_write_text
    from lorakit.report import History, write_report

    state_path = run_dir / REPORT_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        history = History.from_dict(state["history"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = str(result.files[c.export.formats[0]])
    what = f"decay {decay:g}" if decay is not None else f"σ_rel {sigma_rel:g}"
    label = f"post-hoc EMA, {what}, checkpoints {result.steps[0]}–{result.steps[-1]}"
    history.checkpoints = [r for r in history.checkpoints if r.path != path]
    rec = history.add_checkpoint(result.steps[-1], path, heldout=result.heldout)
    rec.label = label
    state["history"] = history.to_dict()
    atomic_write_text(state_path, json.dumps(state, indent=1))
    return write_report(run_dir, c, state.get("summary", {}), history)


def write_report_state(out: Path, summary: dict, history, data_dir: str | Path) -> Path:
    """`OUT/report.json`: what report.html is rendered from (`History`, the data summary) and
    the training data folder (for `lorakit ema`'s held-out score)."""
    from lorakit.fileio import atomic_write_text

    data = str(data_dir) if str(data_dir).startswith("hf:") else str(Path(data_dir).resolve())
    state = {"summary": summary, "history": history.to_dict(), "data_dir": data}
    return atomic_write_text(out / REPORT_STATE, json.dumps(state, indent=1, default=str))


def _recorded_fingerprint(run_dir: Path) -> list | None:
    """The data fingerprint in the newest checkpoint's marker (what resume checks against)."""
    from lorakit import checkpoint as ckpt

    for _, folder in reversed(ckpt.complete_checkpoints(run_dir)):
        try:
            return json.loads((folder / ckpt.MARKER).read_text(encoding="utf-8")).get("data")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def recorded_data(run_dir: Path) -> Path | None:
    """The training data folder the run recorded in report.json, if any."""
    try:
        value = json.loads((run_dir / REPORT_STATE).read_text(encoding="utf-8"))["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(value) if value and not str(value).startswith("hf:") else None


@dataclass
class _Scorer:
    """The run's held-out scoring outside training: its base model, its validation subset
    (`eval_subset` of its data set), its latents and caption embeddings (from the run's cache),
    `heldout_loss` with its eval seed and timesteps — so a score is comparable with the scores
    of its checkpoints in the report."""

    problem: str = ""
    c: Any = None
    family: Any = None
    comps: Any = None
    cached: Any = None
    idx: list[int] = field(default_factory=list)
    spec: Any = None
    applied: bool = False

    @property
    def ready(self) -> bool:
        return not self.problem

    @classmethod
    def build(cls, c, run_dir: Path, data: Path | None) -> _Scorer:
        if c.eval.images <= 0:
            return cls("eval.images = 0 in the run's config (no held-out subset)")
        source = data or recorded_data(run_dir)
        if source is None:
            return cls(
                f"the run's training data folder is not recorded in {run_dir / REPORT_STATE}; "
                "pass --data FOLDER to score it"
            )
        if not Path(source).exists():
            return cls(f"the training data folder '{source}' is not there; pass --data FOLDER")
        return cls._load(c, Path(source), _recorded_fingerprint(run_dir))

    @classmethod
    def _load(cls, c, source: Path, recorded: list | None) -> _Scorer:
        """`recorded`: the data fingerprint the newest checkpoint recorded (None: not checked)."""
        from lorakit.data.cache import Cached, encode_captions, encode_images, image_conditioning
        from lorakit.data.training import load_training_set
        from lorakit.evaluate import eval_subset
        from lorakit.models import load_model, resolve_family
        from lorakit.models.loading import load_in
        from lorakit.resume import data_fingerprint
        from lorakit.spec import build_spec, place_frozen

        spec = build_spec(c, resolve_family(c.model)[0])
        use_cuda = c.train.device != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda" if use_cuda else "cpu")
        data = load_training_set(
            source, spec.data, c.train.batch_size, c.train.seed, pixel_multiple=spec.pixel_multiple
        )
        idx = eval_subset(data.records, c.eval.images)
        if not idx:
            return cls(f"'{source}' has no training images to hold out")
        if recorded is not None and data_fingerprint(data.records) != recorded:
            return cls(
                f"the data set in '{source}' differs from the one the run trained on (images or "
                "captions changed), so its held-out subset would not be the checkpoints'; pass "
                "--data with the run's data folder"
            )
        with load_in(spec.weight_dtype):  # straight into the run's dtype, as train loads
            family, comps = load_model(c.model)
        place_frozen(family, comps, device, spec.weight_dtype)

        class _Main:  # the cache's writer check: this is the only process
            is_main_process = True

        latents = encode_images(family, comps, data, spec.cache_dir, device, _Main())
        captions = [r.caption for r in data.records]
        cond = (
            {}
            if spec.encode_each_step
            else encode_captions(
                family,
                comps,
                [captions[i] for i in idx],
                False,
                spec.cache_dir,
                _Main(),
                text_length=spec.text_length,
            )
        )
        image_cond = image_conditioning(family, comps, data.records)
        cached = Cached(latents, captions, cond, image_cond)
        denoiser = getattr(comps, family.denoiser_name)
        if c.model.quantize == "fp8":
            from lorakit.models.quantize import enable_fp8_storage

            denoiser.to(device, spec.weight_dtype)
            enable_fp8_storage(denoiser, spec.weight_dtype)
        elif not getattr(denoiser, "is_quantized", False):
            denoiser.to(device, spec.weight_dtype)
        return cls("", c, family, comps, cached, idx, spec)

    def score(self, adapter) -> float:
        """Held-out loss of the base model with `adapter` applied (its LoRA weights in fp32, as
        training keeps them)."""
        from lorakit.evaluate import score_heldout
        from lorakit.lora import apply_adapter, lora_layers
        from lorakit.sampling import _swap_weights

        family, comps = self.family, self.comps
        if not (self.applied and _swap_weights(family, comps, adapter)):
            if self.applied:  # DoRA / LyCORIS: injected once, not swapped
                raise RuntimeError("one DoRA or LyCORIS adapter per _Scorer")
            apply_adapter(family, comps, adapter)
            self.applied = True
            for comp in adapter.components():  # fp32 LoRA weights, as training keeps them
                for _, layer in lora_layers(getattr(comps, comp)):
                    for name, p in layer.named_parameters():
                        if not name.startswith("base_layer"):
                            p.data = p.data.float()
        c = self.c
        denoiser = getattr(comps, family.denoiser_name)
        return score_heldout(
            family, comps, denoiser, self.cached, self.idx, self.spec.encode_each_step,
            c.train, c.eval.seed, c.eval.timesteps,
        )  # fmt: skip


def describe(result: PosthocResult, checkpoint_scores: dict[int, float]) -> list[str]:
    """Lines for the console: the weights, the files, the score beside the checkpoints'."""
    lines = [
        "weights: "
        + ", ".join(f"step {s}: {w:.3f}" for s, w in zip(result.steps, result.weights, strict=True))
    ]
    lines += [f"  adapter ({fmt}): {p}" for fmt, p in result.files.items()]
    if result.heldout is not None:
        best = min(checkpoint_scores.items(), key=lambda kv: kv[1]) if checkpoint_scores else None
        vs = f" (best checkpoint: step {best[0]}, {best[1]:.6g})" if best else ""
        lines.append(f"held-out loss: {result.heldout:.6g}{vs}")
    else:
        lines.append(f"not scored: {result.not_scored}")
    lines.append(
        f"report: {result.report}"
        if result.report
        else "report not updated: the run has no report.json (training not finished?)"
    )
    return lines
