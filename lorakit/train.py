"""The training loop: one function, top to bottom, with named helpers.

    train(config, data_dir)
      read images + captions → load the base model → cache latents and caption embeddings
      → inject LoRA → optimizer + LR schedule → [sample at step 0] → loop:
          batch from the cache → family.loss → backward → clip → step
          → log every `train.log_every`, export every `train.save_every`,
            sample every `sample.every`
      → final export (kohya + diffusers) and sample grid.

Everything random (LoRA init, data order, noise, timesteps) comes from generators seeded by
`train.seed`, so the same config gives byte-identical adapters on the same machine.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.config import Config, TrainConfig
from lorakit.data import load_image, scan_folder
from lorakit.errors import ConfigError, LorakitError
from lorakit.export import EXPORTERS, write_adapter
from lorakit.export.metadata import training_metadata
from lorakit.fileio import atomic_write_text
from lorakit.lora import extract_adapter, inject_lora
from lorakit.models import Family, load_model
from lorakit.progress import Reporter
from lorakit.sampling import grid_spec, render_grid


@dataclass
class TrainResult:
    out_dir: Path
    adapters: dict[str, Path]
    """Format name → final adapter file."""
    samples: list[Path]
    losses: dict[int, float]
    """Step → mean loss over the logging window ending there."""
    family: Family
    components: Any
    """The base components with the trained LoRA still injected (for checks)."""
    config: Config
    checkpoints: list[Path] = field(default_factory=list)


def train(config: Config, data_dir: str | Path, reporter: Reporter | None = None) -> TrainResult:
    from accelerate import Accelerator

    c = config
    out = Path(c.train.out)
    accelerator = Accelerator(
        cpu=_use_cpu(c.train),
        mixed_precision=c.train.mixed_precision,
        gradient_accumulation_steps=c.train.grad_accum,
    )
    _check_precision(c.train, accelerator.device)
    torch.manual_seed(c.train.seed)

    # -- data and model -----------------------------------------------------------------------
    items = scan_folder(data_dir, c.data.caption_ext, c.data.trigger, c.data.default_caption)
    if c.train.batch_size > len(items):
        raise ConfigError(
            f"train.batch_size = {c.train.batch_size} but '{data_dir}' has only {len(items)} "
            f"images. Lower train.batch_size to {len(items)} or less, or add images."
        )
    if accelerator.is_main_process:
        _claim_output(out, c.train.overwrite)
    family, comps = load_model(c.model)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        c.train.mixed_precision
    ]
    device = accelerator.device
    denoiser = getattr(comps, family.denoiser_name)
    denoiser.to(device, weight_dtype)
    for name, module in family.frozen_modules(comps).items():
        # The VAE stays fp32: SD-family VAEs overflow in fp16.
        module.to(device, torch.float32 if name == "vae" else weight_dtype)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", c.to_toml())

    captions = [it.caption for it in items]
    latents = _encode_images(family, comps, items, c, device)
    cond = _encode_captions(family, comps, captions)
    if device.type != "cpu" and c.sample.every == 0:
        for module in family.frozen_modules(comps).values():
            module.to("cpu")  # only the denoiser is needed from here on

    # -- adapter, optimizer, schedule -----------------------------------------------------------
    params = inject_lora(denoiser, c.lora, c.train.seed)
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    if c.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = build_optimizer(params, c.train, device)
    lr_schedule = build_lr_schedule(optimizer, c.train, accelerator.num_processes)
    denoiser, optimizer, lr_schedule = accelerator.prepare(denoiser, optimizer, lr_schedule)

    noise_gen = torch.Generator("cpu").manual_seed(c.train.seed)
    order_gen = torch.Generator("cpu").manual_seed(c.train.seed + 1)
    batches = _batches(len(items), c.train.batch_size, order_gen)
    started = time.time()
    meta = training_metadata(c, family, captions, len(items), started, 0, Path(data_dir).name)

    sample_spec = grid_spec(c.sample, c.data.trigger, c.data.resolution) if c.sample.every else None
    result = TrainResult(out, {}, [], {}, family, comps, c)
    reporter = reporter or Reporter(c.train.steps)
    _banner(reporter, c, len(items), str(data_dir), accelerator.num_processes)

    def sample(step: int) -> None:
        if sample_spec is None or not accelerator.is_main_process:
            return
        path = out / "samples" / f"step-{step:06d}.png"
        _render(family, comps, denoiser, accelerator, sample_spec, c, step, path)
        result.samples.append(path)
        reporter.message(f"sample grid: {path}")

    def save(step: int, final: bool) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        meta.update(ss_steps=str(step))
        adapter = extract_adapter(family, comps, meta)
        folders = [out / "checkpoints" / f"step-{step:06d}"] if not final else []
        for folder in [*folders, out]:
            for fmt in c.export.formats:
                path = write_adapter(
                    adapter, fmt, EXPORTERS[fmt].default_path(folder, c.export.name)
                )
                if folder == out:
                    result.adapters[fmt] = path
        if folders:
            result.checkpoints.append(folders[0])
            reporter.message(f"saved step {step}: {folders[0]}")

    # -- the loop -------------------------------------------------------------------------------
    step = 0
    window = torch.zeros((), device=device)
    window_n = 0
    with reporter:
        if c.sample.every:
            sample(0)
        try:
            for step in range(1, c.train.steps + 1):
                for _ in range(c.train.grad_accum):
                    idx = next(batches)
                    lat = latents[idx].to(device, weight_dtype)
                    batch_cond = {k: v[idx].to(device, weight_dtype) for k, v in cond.items()}
                    noise, timesteps = family.noise_and_timesteps(comps, lat, noise_gen, c.train)
                    with accelerator.accumulate(denoiser), accelerator.autocast():
                        loss = family.loss(
                            comps, denoiser, lat, batch_cond, noise, timesteps, c.train
                        )
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and c.train.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, c.train.max_grad_norm)
                        optimizer.step()
                        lr_schedule.step()
                        optimizer.zero_grad(set_to_none=True)
                    window += loss.detach()  # summed on device: no host sync per step
                    window_n += 1
                if step % c.train.log_every == 0 or step == c.train.steps:
                    mean = (window / window_n).item()
                    _check_finite(mean, step, c.train)
                    result.losses[step] = mean
                    reporter.update(step, mean, lr_schedule.get_last_lr()[0])
                    window.zero_()
                    window_n = 0
                if c.train.save_every and step % c.train.save_every == 0 and step < c.train.steps:
                    save(step, final=False)
                if c.sample.every and step % c.sample.every == 0:
                    sample(step)
        except KeyboardInterrupt:
            if step > 0:
                save(step, final=False)
                reporter.message(f"Interrupted at step {step}; the adapter so far was saved.")
            raise
        save(c.train.steps, final=True)
        if c.sample.every and c.train.steps % c.sample.every:
            sample(c.train.steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_summary(result, started)
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------
# helpers


RUN_OUTPUTS = ("checkpoints", "samples", "diffusers", "run.json", "config.toml")


def _claim_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run or other files, unless allowed."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"train.out '{out}' is a file; choose a folder for the run's outputs.")
    if (out / "config.toml").is_file():
        has_work = any(out.glob("*.safetensors")) or any(
            (out / d).is_dir() and any((out / d).iterdir()) for d in ("checkpoints", "samples")
        )
        if has_work and not overwrite:
            raise ConfigError(
                f"'{out}' already holds a lorakit run. Choose another --out, or pass --overwrite "
                "to replace that run's outputs (its adapters, checkpoints and sample grids)."
            )
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for adapter in out.glob("*.safetensors"):
            adapter.unlink()
    elif any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"train.out '{out}' is a non-empty folder that is not a lorakit run. Choose an empty "
            "or new folder (lorakit does not write among other files unless you pass --overwrite)."
        )


def _use_cpu(t: TrainConfig) -> bool:
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device = 'cuda' but no CUDA GPU is visible to torch here. Check the driver and "
            "that a CUDA build of torch is installed, or set train.device = 'cpu'."
        )
    return t.device == "cpu" or not torch.cuda.is_available()


def _check_precision(t: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu" and t.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision = 'fp16' needs a GPU; on the CPU use 'bf16' or 'no'."
        )


def _check_finite(loss: float, step: int, t: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise LorakitError(
            f"The training loss became {loss} at step {step}: training diverged. Lower train.lr "
            f"(now {t.lr}), keep train.max_grad_norm > 0, or use train.mixed_precision = 'bf16' "
            "instead of 'fp16'. Adapters saved before this step are intact."
        )


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless stream of index batches: a fresh seeded permutation each epoch, last partial
    batch dropped (every step sees a full batch)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


@torch.no_grad()
def _encode_images(family: Family, comps, items, c: Config, device) -> torch.Tensor:
    """All images → latents, once (kept on CPU; a batch is moved to the device when used).

    With `data.center_crop = false` each image gets one random crop drawn from `train.seed`.
    """
    rng = None if c.data.center_crop else random.Random(c.train.seed)
    out = []
    for start in range(0, len(items), 8):
        chunk = items[start : start + 8]
        pixels = torch.stack(
            [load_image(it.path, c.data.resolution, c.data.center_crop, rng) for it in chunk]
        )
        out.append(family.encode_images(comps, pixels.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _encode_captions(family: Family, comps, captions: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct caption is encoded once; the result is indexed like the images."""
    unique = sorted(set(captions))
    encoded = family.encode_prompts(comps, unique)
    where = torch.tensor([unique.index(cap) for cap in captions])
    return {k: v.float().cpu()[where] for k, v in encoded.items()}


def build_optimizer(params, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if t.optimizer == "adamw8bit":
        problem = bnb_8bit_problem(device.type)
        if problem is None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
        if not t.optimizer_fallback:
            raise LorakitError(
                f"train.optimizer = 'adamw8bit' cannot run on this machine: {problem}. Fix the "
                "bitsandbytes install (`pip install -U bitsandbytes`; run `python -m "
                "bitsandbytes` for a diagnosis), or use --set train.optimizer=adamw, or allow "
                "the fallback with --set train.optimizer_fallback=true."
            )
        print(f"warning: 8-bit AdamW unavailable ({problem}); using torch AdamW as allowed.")
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


_BNB_PROBLEM: dict[str, str | None] = {}


def bnb_8bit_problem(device_type: str) -> str | None:
    """None when bitsandbytes' 8-bit AdamW really steps a tensor here, else why not."""
    if device_type not in _BNB_PROBLEM:
        try:
            import bitsandbytes as bnb

            p = torch.nn.Parameter(torch.ones(64, 64, device=device_type))  # ≥ 4096: 8-bit state
            opt = bnb.optim.AdamW8bit([p], lr=0.1)
            p.grad = torch.ones_like(p)
            opt.step()
            state = opt.state[p]
            ok = state["state1"].dtype == torch.uint8 and not torch.equal(
                p.detach(), torch.ones_like(p)
            )
            _BNB_PROBLEM[device_type] = None if ok else "the 8-bit step did not update the weights"
        except Exception as e:  # any failure means: not usable here
            _BNB_PROBLEM[device_type] = (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
    return _BNB_PROBLEM[device_type]


def build_lr_schedule(optimizer, t: TrainConfig, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process, hence the factor.
    return get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.warmup_steps * num_processes,
        num_training_steps=t.steps * num_processes,
    )


def _render(family, comps, denoiser, accelerator, spec, c: Config, step: int, path: Path) -> None:
    model = accelerator.unwrap_model(denoiser)
    frozen = family.frozen_modules(comps)
    device = accelerator.device
    for module in frozen.values():
        module.to(device)
    model.eval()
    try:
        pipe = family.pipeline(comps, c.sample.scheduler)
        title = f"{c.export.name} - step {step} - {c.model.name}"
        render_grid(pipe, spec, title, path)
    finally:
        model.train()
        if device.type != "cpu":
            for module in frozen.values():
                module.to("cpu")
            torch.cuda.empty_cache()


def _banner(reporter: Reporter, c: Config, n_images: int, data_dir: str, procs: int) -> None:
    eff = c.train.batch_size * c.train.grad_accum * procs
    per_epoch = max(1, n_images // c.train.batch_size)
    epochs = c.train.steps * c.train.grad_accum / per_epoch
    saves = (
        f"every {c.train.save_every} steps and at the end" if c.train.save_every else "at the end"
    )
    samples = f"step 0 and every {c.sample.every} steps" if c.sample.every else "off"
    reporter.message(
        f"[bold]lorakit[/bold] {c.model.name}: {n_images} images from {data_dir} → "
        f"{c.train.steps} steps × effective batch {eff} (≈{epochs:.1f} epochs), LoRA rank "
        f"{c.lora.rank} alpha {c.lora.alpha:g}, {c.train.optimizer}, lr {c.train.lr:g}. "
        f"Saves {saves}; samples {samples}. Output: {c.train.out}"
    )


def _write_summary(result: TrainResult, started: float) -> None:
    summary = {
        "adapters": {k: str(v) for k, v in result.adapters.items()},
        "samples": [str(p) for p in result.samples],
        "checkpoints": [str(p) for p in result.checkpoints],
        "losses": result.losses,
        "seconds": round(time.time() - started, 2),
    }
    atomic_write_text(result.out_dir / "run.json", json.dumps(summary, indent=2))
