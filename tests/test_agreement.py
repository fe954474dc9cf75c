"""Training–inference agreement per family: what lorakit trains is what diffusers samples.

Per family, lorakit's own training path — the family's `noise_and_timesteps` + `loss`,
`inject_lora`, `build_optimizer`, `extract_adapter`, `write_adapter` (diffusers format) — trains a
LoRA on ONE image and its caption. A FRESH base model in the family's diffusers pipeline (its
scheduler, its prompt encoding) loads the exported file with `load_lora_weights` and samples that
caption from pure noise (`output_type="latent"`, no classifier-free guidance). Two checks on
that one run:

1. Memorisation: the sampled latents point the way of the training image's latent — cosine of the
   whole latents and of their layouts (per-channel means removed: a random VAE maps a
   flat-coloured illustration to latents dominated by per-channel constants, which a model can
   get right without placing anything) — far above the untrained model's.
2. One step, exactly (`one_step_agreement`): the pipeline's denoiser call at step `STEP` is
   captured. With the noise that puts the training image at that point of the pipeline's own
   schedule, lorakit's `loss` must call the denoiser with the same inputs (noisy latent,
   timestep value, prompt embeddings, FLUX ids/guidance, SDXL time ids), and its loss must be 0
   when the denoiser returns the output that makes the pipeline's scheduler step land exactly on
   its next point for that image (the training target is what the sampler expects). For the flow
   families the shift of lorakit's timestep sampler must equal the pipeline's schedule shift.

Check 2 exists because check 1 alone cannot see a wrong timestep scale or shift: a model that
memorised one image reads the noise level off its input and ignores the timestep (FLUX trained
with σ·1000 where it wants σ, or with the input noised at a shifted σ, still samples the image
back at cosine 0.98). Every deliberate fault in `FAULTS` fails the default-run test; the slow
`test_fault_is_caught` runs them all.

The tiny models need three changes to memorise an image, confined to this file
(`agreement_components`; the default tiny models stay bit-identical):
- the random VAE's latents have std ≈ 0.1–0.35: `scaling_factor` (and, for the flow families,
  `shift_factor`) are set so that the training image's latent has RMS 1 (and mean 0), the scale
  the noise schedules assume;
- the default tiny SD3/FLUX transformers (hidden 32, fewer features than a 2×2×16 patch) are too
  narrow: a wider variant of the same config is used, with a short T5 sequence;
- SD3 builds its sin-cos position table on `pos_embed_max_size` points spread over
  `sample_size / patch_size` units: the default tiny config (sample_size 8, table 32) puts the
  4×4 patches of a 64 px image 1/8 apart, where their embeddings have cosine 0.9985 — the model
  cannot tell them apart and cannot place anything. sample_size 512 puts them 8 apart (cosine
  ≤ 0.85).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from lorakit.optim import build_optimizer

T5_TOKENS = 64
"""`model.t5_max_length` of the flow families here: the caption fits (52 tiny-T5 tokens), and the
text stream does not cost 20–30× the 16 image tokens (defaults 256 / 512)."""
SAMPLE_STEPS = 20
STEP = 5
"""The pipeline step whose denoiser call `one_step_agreement` reproduces."""

# Wider transformers (the default tiny configs' shape rules hold: caption_projection_dim =
# heads × head_dim, sum(axes_dims_rope) = head_dim); SD3 sample_size: see the module docstring.
WIDE_SD3 = dict(
    attention_head_dim=16, num_attention_heads=8, caption_projection_dim=128, sample_size=512
)
WIDE_FLUX = dict(attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12))

# Every Linear/Conv layer (all are in the families' fixed tables, so every one exports). The
# embedders and adaLN modulations matter most: an attention-only LoRA memorises far slower.
_UNET = [
    "conv_in", "conv_out", "conv", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    "linear_1", "linear_2", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0",
    "ff.net.0.proj", "ff.net.2",
]  # fmt: skip
_JOINT = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "linear_1",
    "linear_2",
]  # fmt: skip
TARGETS = {
    "sd15": _UNET,
    "sdxl": _UNET,
    "sd3": [*_JOINT, "pos_embed.proj"],
    "flux": [*_JOINT, "x_embedder", "norm.linear", "proj_mlp"],
}


@dataclass(frozen=True)
class Setting:
    steps: int
    threshold: float
    """Minimum mean cosine of the whole latents."""
    layout_threshold: float
    """Minimum mean cosine of the layouts (per-channel means removed)."""
    lr: float = 1e-2
    batch: int = 8
    """Noise draws of the one image per step."""
    seeds: tuple[int, ...] = (0, 1)
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    res: int = 64


# SD1.5/SDXL: epsilon prediction with SD's non-zero terminal SNR. At t = 999 the training input
# still holds 0.068·x0, and an ε error e becomes an x0 error of ~15e; from pure noise the
# sample's per-channel means follow the starting noise unless ε is learnt very precisely (the
# known "noise schedules are flawed" effect). Within the default budget some seeds then come
# back and some do not; noise offset (what it was invented for) and min-SNR-γ (weight on the
# high-noise steps) make all four come back, loosely in the default run, fully in the slow one.
_EPS = dict(min_snr_gamma=5.0, noise_offset=0.2, seeds=(0, 1, 2, 3))
DEFAULT = {
    "sd15": Setting(steps=160, threshold=0.55, layout_threshold=0.4, **_EPS),
    "sdxl": Setting(steps=160, threshold=0.55, layout_threshold=0.4, **_EPS),
    "sd3": Setting(steps=120, threshold=0.6, layout_threshold=0.5),
    "flux": Setting(steps=120, threshold=0.6, layout_threshold=0.5),
}
SLOW = {
    "sd15": Setting(steps=400, threshold=0.95, layout_threshold=0.9, **_EPS),
    "sdxl": Setting(steps=400, threshold=0.95, layout_threshold=0.9, **_EPS),
    "sd3": Setting(steps=400, threshold=0.95, layout_threshold=0.9, seeds=(0, 1, 2, 3)),
    "flux": Setting(steps=400, threshold=0.95, layout_threshold=0.9, seeds=(0, 1, 2, 3)),
}


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


def agreement_components(name: str, pixels: torch.Tensor, seed: int = 0):
    """The family's tiny components for this test (see the module docstring): wider SD3/FLUX
    transformer, short T5 sequence, the VAE rescaled to unit latents of `pixels`."""
    fam = FAMILIES[name]
    comps = fam.build_tiny(seed=seed)
    flow_family = name in ("sd3", "flux")
    if flow_family:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        from lorakit.models.flux import TINY_FLUX_TRANSFORMER
        from lorakit.models.loading import freeze
        from lorakit.models.sd3 import TINY_SD3_TRANSFORMER

        torch.manual_seed(seed)
        if name == "sd3":
            comps.transformer = SD3Transformer2DModel(**dict(TINY_SD3_TRANSFORMER, **WIDE_SD3))
        else:
            comps.transformer = FluxTransformer2DModel(**dict(TINY_FLUX_TRANSFORMER, **WIDE_FLUX))
        freeze(comps.transformer)
        comps.t5_max_length = T5_TOKENS
    vae = comps.vae
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
    shift = raw.mean().item() if flow_family else 0.0
    scale = 1.0 / (raw - shift).pow(2).mean().sqrt().item()
    vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if flow_family else {}))
    return fam, comps


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


def _bound(module: torch.nn.Module, args, kwargs) -> dict[str, Any]:
    """A denoiser call's arguments by name, tensors detached and copied."""
    named = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v

    return {k: copy(v) for k, v in named.items()}


@torch.no_grad()
def sample_latents(name: str, comps, caption: str, seeds, res: int, lora: Path | None = None):
    """(latents `[1, C, h, w]` per seed from the family's own diffusers pipeline after
    `load_lora_weights(lora)`, the pipeline, the denoiser call of step `STEP` of the first seed)."""
    fam = FAMILIES[name]
    pipe = fam.pipeline(comps)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    kw: dict = dict(num_inference_steps=SAMPLE_STEPS, height=res, width=res, output_type="latent")
    if name == "flux":  # guidance: the value the guidance embedding saw in training
        kw.update(guidance_scale=TrainConfig().guidance, max_sequence_length=comps.t5_max_length)
    elif name == "sd3":
        kw.update(guidance_scale=1.0, max_sequence_length=comps.t5_max_length)
    else:
        kw.update(guidance_scale=1.0)
    denoiser = getattr(pipe, fam.denoiser_name)
    calls: list[dict[str, Any]] = []

    def capture(module, args, kwargs):
        if len(calls) <= STEP:
            calls.append(_bound(module, args, kwargs))

    out = []
    for i, s in enumerate(seeds):
        hook = denoiser.register_forward_pre_hook(capture, with_kwargs=True) if i == 0 else None
        lat = pipe(prompt=caption, generator=torch.Generator().manual_seed(s), **kw)[0]
        if hook is not None:
            hook.remove()
        if name == "flux":  # FluxPipeline returns packed latents for output_type="latent"
            from lorakit.models.flux import unpack_latents

            lat = unpack_latents(lat, res // 8, res // 8)
        out.append(lat)
    return out, pipe, calls[STEP] if len(calls) > STEP else None


@dataclass
class Trained:
    path: Path
    comps: Any
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    caption: str
    train: TrainConfig
    losses: list[float]


def train_and_export(name: str, out: Path, setting: Setting) -> Trained:
    """Train the LoRA on one image with lorakit's code path; write it in diffusers format."""
    pixels, caption = training_image(setting.res)
    fam, comps = agreement_components(name, pixels)
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
        LoraConfigSection(rank=16, alpha=16.0, target_modules=TARGETS[name]),
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


def _differs(a, b, rtol: float = 1e-4) -> str | None:
    """Why tensors (or dicts of them) a and b differ, or None. Broadcast-equal shapes pass
    (a scalar timestep and its batch of one)."""
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
    a, b = a.detach().double(), b.detach().double()
    if a.numel() != b.numel() and not (a.numel() == 1 or b.numel() == 1):
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = torch.broadcast_tensors(a.reshape(-1), b.reshape(-1))
    err = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-6)
    return None if err <= rtol * scale else f"max difference {err:.3g} (of {scale:.3g})"


def _has_tensor(v) -> bool:
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return isinstance(v, torch.Tensor)


def one_step_agreement(name: str, trained: Trained, pipe, call: dict[str, Any]) -> list[str]:
    """Reproduce the pipeline's denoiser call of step `STEP` with lorakit's training `loss` (see
    the module docstring); return the differences found (empty list: they agree)."""
    fam = FAMILIES[name]
    comps, x0 = trained.comps, trained.latents
    denoiser = getattr(comps, fam.denoiser_name)
    sched = pipe.scheduler
    problems = []
    if name in ("sd3", "flux"):
        from lorakit.models.flux import pack_latents, unpack_latents

        h, w = x0.shape[-2:]
        x = call["hidden_states"]
        x = unpack_latents(x, h, w) if name == "flux" else x
        sigma, sigma_next = sched.sigmas[STEP].item(), sched.sigmas[STEP + 1].item()
        noise = (x - (1 - sigma) * x0) / sigma
        # FlowMatchEuler: x_next = x + (σ_next - σ)·v; this v lands on the image's next point
        ideal = ((1 - sigma_next) * x0 + sigma_next * noise - x) / (sigma_next - sigma)
        ideal = pack_latents(ideal) if name == "flux" else ideal
        timesteps = torch.tensor([sigma])
    else:
        x, t = call["sample"], call["timestep"]
        t = round(float(t.reshape(-1)[0]))
        abar = sched.alphas_cumprod[t].double()
        noise = ((x.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()).float()
        ideal = noise  # epsilon: the noise that made the pipeline's input from the image
        timesteps = torch.tensor([t])
    seen: list[dict[str, Any]] = []

    def capture(module, args, kwargs):
        seen.append(_bound(module, args, kwargs))

    def replace(module, args, kwargs, output):
        return (ideal.to(output[0].dtype),)

    hooks = [
        denoiser.register_forward_pre_hook(capture, with_kwargs=True),
        denoiser.register_forward_hook(replace, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            loss = fam.loss(comps, denoiser, x0, trained.cond, noise, timesteps, trained.train)
    finally:
        for hook in hooks:
            hook.remove()
    ours = seen[0]
    for key in sorted(set(call) | set(ours)):
        theirs, mine = call.get(key), ours.get(key)
        if _has_tensor(theirs) or _has_tensor(mine):
            why = _differs(mine, theirs)
            if why:
                problems.append(f"denoiser input '{key}': {why}")
    if loss.item() > 1e-8 * max(1.0, ideal.pow(2).mean().item()):
        problems.append(f"training target is not what the sampler steps with (loss {loss:.3g})")
    if name in ("sd3", "flux"):
        problems += _shift_agreement(name, trained, pipe, call)
    return problems


def _shift_agreement(name: str, trained: Trained, pipe, call) -> list[str]:
    """The training sigma sampler's shift (its median m of a shifted symmetric logit-normal is
    shift(½), so e^μ = m / (1 - m)) equals the pipeline's schedule shift."""
    fam = FAMILIES[name]
    x0 = trained.latents
    tc = dataclasses.replace(trained.train, timestep_sampling="shift", logit_mean=0.0)
    _, sigmas = fam.noise_and_timesteps(
        trained.comps, x0.expand(4096, *x0.shape[1:]), torch.Generator().manual_seed(7), tc
    )
    m = sigmas.median().item()
    ours = m / (1 - m)
    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        tokens = call["hidden_states"].shape[1]
        theirs = math.exp(
            calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )
    else:
        theirs = float(config.shift)
    if abs(math.log(ours / theirs)) > 0.1:
        return [f"training samples sigmas with shift {ours:.3f}, the pipeline uses {theirs:.3f}"]
    return []


def run_agreement(
    name: str, out: Path, setting: Setting, fault: str | None = None, baseline: bool = True
) -> Agreement:
    """Train, export, sample, compare (see the module docstring), with `fault` (a `FAULTS`
    key: a deliberate bug in lorakit's training side) if given. One torch thread: these tiny
    models run 1–4× faster on one thread than on two (thread sync dominates their small ops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FAULTS[fault](FAMILIES[name]) if fault else contextlib.nullcontext():
            return _run_agreement(name, out, setting, baseline)
    finally:
        torch.set_num_threads(threads)


def _run_agreement(name: str, out: Path, setting: Setting, baseline: bool) -> Agreement:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    trained = train_and_export(name, out, setting)
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels, _ = training_image(setting.res)
    _, fresh = agreement_components(name, pixels)
    got, pipe, call = sample_latents(
        name, fresh, trained.caption, setting.seeds, setting.res, lora=trained.path
    )
    before = []
    if baseline:
        _, plain = agreement_components(name, pixels)
        plain_latents, _, _ = sample_latents(
            name, plain, trained.caption, setting.seeds, setting.res
        )
        before = [similarity(x, trained.latents) for x in plain_latents]
    times["sample"] = time.perf_counter() - t0
    problems = ["no denoiser call captured"] if call is None else []
    if call is not None:
        problems = one_step_agreement(name, trained, pipe, call)
    cosines = [similarity(x, trained.latents) for x in got]
    return Agreement(cosines, before, problems, trained.losses, times)


# --- deliberate faults: bugs put into lorakit's training side (sampling is diffusers' own) ------


def _patch(target, attr: str, value):
    @contextlib.contextmanager
    def cm():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, attr, value)
            yield

    return cm()


def _wrap_predict(fam, change_t: Callable[[torch.Tensor], torch.Tensor]):
    """The family's `predict` passing changed timesteps to the denoiser (the noisy input, built
    from the true timesteps, is unchanged)."""
    original = type(fam).predict

    def predict(self, denoiser, noisy, timesteps, cond):
        return original(self, denoiser, noisy, change_t(timesteps), cond)

    return _patch(type(fam), "predict", predict)


def _ddpm_schedule(**changes):
    """The UNet families' training noise schedule (`_training_scheduler`) with config changes."""
    from diffusers import DDPMScheduler

    from lorakit.models import ddpm

    original = ddpm._training_scheduler

    def training_scheduler(c):
        return DDPMScheduler.from_config(original(c).config, **changes)

    return _patch(ddpm, "_training_scheduler", training_scheduler)


def _fault_target(fam):
    """Flow: ε (the noise) as the target instead of the velocity noise - x0. UNet families:
    v-prediction instead of the model's ε."""
    if fam.name in ("sd3", "flux"):
        from lorakit.models import flow

        original = flow.noisy_and_target

        def noisy_and_target(latents, noise, sigmas):
            noisy, _ = original(latents, noise, sigmas)
            return noisy, noise.to(noisy.device).float()

        return _patch(flow, "noisy_and_target", noisy_and_target)
    return _ddpm_schedule(prediction_type="v_prediction")


def _fault_timestep_scale(fam):
    """SD3: σ instead of σ·1000. FLUX: σ·1000 (it scales ×1000 itself). UNets: t / 1000."""
    if fam.name == "sd3":
        return _wrap_predict(fam, lambda t: t / 1000.0)
    if fam.name == "flux":
        return _wrap_predict(fam, lambda t: t * 1000.0)
    return _wrap_predict(fam, lambda t: t.float() / 1000.0)


def _fault_shift(fam):
    """Flow: the input noised at the shifted σ' = 3σ/(1+2σ) while the timestep says σ (a shift
    applied on one side only)."""
    from lorakit.models import flow

    original = flow.noisy_and_target

    def noisy_and_target(latents, noise, sigmas):
        return original(latents, noise, flow.time_shift(sigmas.clamp(1e-5, 1 - 1e-5), math.log(3)))

    return _patch(flow, "noisy_and_target", noisy_and_target)


def _fault_sampler_shift(fam):
    """Flow: the timestep sampler's shift ignored (shift 1: sigmas centred on ½)."""
    original = type(fam).noise_and_timesteps

    def noise_and_timesteps(self, components, latents, generator, train):
        return original(self, components, latents, generator, dataclasses.replace(
            train, flow_shift=1.0
        ))  # fmt: skip

    return _patch(type(fam), "noise_and_timesteps", noise_and_timesteps)


def _fault_schedule(fam):
    """UNets (the DDPM analogue of a wrong shift): noised with diffusers' default linear betas
    (1e-4 … 0.02) instead of the model's scaled-linear schedule."""
    return _ddpm_schedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _fault_ids(fam):
    """FLUX: image position ids transposed, (0, col, row) instead of (0, row, col)."""
    from lorakit.models import flux

    original = flux.image_ids

    def image_ids(h, w, device=None, dtype=torch.float32):
        return original(h, w, device, dtype)[:, [0, 2, 1]]

    return _patch(flux, "image_ids", image_ids)


FAULTS: dict[str, Callable] = {
    "target": _fault_target,
    "timestep_scale": _fault_timestep_scale,
    "shift": _fault_shift,
    "sampler_shift": _fault_sampler_shift,
    "schedule": _fault_schedule,
    "ids": _fault_ids,
}
FAULTS_OF = {
    "sd15": ("target", "timestep_scale", "schedule"),
    "sdxl": ("target", "timestep_scale", "schedule"),
    "sd3": ("target", "timestep_scale", "shift", "sampler_shift"),
    "flux": ("target", "timestep_scale", "shift", "sampler_shift", "ids"),
}


def failures(result: Agreement, setting: Setting) -> list[str]:
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


@pytest.mark.parametrize("name", list(DEFAULT))
def test_trained_lora_samples_its_training_image(name, tmp_path):
    result = run_agreement(name, tmp_path, DEFAULT[name])
    print(name, result.summary())
    assert not failures(result, DEFAULT[name]), result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_trained_lora_samples_its_training_image_full(name, tmp_path):
    result = run_agreement(name, tmp_path, SLOW[name])
    print(name, result.summary())
    assert not failures(result, SLOW[name]), result.summary()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "fault"), [(n, f) for n, faults in FAULTS_OF.items() for f in faults]
)
def test_fault_is_caught(name, fault, tmp_path):
    """Each deliberate training-side bug fails the default-run test."""
    result = run_agreement(name, tmp_path, DEFAULT[name], fault=fault, baseline=False)
    print(name, fault, result.summary(), failures(result, DEFAULT[name]))
    assert failures(result, DEFAULT[name]), result.summary()
