"""Training–inference agreement, for every registered family: what lorakit trains is what the
family's diffusers pipeline samples.

Per family, lorakit's own training path — the family's `noise_and_timesteps` + `loss`,
`inject_lora`, `build_optimizer`, `extract_adapter`, `write_adapter` (diffusers format) — trains a
LoRA on ONE image and its caption. A FRESH base model in the family's diffusers pipeline (its
scheduler, its prompt encoding; call arguments from `lorakit.sampling.pipeline_kwargs`, CFG off)
loads the exported file with `load_lora_weights` and samples that caption from pure noise
(`output_type="latent"`). Three checks on that one run:

1. Memorisation: the sampled latents point the way of the training image's latent — cosine of the
   whole latents and of their layouts (per-channel means removed: a random VAE maps a
   flat-coloured illustration to latents dominated by per-channel constants, which a model can
   get right without placing anything) — far above the untrained model's.
2. One step, exactly (`one_step_agreement`): with the noise that puts the training image at the
   point of the pipeline's own schedule where its step `STEP` starts, lorakit's `loss` must call
   the denoiser with the same inputs as the pipeline does (every argument: noisy latent, timestep,
   prompt embeddings, ids, guidance, time ids, shapes), and its loss must be 0 when the denoiser
   returns the output that makes the pipeline's step land exactly on the image's next point (the
   training target is what the sampler expects).
3. Shift (flow families): the shift of lorakit's timestep sampler equals the shift of the
   pipeline's schedule at its default step count for this image size.

Check 2 and 3 exist because check 1 alone cannot see a wrong timestep scale or shift: a model that
memorised one image reads the noise level off its input and ignores the timestep (FLUX trained
with σ·1000 where it wants σ, or with the input noised at a shifted σ, still samples the image
back at cosine 0.98).

Nothing here names a family. What only the family knows — tiny components able to memorise an
image with unit-RMS latents, LoRA targets, run settings, its own faults, how the pipeline's latent
output maps to lorakit's latents — is its `AgreementSupport` (`lorakit/models/base.py`, in
`models/<family>/agreement.py`). The rest is read off the code under test by probing:
- where lorakit's noisy latent sits in the denoiser's inputs (a tensor, packed tokens, a list per
  sample): `loss` on a zero image with index-coded noise, its denoiser call captured (so check 2
  takes lorakit's packing as given: a packing bug consistent in lorakit's pack and unpack is
  check 1's to catch — the samples are unpacked by the pipeline's own code — as the Qwen-Image
  `pack` fault shows);
- the denoiser output the pipeline's step turns into the image's next point: the pipeline run
  with the output of step `STEP` replaced by zeros and by an index code, the input of step
  `STEP + 1` captured (one step is affine in the output: a scaled, possibly negated permutation);
  DDPM schedulers: the ε / v their `prediction_type` names, in the layout of the input;
- the schedule's shift: fitted to the pipeline's sigmas (un-shifting them with the right shift
  gives an evenly spaced grid).

Every deliberate fault (generic ones here, the family's own in its support) fails the
default-run test; the slow `test_fault_is_caught` runs them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SAMPLES

from lorakit.config import LoraConfigSection, TrainConfig
from lorakit.data import load_image, scan_folder
from lorakit.export import write_adapter
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import FAMILIES
from lorakit.models.agreement import patched
from lorakit.models.base import AgreementSetting, AgreementSupport, agreement_support
from lorakit.optim import build_optimizer
from lorakit.sampling import GridSpec, PromptRow, pipeline_kwargs

SAMPLE_STEPS = 15
STEP = 5
"""The pipeline step whose denoiser call `one_step_agreement` reproduces."""


def support_of(name: str) -> AgreementSupport:
    """The family's agreement support; fails the test where the family has none."""
    support = agreement_support(FAMILIES[name])
    if support is None:
        module = type(FAMILIES[name]).__module__
        pytest.fail(
            f"Family '{name}' has no training–inference agreement support: add "
            f"{module.replace('.', '/')}/agreement.py defining AGREEMENT, an AgreementSupport "
            "(lorakit/models/base.py; every registered family's agreement.py is an example), so "
            "that this test can train a LoRA on one image and sample it back in the family's "
            "pipeline."
        )
    return support


@cache
def flow_family(name: str) -> bool:
    """Whether the family's pipeline samples with a flow-matching scheduler (its constructor's
    `scheduler` annotation), without building a model: which generic faults apply."""
    import diffusers

    cls = getattr(diffusers, FAMILIES[name].pipeline_class_names[0])
    kind = inspect.signature(cls.__init__).parameters["scheduler"].annotation
    return "FlowMatch" in getattr(kind, "__name__", str(kind))


def _flow(scheduler) -> bool:
    """Flow matching (σ-parameterised) vs a DDPM schedule (ᾱ-parameterised)."""
    return not hasattr(scheduler, "alphas_cumprod")


@dataclass
class Agreement:
    cosines: list[tuple[float, float]]
    """Per sampling seed: `similarity(sample, training latent)` with the trained LoRA."""
    baseline: list[tuple[float, float]]
    """The same for the untrained base model (empty when not sampled)."""
    step_problems: list[str]
    """What `one_step_agreement` found different (empty: training and sampling agree)."""
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _mean(pairs, i: int) -> float:
        return sum(p[i] for p in pairs) / len(pairs) if pairs else float("nan")

    @property
    def cosine(self) -> float:
        return self._mean(self.cosines, 0)

    @property
    def layout(self) -> float:
        return self._mean(self.cosines, 1)

    @property
    def base(self) -> tuple[float, float]:
        return self._mean(self.baseline, 0), self._mean(self.baseline, 1)

    def summary(self) -> str:
        n = max(1, len(self.losses) // 10)
        first, last = sum(self.losses[:n]) / n, sum(self.losses[-n:]) / n
        seconds = {k: round(v, 1) for k, v in self.seconds.items()}
        return (
            f"cosine {self.cosine:.3f} layout {self.layout:.3f} (per seed "
            f"{[tuple(round(c, 3) for c in p) for p in self.cosines]}); untrained "
            f"{self.base[0]:.3f} / {self.base[1]:.3f}; loss {first:.3f} → {last:.3f}; "
            f"one step: {'; '.join(self.step_problems) or 'agrees'}; "
            f"seconds {seconds}"
        )


def training_image(res: int, index: int = 0) -> tuple[torch.Tensor, str]:
    """`[1, 3, res, res]` pixels and the caption's first two clauses (the image's subject)."""
    item = scan_folder(SAMPLES)[index]
    return load_image(item.path, res)[None], ", ".join(item.caption.split(", ")[:2])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def similarity(sample: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(cosine of the latents, cosine of their layouts: per-channel means removed)."""

    def centred(x):
        return x - x.mean(dim=(-2, -1), keepdim=True)

    return _cos(sample, target), _cos(centred(sample), centred(target))


# --- denoiser calls: captured, flattened, refilled --------------------------------------------


def _copy(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_copy(x) for x in v)
    return v


def _bound(module: torch.nn.Module, args, kwargs) -> dict[str, Any]:
    """A denoiser call's arguments by name, tensors detached and copied."""
    named = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    return {k: _copy(v) for k, v in named.items()}


def _tensors(v) -> list[torch.Tensor] | None:
    """The tensors of a tensor or a list/tuple of tensors (Z-Image's per-sample inputs and
    outputs), in order; None for anything else."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return list(v)
    if isinstance(v, (list, tuple)) and len(v) == 1:  # the denoiser's `(output,)`
        return _tensors(v[0])
    return None


def _flat(v) -> torch.Tensor | None:
    """All values of `_tensors(v)` as one float64 vector."""
    ts = _tensors(v)
    return None if ts is None else torch.cat([t.detach().reshape(-1).double() for t in ts])


def _refill(structure, flat: torch.Tensor):
    """`structure` (a tensor, or nested tuples/lists of tensors) with its values replaced, in
    order, by `flat` (cast to each tensor's dtype)."""
    offset = 0

    def fill(s):
        nonlocal offset
        if isinstance(s, torch.Tensor):
            n = s.numel()
            out = flat[offset : offset + n].view(s.shape).to(s.dtype)
            offset += n
            return out
        return type(s)(fill(x) for x in s)

    return fill(structure)


@contextlib.contextmanager
def _hooked(module: torch.nn.Module, calls: list | None = None, replace: dict | None = None):
    """Capture the bound arguments of every call of `module` into `calls`; replace the output of
    call i by `replace[i]` (a flat vector, refilled into the output's structure)."""
    count = [0]

    def pre(m, args, kwargs):
        if calls is not None:
            calls.append(_bound(m, args, kwargs))

    def post(m, args, kwargs, output):
        i = count[0]
        count[0] += 1
        if replace is not None and i in replace:
            return _refill(output, replace[i])
        return None

    hooks = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# --- the pipeline call ---------------------------------------------------------------------------


def call_kwargs(pipe, support: AgreementSupport, caption: str, res: int) -> dict[str, Any]:
    """The pipeline's arguments for the caption: `lorakit.sampling.pipeline_kwargs` (what the
    previews pass) with CFG off — guidance 0 is off in every pipeline (ZImagePipeline runs CFG
    for any guidance > 0, the others above 1) — the training's embedded guidance, the latents
    returned, and the components' text length (`GridSpec.text_length`, as a run's previews
    pass it)."""
    spec = GridSpec(
        prompts=[caption], seeds=[0], steps=SAMPLE_STEPS, guidance=0.0, negative="",
        width=res, height=res, text_length=support.text_length,
    )  # fmt: skip
    row = PromptRow(caption, cfg=0.0, guidance=TrainConfig().guidance)
    return dict(pipeline_kwargs(pipe, spec, row), output_type="latent")


def _stop_after(step: int):
    """`callback_on_step_end` that skips every denoiser call after `step`."""

    def callback(pipe, i, t, kwargs):
        if i >= step:
            pipe._interrupt = True
        return {}

    return callback


@torch.no_grad()
def pipeline_calls(name: str, pipe, kw: dict, replace: dict | None = None) -> list:
    """The denoiser calls of steps 0 … `STEP + 1` of the pipeline (seed 0), with `replace` (see
    `_hooked`)."""
    calls: list[dict[str, Any]] = []
    with _hooked(getattr(pipe, FAMILIES[name].denoiser_name), calls, replace):
        pipe(**kw, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=_stop_after(STEP + 1))  # fmt: skip
    return calls


@torch.no_grad()
def sample_latents(name: str, comps, kw: dict, seeds, lora: Path | None = None):
    """(latents `[1, C, h, w]` per seed from the family's own diffusers pipeline after
    `load_lora_weights(lora)`, the pipeline)."""
    support = support_of(name)
    pipe = FAMILIES[name].pipeline(comps)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = []
    for s in seeds:
        lat = pipe(**kw, generator=torch.Generator().manual_seed(s))[0]
        out.append(support.latents_from_pipeline(pipe, lat, kw["height"], kw["width"]))
    return out, pipe


# --- training ------------------------------------------------------------------------------------


@dataclass
class Trained:
    path: Path
    comps: Any
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    caption: str
    train: TrainConfig
    losses: list[float]


def train_and_export(name: str, out: Path, setting: AgreementSetting) -> Trained:
    """Train the LoRA on one image with lorakit's code path; write it in diffusers format."""
    fam, support = FAMILIES[name], support_of(name)
    pixels, caption = training_image(setting.res)
    comps = support.components(pixels)
    latents = fam.encode_images(comps, pixels)
    cond = fam.encode_prompts(comps, [caption])
    size = (setting.res, setting.res)
    cond.update(fam.image_conditioning(comps, size, (0, 0), size))
    tc = TrainConfig(
        lr=setting.lr,
        optimizer="adamw",
        weight_decay=0.0,
        steps=setting.steps,
        min_snr_gamma=setting.min_snr_gamma,
        noise_offset=setting.noise_offset,
    )
    denoiser = getattr(comps, fam.denoiser_name)
    params = inject_lora(
        denoiser,
        LoraConfigSection(rank=16, alpha=16.0, target_modules=list(support.targets)),
        seed=0,
    )
    opt = build_optimizer(params, tc, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, tc.steps) / tc.steps))
    )
    b = setting.batch
    lat_b = latents.expand(b, *latents.shape[1:])
    cond_b = {k: v.expand(b, *v.shape[1:]) for k, v in cond.items()}
    losses = []
    denoiser.train()
    for step in range(tc.steps):
        gen = torch.Generator().manual_seed(1000 + step)
        noise, timesteps = fam.noise_and_timesteps(comps, lat_b, gen, tc)
        loss = fam.loss(comps, denoiser, lat_b, cond_b, noise, timesteps, tc)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    denoiser.eval()
    path = write_adapter(
        extract_adapter(fam, comps), "diffusers", out / "pytorch_lora_weights.safetensors"
    )
    return Trained(path, comps, latents, cond, caption, tc, losses)


# --- check 2: one step, exactly ----------------------------------------------------------------


def _differs(a, b, rtol: float = 1e-4) -> str | None:
    """Why two denoiser arguments differ, or None. Tensors (dicts and lists of them) compare to
    `rtol` of their scale, broadcast-equal shapes pass (a scalar timestep and its batch of one);
    anything else compares equal."""
    if _empty(a) and _empty(b):  # no attention kwargs: None, or an empty dict
        return None
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return f"keys {sorted(a or {})} vs {sorted(b or {})}"
        for k in a:
            why = _differs(a[k], b[k], rtol)
            if why:
                return f"{k}: {why}"
        return None
    if a is None or b is None:
        return None if a is None and b is None else "only one side passes it"
    ta, tb = _tensors(a), _tensors(b)
    if ta is None and tb is None:
        return None if a == b else f"{a!r} vs {b!r}"
    if ta is None or tb is None or len(ta) != len(tb):
        return f"{type(a).__name__} vs {type(b).__name__}"
    for x, y in zip(ta, tb, strict=True):
        x, y = x.detach().double(), y.detach().double()
        if x.numel() != y.numel() and not (x.numel() == 1 or y.numel() == 1):
            return f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        x, y = torch.broadcast_tensors(x.reshape(-1), y.reshape(-1))
        err = (x - y).abs().max().item()
        scale = max(x.abs().max().item(), y.abs().max().item(), 1e-6)
        if err > rtol * scale:
            return f"max difference {err:.3g} (of {scale:.3g})"
    return None


def _empty(v) -> bool:
    return v is None or (isinstance(v, (dict, list, tuple)) and not v)


def _code_order(values: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """For `values` = a · code[π] (code = 1 … n, a ≠ 0): (π⁻¹ as the order that sorts them by
    code, a); None where `values` are not such a scaled permutation (to a hundredth of the code
    spacing: two codes swapped are off by a whole one, float32 rounding by ~1e-5·n)."""
    order = values.abs().argsort()
    code = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    a = (values[order] * code).sum().item() / code.pow(2).sum().item()
    if a == 0 or (values[order] - a * code).abs().max().item() > 1e-2 * abs(a):
        return None
    return order, a


def _latent_layout(fam, trained: Trained, timesteps: torch.Tensor):
    """(the denoiser argument that holds lorakit's noisy latent, the order that maps its flat
    values to lorakit's flat latent: `ours = theirs[order]`), found by `loss` on a zero image
    with index-coded noise; None where no argument holds it."""
    x0 = trained.latents
    code = torch.arange(1, x0.numel() + 1, dtype=torch.float32).view(x0.shape)
    calls: list[dict[str, Any]] = []
    denoiser = getattr(trained.comps, fam.denoiser_name)
    with _hooked(denoiser, calls), torch.no_grad():
        fam.loss(trained.comps, denoiser, torch.zeros_like(x0), trained.cond, code, timesteps,
                 trained.train)  # fmt: skip
    for key, value in calls[0].items():
        flat = _flat(value)
        if flat is not None and flat.numel() == x0.numel():
            found = _code_order(flat)
            if found is not None and found[1] > 0:
                return key, found[0]
    return None


def one_step_agreement(name: str, trained: Trained, pipe, kw: dict) -> list[str]:
    """Reproduce the pipeline's denoiser call of step `STEP` with lorakit's training `loss` (see
    the module docstring); return the differences found (empty list: they agree)."""
    fam = FAMILIES[name]
    comps, x0 = trained.comps, trained.latents
    n = x0.numel()
    plain = pipeline_calls(name, pipe, kw, replace={STEP: torch.zeros(n, dtype=torch.float64)})
    sched = pipe.scheduler
    flow = _flow(sched)
    if flow:
        sigma, sigma_next = sched.sigmas[STEP].item(), sched.sigmas[STEP + 1].item()
        timesteps = torch.tensor([sigma])
    else:
        t = round(float(sched.timesteps[STEP]))
        abar = sched.alphas_cumprod[t].double()
        timesteps = torch.tensor([t])
    layout = _latent_layout(fam, trained, timesteps)
    if layout is None:
        return ["no denoiser input holds the noisy latent (a scaled permutation of it)"]
    key, order = layout

    def ours(flat):
        return flat[order].view(x0.shape)

    def theirs(x):
        out = torch.empty(n, dtype=torch.float64)
        out[order] = x.reshape(-1).double()
        return out

    x = ours(_flat(plain[STEP][key]))
    if flow:
        noise = (x - (1 - sigma) * x0.double()) / sigma
        # The pipeline's step is affine in the denoiser's output o: next input = b + A·o, A a
        # scaled (maybe negated) permutation. b from o = 0, A from an index code.
        b = _flat(plain[STEP + 1][key])
        code = torch.arange(1, n + 1, dtype=torch.float64)
        coded = pipeline_calls(name, pipe, kw, replace={STEP: code})
        found = _code_order(_flat(coded[STEP + 1][key]) - b)
        if found is None:
            return ["the pipeline's step is not a scaled permutation of the denoiser output"]
        step_order, a = found
        target = theirs((1 - sigma_next) * x0.double() + sigma_next * noise)
        ideal = (target - b)[step_order] / a
    else:
        noise = (x - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
        kind = sched.config.prediction_type
        eps_or_v = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        ideal = theirs(eps_or_v)  # a UNet predicts in the layout of its input
    seen: list[dict[str, Any]] = []
    denoiser = getattr(comps, fam.denoiser_name)
    with _hooked(denoiser, seen, replace={0: ideal}), torch.no_grad():
        loss = fam.loss(comps, denoiser, x0, trained.cond, noise.float(), timesteps, trained.train)
    problems = []
    call = plain[STEP]
    for arg in sorted(set(call) | set(seen[0])):
        if arg == "return_dict":
            continue
        why = _differs(seen[0].get(arg), call.get(arg))
        if why:
            problems.append(f"denoiser input '{arg}': {why}")
    if loss.item() > 1e-8 * max(1.0, ideal.pow(2).mean().item()):
        problems.append(f"training target is not what the sampler steps with (loss {loss:.3g})")
    if flow:
        problems += _shift_agreement(fam, trained, pipe, kw)
    return problems


def schedule_shift(sigmas: torch.Tensor) -> tuple[float, float]:
    """(s, residual): the shift s for which un-shifting the schedule `sigmas` (σ = σ'/(s - (s-1)σ'),
    the inverse of σ' = sσ/(1 + (s-1)σ) = e^μ-time-shift with s = e^μ) gives the most evenly
    spaced grid, and that grid's largest deviation from even spacing (relative to its span)."""
    s = sigmas.double()
    k = torch.arange(len(s), dtype=torch.float64)

    def residual(log_shift: float) -> float:
        shift = math.exp(log_shift)
        u = s / (shift - (shift - 1) * s)
        even = u[0] + (u[-1] - u[0]) * k / (len(s) - 1)
        return ((u - even).abs().max() / (u[0] - u[-1]).abs()).item()

    grid = [i / 20 for i in range(-100, 101)]  # ln s in [-5, 5]
    lo = min(grid, key=residual)
    a, b = lo - 0.05, lo + 0.05
    for _ in range(60):  # golden-section refinement
        c, d = b - (b - a) / 1.618034, a + (b - a) / 1.618034
        a, b = (a, d) if residual(c) < residual(d) else (c, b)
    return math.exp((a + b) / 2), residual((a + b) / 2)


def _shift_agreement(fam, trained: Trained, pipe, kw: dict) -> list[str]:
    """The training sigma sampler's shift (its median m of a shifted symmetric logit-normal is
    shift(½), so s = m / (1 - m)) equals the shift of the pipeline's schedule at its default
    step count (FLUX.2's μ depends on it) for this image size."""
    x0 = trained.latents
    tc = dataclasses.replace(trained.train, timestep_sampling="shift", logit_mean=0.0)
    _, sigmas = fam.noise_and_timesteps(
        trained.comps, x0.expand(4096, *x0.shape[1:]), torch.Generator().manual_seed(7), tc
    )
    m = sigmas.median().item()
    ours = m / (1 - m)
    steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    with torch.no_grad():
        pipe(**dict(kw, num_inference_steps=steps), callback_on_step_end=_stop_after(0))
    theirs, residual = schedule_shift(pipe.scheduler.sigmas[:steps])
    if residual > 1e-3:
        return [f"the pipeline's {steps}-step schedule is no shifted even grid ({residual:.2g})"]
    if abs(math.log(ours / theirs)) > 0.1:
        return [f"training samples sigmas with shift {ours:.3f}, the pipeline uses {theirs:.3f}"]
    return []


# --- the run -------------------------------------------------------------------------------------


def run_agreement(
    name: str,
    out: Path,
    setting: AgreementSetting,
    fault: str | None = None,
    baseline: bool = True,
) -> Agreement:
    """Train, export, sample, compare (see the module docstring), with `fault` (a `faults_of`
    name: a deliberate bug in lorakit's training side) if given. One torch thread: these tiny
    models run 1–4× faster on one thread than on two (thread sync dominates their small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with faults_of(name)[fault]() if fault else contextlib.nullcontext():
            return _run_agreement(name, out, setting, baseline)
    finally:
        torch.set_num_threads(threads)


def _run_agreement(name: str, out: Path, setting: AgreementSetting, baseline: bool) -> Agreement:
    support = support_of(name)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    trained = train_and_export(name, out, setting)
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels, _ = training_image(setting.res)
    fresh = support.components(pixels)
    kw = call_kwargs(FAMILIES[name].pipeline(fresh), support, trained.caption, setting.res)
    got, pipe = sample_latents(name, fresh, kw, setting.seeds, lora=trained.path)
    before = []
    if baseline:  # two seeds tell "far above" well enough (untrained cosines are ~0 ± 0.1)
        plain, _ = sample_latents(name, support.components(pixels), kw, setting.seeds[:2])
        before = [similarity(x, trained.latents) for x in plain]
    times["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems = one_step_agreement(name, trained, pipe, kw)
    times["one step"] = time.perf_counter() - t0
    cosines = [similarity(x, trained.latents) for x in got]
    return Agreement(cosines, before, problems, trained.losses, times)


# --- deliberate faults: bugs put into lorakit's training side (sampling is diffusers' own) ------
# The generic ones go through the `Family` protocol (`predict`, `loss`, `noise_and_timesteps`),
# so they apply to every family; a family's own conventions have theirs in its support.


def _wrap_predict(fam, change_t=None, change_out=None):
    """The family's `predict` passing changed timesteps to the denoiser (the noisy input, built
    from the true timesteps, is unchanged) and/or returning a changed output."""
    original = type(fam).predict

    def predict(self, denoiser, noisy, timesteps, cond):
        out = original(self, denoiser, noisy, change_t(timesteps) if change_t else timesteps, cond)
        return change_out(out) if change_out else out

    return patched(type(fam), "predict", predict)


def _fault_timestep_scale(fam):
    """Flow: σ·1000 where the family takes σ (SD3, which scales it ×1000 itself: 10⁶).
    DDPM: t / 1000."""
    if flow_family(fam.name):
        return _wrap_predict(fam, change_t=lambda t: t * 1000.0)
    return _wrap_predict(fam, change_t=lambda t: t.float() / 1000.0)


def _fault_output_sign(fam):
    """The denoiser's output negated in training (the convention Z-Image's pipeline applies)."""
    return _wrap_predict(fam, change_out=lambda out: -out)


@contextlib.contextmanager
def _fault_shift(fam):
    """Flow: the input noised at the shifted σ' = 3σ/(1+2σ) while the timestep says σ (a shift
    applied on one side only)."""
    from lorakit.models import flow

    cls = type(fam)
    loss, predict = cls.loss, cls.predict
    told: list[torch.Tensor] = []

    def shifted_loss(self, components, denoiser, latents, cond, noise, timesteps, train):
        told.append(timesteps)
        noised_at = flow.time_shift(timesteps.clamp(1e-5, 1 - 1e-5), math.log(3))
        return loss(self, components, denoiser, latents, cond, noise, noised_at, train)

    def told_predict(self, denoiser, noisy, timesteps, cond):
        return predict(self, denoiser, noisy, told[-1].to(timesteps), cond)

    with patched(cls, "loss", shifted_loss), patched(cls, "predict", told_predict):
        yield


def _fault_sampler_shift(fam):
    """Flow: the timestep sampler's shift ignored (shift 1: sigmas centred on ½)."""
    original = type(fam).noise_and_timesteps

    def noise_and_timesteps(self, components, latents, generator, train):
        return original(self, components, latents, generator, dataclasses.replace(
            train, flow_shift=1.0
        ))  # fmt: skip

    return patched(type(fam), "noise_and_timesteps", noise_and_timesteps)


GENERIC_FAULTS: dict[str, tuple[bool, Callable]] = {
    "timestep_scale": (False, _fault_timestep_scale),
    "output_sign": (False, _fault_output_sign),
    "shift": (True, _fault_shift),
    "sampler_shift": (True, _fault_sampler_shift),
}
"""name → (flow families only, fault(family) → context manager)."""


def faults_of(name: str) -> dict[str, Callable[[], Any]]:
    """Every fault the family's default run must catch: the generic ones that apply to it and
    its support's own."""
    fam, flow = FAMILIES[name], flow_family(name)
    out: dict[str, Callable[[], Any]] = {
        f: (lambda make=make: make(fam)) for f, (flow_only, make) in GENERIC_FAULTS.items()
        if flow or not flow_only
    }  # fmt: skip
    support = agreement_support(fam)
    if support is not None:
        out.update(support.faults)
    return out


def failures(result: Agreement, setting: AgreementSetting) -> list[str]:
    """Why the agreement test fails (empty: it passes)."""
    out = list(result.step_problems)
    if result.cosine < setting.threshold or result.layout < setting.layout_threshold:
        out.append(
            f"sample misses the image: cosine {result.cosine:.3f} / layout {result.layout:.3f}"
            f" < {setting.threshold} / {setting.layout_threshold}"
        )
    if result.baseline and result.cosine - result.base[0] < 0.4:
        out.append(f"not far above the untrained model ({result.base[0]:.3f})")
    return out


# A support with `default_tier = False` runs its default setting in the slow tier (its reason is
# in its agreement.py), to keep the default run under 8 minutes.
@pytest.mark.parametrize(
    "name",
    [
        n if support_of(n).default_tier else pytest.param(n, marks=pytest.mark.slow)
        for n in FAMILIES
    ],
)
def test_trained_lora_samples_its_training_image(name, tmp_path):
    setting = support_of(name).default
    result = run_agreement(name, tmp_path, setting)
    print(name, result.summary())
    assert not failures(result, setting), result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_trained_lora_samples_its_training_image_full(name, tmp_path):
    setting = support_of(name).slow
    result = run_agreement(name, tmp_path, setting)
    print(name, result.summary())
    assert not failures(result, setting), result.summary()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fault"), [(n, f) for n in FAMILIES for f in faults_of(n)])
def test_fault_is_caught(name, fault, tmp_path):
    """Each deliberate training-side bug fails the default-run test."""
    setting = support_of(name).default
    result = run_agreement(name, tmp_path, setting, fault=fault, baseline=False)
    print(name, fault, result.summary(), failures(result, setting))
    assert failures(result, setting), result.summary()


def test_a_family_without_support_fails_saying_what_to_add(monkeypatch):
    class Unsupported:
        name = "unsupported"
        pipeline_class_names = ("StableDiffusionPipeline",)

    monkeypatch.setitem(FAMILIES, "unsupported", Unsupported())
    with pytest.raises(pytest.fail.Exception, match=r"'unsupported' has no .*agreement.py "
                       r"defining AGREEMENT, an AgreementSupport"):  # fmt: skip
        support_of("unsupported")


def test_names_no_family():
    """This file reaches every family through the registry and its `AgreementSupport`: no family
    name in its code (docstrings and comments aside), as `tests/test_family_contract.py` checks
    lorakit's generic code."""
    from test_family_contract import _family_mentions

    assert not _family_mentions(Path(__file__))
