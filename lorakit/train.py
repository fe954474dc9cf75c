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

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorakit import checkpoint as ckpt
from lorakit.config import Config, TrainConfig
from lorakit.data.buckets import auto_step, family_step
from lorakit.data.cache import (
    LatentCache,
    TextEncoderCache,
    latent_key,
    module_identity,
    vae_identity,
)
from lorakit.data.training import caption_for_step, epoch_batches, load_training_set
from lorakit.errors import ConfigError, LorakitError
from lorakit.evaluate import heldout_indices, heldout_loss
from lorakit.export import EXPORTERS, write_adapter
from lorakit.export.metadata import training_metadata
from lorakit.fileio import atomic_write_text
from lorakit.lora import (
    extract_adapter,
    inject_lora,
    inject_text_encoder_lora,
    text_encoder_targets,
)
from lorakit.models import Family, load_model, resolve_family
from lorakit.palette import extract_palette, palette_distance
from lorakit.progress import Reporter
from lorakit.report import History, write_report
from lorakit.sampling import (
    encode_prompt_rows,
    grid_spec,
    render_cells,
    render_grid_result,
    sample_due,
)
from lorakit.tracking import init_trackers, log_grid, log_scalars


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
    report: Path | None = None


def train(config: Config, data_dir: str | Path, reporter: Reporter | None = None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    c = config
    if "WORLD_SIZE" not in os.environ:
        # A second run in one process (tests, notebooks) may use another precision.
        AcceleratorState._reset_state()
    out = Path(c.train.out)
    accelerator = Accelerator(
        mixed_precision=c.train.mixed_precision,
        gradient_accumulation_steps=c.train.grad_accum,
        **_device_kwargs(c.train),
    )
    _cpu_fsdp(accelerator)
    _check_distributed(accelerator, c)
    if accelerator.state.deepspeed_plugin is not None:
        # lorakit prepares no DataLoader, from which accelerate would take the micro-batch size.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = c.train.batch_size
    sharded = _sharded(accelerator)  # FSDP: extraction, checkpoints, samples are collectives
    _check_precision(c.train, accelerator.device)
    from lorakit.planner import check_before_training  # cheap; returns at once on CPU / tiny

    memory_warning = check_before_training(c, accelerator.device, c.train.strict_memory)
    torch.manual_seed(c.train.seed)

    # -- resume point, data, model ----------------------------------------------------------
    resume_from = ckpt.resolve_resume(out, c.train.resume) if c.train.resume else None
    state = ckpt.load_state(resume_from) if resume_from else None
    if resume_from:
        _check_resume_config(resume_from, c)
    elif accelerator.is_main_process:
        _claim_output(out, c.train.overwrite)
    accelerator.wait_for_everyone()
    cache_dir = Path(c.data.cache_dir) if c.data.cache_dir else out / "cache"
    run_family = resolve_family(c.model)[0]
    data_cfg = _bucket_granularity(c, run_family)
    with accelerator.main_process_first():  # rank 0 prepares and caches, the others then read
        data = load_training_set(
            data_dir,
            data_cfg,
            c.train.batch_size,
            c.train.seed,
            pixel_multiple=run_family.pixel_multiple,
        )
    records = data.records
    family, comps = load_model(c.model)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        c.train.mixed_precision
    ]
    device = accelerator.device
    denoiser = getattr(comps, family.denoiser_name)
    quantized = getattr(denoiser, "is_quantized", False)
    if quantized and device.type == "cuda":
        # bitsandbytes put the quantized weights on the GPU while loading; parked in host memory
        # while the encoders cache, so they do not share it (FLUX: T5-XXL 9 GiB + NF4 5.7 GiB).
        # A bitsandbytes that cannot move quantized weights leaves them (and the `to(device)`
        # after caching brings back any that did move).
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            denoiser.to("cpu")
    for name, module in family.frozen_modules(comps).items():
        module.to(device, _frozen_dtype(name, module, weight_dtype))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", c.to_toml())

    captions = [r.caption for r in records]
    train_te = c.lora.train_text_encoder
    encode_each_step = train_te or c.data.shuffle_tags  # captions vary per step: no text cache
    with accelerator.main_process_first():
        latents = _encode_images(family, comps, data, cache_dir, device, accelerator)
        cond = (
            {}
            if encode_each_step
            else _encode_captions(
                family, comps, captions, c.data.caption_dropout > 0, cache_dir, accelerator
            )
        )
    sampling_on = bool(c.sample.every or c.sample.every_minutes or c.sample.every_epochs)
    sample_spec = grid_spec(c.sample, c.data.trigger, c.data.resolution) if sampling_on else None
    # The preview prompts are fixed: encoded once while the encoders are on the device, grids then
    # need only the denoiser and the VAE there (FLUX/SD3: not T5-XXL's 9 GiB). Text-encoder LoRA
    # changes the embeddings every step: those grids encode the strings each time.
    preview_embeds = (
        encode_prompt_rows(family.pipeline(comps, c.sample.scheduler), sample_spec)
        if sample_spec is not None and not train_te
        else None
    )
    image_cond = _image_conditioning(family, comps, records)
    if device.type != "cpu" and not encode_each_step:
        for module in family.frozen_modules(comps).values():
            module.to("cpu")  # only the denoiser is needed from here on
    # The denoiser comes to the device only now: during caching the encoders have it to themselves.
    if quantized:
        denoiser.to(device)  # bitsandbytes weights keep the dtypes they were quantized to
    else:
        denoiser.to(device, weight_dtype)

    # -- adapter, optimizer, schedule -------------------------------------------------------
    targets = c.lora.target_modules or list(family.default_targets)
    params = inject_lora(denoiser, replace(c.lora, target_modules=targets), c.train.seed)
    if train_te:
        params += inject_text_encoder_lora(family, comps, c.lora, c.train.seed)
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    if c.train.gradient_checkpointing:
        if c.train.offload_activations and device.type == "cuda":
            from lorakit.offload import OffloadedCheckpoint

            denoiser.enable_gradient_checkpointing(
                gradient_checkpointing_func=OffloadedCheckpoint()
            )
        else:
            denoiser.enable_gradient_checkpointing()
    denoiser.train()
    text_encoders = [getattr(comps, t.component) for t in text_encoder_targets(family, comps)]
    if train_te:
        for te in text_encoders:
            if c.train.gradient_checkpointing:
                te.gradient_checkpointing_enable()
            te.train()
    if c.train.compile:
        # After LoRA injection (parameters are shared with comps); the first steps compile.
        denoiser = torch.compile(denoiser, backend=c.train.compile_backend)
    optimizer = build_optimizer(params, c.train, device, lr=scaled_lr(c, accelerator.num_processes))
    lr_schedule = build_lr_schedule(optimizer, c.train, accelerator.num_processes)
    names = {id(p): n for n, p in denoiser.named_parameters()}
    lora_names = [names[id(p)] for p in params if id(p) in names]
    denoiser, optimizer, lr_schedule = accelerator.prepare(denoiser, optimizer, lr_schedule)
    if sharded:  # FSDP2 replaced the denoiser's parameters by sharded DTensors
        now = dict(accelerator.unwrap_model(denoiser).named_parameters())
        params = [now[n] for n in lora_names]

    world, rank = accelerator.num_processes, accelerator.process_index
    order = BatchOrder(records, c.train.batch_size, c.train.seed, world, rank)
    result = TrainResult(out, {}, [], {}, family, comps, c)
    start_step = 0
    if state is not None:
        start_step = _restore(state, params, optimizer, lr_schedule, accelerator, order)
        result.losses = {int(k): v for k, v in state.history.get("losses", {}).items()}
        result.samples = [Path(p) for p in state.history.get("samples", [])]
    history = History.from_dict(state.history["report"]) if state else History()
    init_trackers(accelerator, c, out)
    eval_idx = _eval_subset(records, c.eval.images)
    if c.eval.palette_colors and accelerator.is_main_process and history.brand_palette is None:
        history.brand_palette = _brand_palette(data, c.eval.palette_colors, c.train.seed)
    started = time.time()
    meta = training_metadata(
        c, family, captions, len(records), started, 0, Path(data_dir).name, components=comps
    )
    last_sample = time.monotonic()
    reporter = reporter or Reporter(
        c.train.steps, device=device, enabled=accelerator.is_main_process
    )
    reporter.start_at(start_step)
    _banner(reporter, c, data, str(data_dir), accelerator.num_processes, order, resume_from)
    if sharded:
        reporter.message(
            f"FSDP2: the denoiser's weights, gradients and optimizer state are sharded over "
            f"{accelerator.num_processes} processes"
        )
    elif _deepspeed(accelerator) and device.type == "cpu":
        reporter.message(
            f"DeepSpeed ZeRO-2 on the CPU (gloo): optimizer state and gradients are partitioned "
            f"over {accelerator.num_processes} processes"
        )
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and device.type == "cpu":
        reporter.message(
            "[yellow]warning:[/yellow] train.device = 'cpu' on a machine with a GPU: accelerate "
            "runs the DeepSpeed config as plain data parallel (DDP) on the CPU."
        )
    if memory_warning:
        reporter.message(f"[yellow]warning:[/yellow] {memory_warning}")

    sampled: set[int] = set()  # steps sampled / scored in this session, the same on every rank
    scored: set[int] = set()

    def sample(step: int) -> None:
        nonlocal last_sample
        last_sample = time.monotonic()
        sampled.add(step)
        if sample_spec is None or not (accelerator.is_main_process or sharded):
            return
        path = out / "samples" / f"step-{step:06d}.png"
        if not accelerator.is_main_process:  # FSDP: every rank runs the sharded denoiser
            path = None
        with torch.random.fork_rng(devices=_cuda_devices(device)):  # never perturb training RNG
            trainable = [_plain(accelerator, denoiser), *(text_encoders if train_te else [])]
            grid = _render(family, comps, trainable, accelerator, sample_spec, c, step, path,
                           keep_on_device=encode_each_step, embeds=preview_embeds)  # fmt: skip
        if grid is None:
            return
        brand = history.brand_palette
        pal = palette_distance(grid.images(), brand, seed=c.train.seed) if brand else None
        history.add_grid(step, path, palette=pal)
        log_grid(accelerator, step, path)
        log_scalars(accelerator, step, palette_distance=pal)
        result.samples.append(path)
        reporter.last_grid = str(path)
        reporter.message(f"sample grid: {path}" + (f" (palette ΔE {pal:.1f})" if pal else ""))

    def score(step: int, path: Path | str = "") -> None:
        """Held-out loss of the current adapter on the fixed validation subset."""
        scored.add(step)
        if not eval_idx or not (accelerator.is_main_process or sharded):
            return
        lat = torch.stack([latents[i] for i in eval_idx])
        caps = [captions[i] for i in eval_idx]
        with torch.no_grad():
            if encode_each_step:
                ev_cond = family.encode_prompts(comps, caps)
            else:
                ev_cond = {k: torch.stack([v[cap] for cap in caps]) for k, v in cond.items()}
            for k, v in image_cond.items():
                ev_cond[k] = torch.cat([v[i] for i in eval_idx])
        value = heldout_loss(family, comps, _plain(accelerator, denoiser), lat, ev_cond,
                             c.train, c.eval.seed, timesteps=c.eval.timesteps)  # fmt: skip
        if not accelerator.is_main_process:
            return
        history.add_checkpoint(step, path, heldout=value)
        log_scalars(accelerator, step, heldout_loss=value)

    def extract(step: int):
        """The adapter on rank 0 (None elsewhere); under FSDP every rank must call this."""
        if not (accelerator.is_main_process or sharded):
            return None
        meta.update(ss_steps=str(step))
        return extract_adapter(family, comps, meta)

    def export_to(folder: Path, step: int, adapter) -> dict[str, Path]:
        return {
            fmt: write_adapter(
                adapter,
                fmt,
                EXPORTERS[fmt].default_path(folder, c.export.name),
                naming=c.export.kohya_names,
                dtype=c.export.dtype,
            )
            for fmt in c.export.formats
        }

    def save_checkpoint(step: int, adapter: Any = ...) -> None:
        """`adapter`: the one `extract(step)` gave, if the caller already extracted it (under FSDP
        extraction is a collective: every rank extracts here or every rank already did)."""
        accelerator.wait_for_everyone()
        if adapter is ...:
            adapter = extract(step)
        saved = {
            "losses": result.losses,
            "samples": [str(p) for p in result.samples],
            "report": history.to_dict(),
        }
        if accelerator.is_main_process or sharded or _deepspeed(accelerator):
            state = _capture(step, order, params, optimizer, lr_schedule, accelerator, saved)
        final = ckpt.step_dir(out, step)
        if accelerator.is_main_process:
            try:
                tmp = ckpt.begin(out, step)
                export_to(tmp, step, adapter)
                atomic_write_text(tmp / "config.toml", c.to_toml())
                _fault("save", step)
                ckpt.save_state(tmp, state)
                final = ckpt.commit(out, step, tmp, {"step": step, "time": time.time()})
            except Exception as e:  # anything: the torn folder goes, one paragraph says why
                shutil.rmtree(ckpt.partial_dir(out, step), ignore_errors=True)
                raise _save_failed(out, step, e, result.adapters) from e
            ckpt.prune(out, c.train.keep_last)
        if not c.eval.every:
            score(step, EXPORTERS[c.export.formats[0]].default_path(final, c.export.name))
        if not accelerator.is_main_process:
            return
        result.checkpoints.append(final)
        reporter.last_checkpoint = str(final)
        reporter.message(f"saved step {step}: {final}")

    # -- the loop ---------------------------------------------------------------------------
    step = start_step
    window = torch.zeros((), device=device)
    window_n = 0
    grad_norm = None
    consensus = Consensus(accelerator.reduce if world > 1 else None, device)
    stop_signal = 0  # the stop request acted on: this process's, or all ranks' agreed one
    with reporter, StopRequest() as stop:
        if start_step == 0:
            if sampling_on:
                sample(0)
            score(0)
        for step in range(start_step + 1, c.train.steps + 1):
            epoch_before = order.epoch
            _fault(f"signal-rank{rank}", step)
            for micro in range(c.train.grad_accum):
                idx = order.next()
                _trace_batch(rank, step, idx)
                first_uid = ((step - 1) * c.train.grad_accum + micro) * world * c.train.batch_size
                uid0 = first_uid + rank * len(idx)
                lat = torch.stack([latents[i] for i in idx]).to(device, weight_dtype)
                caps = [
                    caption_for_step(captions[i], c.data, _sample_rng(c.train.seed, uid0 + j))
                    for j, i in enumerate(idx)
                ]
                if encode_each_step:
                    with torch.set_grad_enabled(train_te):
                        enc = family.encode_prompts_train(comps, caps)
                    batch_cond = {k: v.to(device, weight_dtype) for k, v in enc.items()}
                else:
                    batch_cond = {
                        k: torch.stack([v[cap] for cap in caps]).to(device, weight_dtype)
                        for k, v in cond.items()
                    }
                for k, v in image_cond.items():  # fp32: SDXL time ids are pixel counts
                    batch_cond[k] = torch.cat([v[i] for i in idx]).to(device)
                noise, timesteps = _noise(family, comps, lat, c, uid0)
                with accelerator.accumulate(denoiser), accelerator.autocast():
                    loss = family.loss(comps, denoiser, lat, batch_cond, noise, timesteps, c.train)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and c.train.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, c.train.max_grad_norm)
                    optimizer.step()
                    lr_schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                window += loss.detach()  # summed on device: no host sync per step
                window_n += 1
                agreed, bad_step = consensus.check(stop.requested, loss, step)
                if bad_step:
                    raise _diverged(bad_step, c.train, out)
                stop_signal = max(stop_signal, agreed)
            if step % c.train.log_every == 0 or step == c.train.steps:
                mean = (accelerator.reduce(window, "mean") / window_n).item()
                result.losses[step] = mean
                lr = lr_schedule.get_last_lr()[0]
                history.losses[step], history.lr[step] = mean, lr
                reporter.update(step, mean, lr, order.epoch)
                log_scalars(accelerator, step, loss=mean, lr=lr, grad_norm=_num(grad_norm))
                _check_scaler(accelerator, step, c.train, out)
                window.zero_()
                window_n = 0
            epoch_done = order.epoch > epoch_before
            if world == 1:  # nothing to agree on: act on a request at once, not a step late
                stop_signal = stop.requested
            if step < c.train.steps and (
                (c.train.save_every and step % c.train.save_every == 0)
                or (
                    c.train.save_every_epochs
                    and epoch_done
                    and order.epoch % c.train.save_every_epochs == 0
                )
                or stop_signal
            ):
                save_checkpoint(step)
            epoch_sample = (
                c.sample.every_epochs and epoch_done and order.epoch % c.sample.every_epochs == 0
            )
            if sample_spec is not None and (
                sample_due(c.sample, step, last_sample) or epoch_sample
            ):
                sample(step)
            if c.eval.every and step % c.eval.every == 0:
                score(step)
            if stop_signal and step < c.train.steps:
                raise Interrupted(stop_signal, step, out)
        bad_step = consensus.flush()[1]
        if bad_step:
            raise _diverged(bad_step, c.train, out)
        # The adapter before the final checkpoint: a checkpoint that cannot be written must not
        # cost the run its result.
        accelerator.wait_for_everyone()
        adapter = extract(c.train.steps)
        if accelerator.is_main_process:
            result.adapters = export_to(out, c.train.steps, adapter)
        if (c.train.save_every or c.train.save_every_epochs) and step > start_step:
            # resumable: a finished run can be extended
            save_checkpoint(c.train.steps, adapter)
        # Rank-independent conditions: under FSDP every rank must take part or none.
        if c.train.steps not in scored and not any(
            rec.step == c.train.steps for rec in history.checkpoints
        ):
            final_path = EXPORTERS[c.export.formats[0]].default_path(out, c.export.name)
            score(c.train.steps, result.adapters.get(c.export.formats[0], final_path))
        if (
            sampling_on
            and c.train.steps not in sampled
            and not any(g.step == c.train.steps for g in history.grids)
        ):
            sample(c.train.steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_summary(result, started)
        summary = {
            "data": f"{data_dir}: {data.summary()}",
            "held-out images": len(eval_idx),
            "brand palette": history.brand_palette.hex() if history.brand_palette else "off",
        }
        result.report = write_report(out, c, summary, history)
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------
# helpers


class BatchOrder:
    """Which records form the next batch of this process.

    Each epoch's list of GLOBAL batches (per-device batch × processes, one bucket each, repeats
    expanded, shuffled) is `epoch_batches(...)` — a pure function of (seed, epoch) — so
    (epoch, position) is all a checkpoint needs. Rank r trains on slice r of each global batch:
    ranks never share an image within a step or an epoch, and W processes at batch B see exactly
    the batches one process sees at batch W·B.
    """

    def __init__(self, records, batch_size: int, seed: int, world: int = 1, rank: int = 0):
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.world, self.rank = world, rank
        self.epoch, self.position = 0, 0
        self._batches = self._for_epoch(0)

    def _for_epoch(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.records, self.batch_size * self.world, self.seed, epoch)
        if not batches:
            raise ConfigError(
                f"No image bucket can fill a global batch of {self.batch_size * self.world} "
                f"(train.batch_size {self.batch_size} × {self.world} processes). Lower the batch "
                "size, add images, use fewer processes or turn off data.bucketing."
            )
        return batches

    def per_epoch(self) -> int:
        """Global steps (micro-batches per process) in one epoch."""
        return len(self._batches)

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._batches = self._for_epoch(epoch)

    def next(self) -> list[int]:
        bs = self.batch_size
        batch = self._batches[self.position][self.rank * bs : (self.rank + 1) * bs]
        self.position += 1
        if self.position == self.per_epoch():
            self.seek(self.epoch + 1, 0)
        return batch


def _trace_batch(rank: int, step: int, idx: list[int]) -> None:
    """LORAKIT_TRACE_BATCHES=FOLDER records which images each rank trained on (for tests)."""
    folder = os.environ.get("LORAKIT_TRACE_BATCHES")
    if folder:
        with open(Path(folder) / f"rank{rank}.txt", "a", encoding="utf-8") as f:
            f.write(f"{step} {' '.join(str(int(i)) for i in idx)}\n")


def _noise(family: Family, comps, latents: torch.Tensor, c: Config, first_uid: int):
    """Noise and timesteps drawn per sample from a generator seeded by (seed, sample number in
    the whole run): independent of batch layout and process count, and needs no RNG state to
    resume."""
    noises, steps = [], []
    for i in range(latents.shape[0]):
        uid = first_uid + i
        gen = torch.Generator("cpu").manual_seed(
            (c.train.seed * 0x9E3779B1 + uid * 0x85EBCA77) % 2**63
        )
        noise, t = family.noise_and_timesteps(comps, latents[i : i + 1], gen, c.train)
        noises.append(noise)
        steps.append(t)
    return torch.cat(noises), torch.cat(steps)


class Consensus:
    """The per-step flags (stop request, non-finite loss) without stalling the GPU. Under several
    processes every rank must act on the same stop request at the same step (or one waits forever
    in the next all-reduce), and all stop when any rank's loss is non-finite: `reduce(t, "max")`
    all-reduces the flags each micro-step (`reduce` None: one process, nothing to agree on).

    On CUDA the flags are copied to pinned memory without blocking and read one step later, so
    the host never waits for the GPU inside the loop (every rank reads the same reduced value at
    the same step, so they still agree). Elsewhere they are read at once.
    """

    def __init__(self, reduce, device: torch.device, lagged: bool | None = None):
        self.reduce = reduce
        self.lagged = device.type == "cuda" if lagged is None else lagged
        self.pending: tuple[torch.Tensor, Any, int] | None = None

    def check(self, signum: int, loss: torch.Tensor, step: int) -> tuple[int, int]:
        """(stop signal all ranks agree on, step whose loss was non-finite on some rank, or 0),
        as known by now: with the lag, the values of the previous call."""
        bad = (~torch.isfinite(loss.detach())).float()
        # new_full fills on the device: a torch.tensor(signum, device=...) copy would sync
        flags = torch.stack([bad.new_full((), float(signum)), bad])
        if self.reduce is not None:
            flags = self.reduce(flags, "max")
        if not self.lagged:
            return int(flags[0].item()), step if flags[1].item() else 0
        known = self.flush()
        host = torch.empty(2, dtype=flags.dtype, pin_memory=flags.is_cuda)
        host.copy_(flags, non_blocking=flags.is_cuda)
        event = None
        if flags.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (host, event, step)
        return known

    def flush(self) -> tuple[int, int]:
        """The values still in flight (the last step's), waiting for them; (0, 0) if none."""
        if self.pending is None:
            return 0, 0
        host, event, at = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return int(host[0]), at if host[1] else 0


class Interrupted(LorakitError):
    """SIGINT/SIGTERM: the run stopped cleanly after a checkpoint."""

    def __init__(self, signum: int, step: int, out: Path):
        name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(signum, f"signal {signum}")
        super().__init__(
            f"Stopped by {name} at step {step}; checkpoint saved in "
            f"{ckpt.step_dir(out, step)}. Continue with the same command plus --resume latest."
        )
        self.exit_code = 128 + int(signum)


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, stop. Second: abort now
    (still no torn files: every write is atomic)."""

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = signum
        print("\nStopping after this step and saving a checkpoint (press Ctrl-C again to abort).")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _fault(point: str, step: int) -> None:
    """Fault injection for crash-safety tests: LORAKIT_FAULT=kill-during-save@N kills the process
    in the middle of writing the checkpoint of step N; LORAKIT_FAULT=signal-rank1@N sends rank 1
    a SIGTERM during step N (only that rank: the ranks must agree to stop)."""
    fault = os.environ.get("LORAKIT_FAULT")
    if fault == f"kill-during-{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{point}@{step}" and point.startswith("signal-"):
        os.kill(os.getpid(), signal.SIGTERM)


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _cpu_fsdp(accelerator) -> None:
    """Run an FSDP accelerate config on the CPU too (gloo): accelerate 1.15 silently ignores FSDP
    on a CPU (it runs plain data parallel), which would leave lorakit's sharded code paths untested
    and print nothing. torch's FSDP2 (`fully_shard`) runs on CPU tensors; FSDP1 does not."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ConfigError(_FSDP1)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


_FSDP1 = (
    "The accelerate config selects FSDP version 1, which flattens parameters into shards that "
    "lorakit cannot read back as a LoRA (and which does not run on a CPU at all). Set "
    "`fsdp_version: 2` under fsdp_config in the accelerate config file (see "
    "presets/accelerate/fsdp.yaml), or use DDP (presets/accelerate/ddp.yaml)."
)


def _check_distributed(accelerator, c: Config) -> None:
    """Refuse what lorakit does not support under FSDP / DeepSpeed (in the worker processes)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        problem = distributed_problem(c, "FSDP", accelerator.state.fsdp_plugin.fsdp_version)
    elif kind == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = (ds.get("zero_optimization") or {}).get("stage")
        problem = distributed_problem(
            c, "DeepSpeed", 2, ds.get("gradient_accumulation_steps"), zero_stage=stage
        )
    else:
        return
    if problem:
        raise ConfigError(problem)


def check_accelerate_config(c: Config, path: Path) -> None:
    """The same refusal before `lorakit train --accelerate-config` launches any process."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--accelerate-config '{path}' cannot be read as YAML ({e}).") from None
    kind = str(doc.get("distributed_type", "")).upper()
    fsdp = doc.get("fsdp_config") or {}
    name = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}.get(kind)
    ds = doc.get("deepspeed_config") or {}
    problem = name and distributed_problem(
        c,
        name,
        int(fsdp.get("fsdp_version", 1)),
        ds.get("gradient_accumulation_steps"),
        zero_stage=ds.get("zero_stage"),
    )
    if problem:
        raise ConfigError(f"{path}: {problem}")


def distributed_problem(
    c: Config,
    name: str,
    fsdp_version: int = 2,
    grad_accum: int | str | None = None,
    zero_stage: int | None = None,
) -> str | None:
    """One paragraph on what `c` asks that lorakit does not support under FSDP / DeepSpeed."""
    if name == "FSDP" and fsdp_version != 2:
        return _FSDP1
    problems = []
    if c.train.optimizer != "adamw":
        problems.append(
            f"train.optimizer = '{c.train.optimizer}' (under {name} only torch AdamW is "
            "supported: sharded 8-bit/factored optimizer states cannot be checkpointed); set "
            "--set train.optimizer='adamw'"
        )
    if c.lora.train_text_encoder:
        problems.append(
            "lora.train_text_encoder = true (the text encoders are not sharded or synchronised "
            f"under {name}); set it to false"
        )
    if c.sample.every_minutes:
        problems.append(
            "sample.every_minutes (a clock-based schedule: ranks would disagree on when to render "
            "and wait on each other forever); use sample.every (steps) instead"
        )
    if c.train.compile:
        problems.append(f"train.compile = true (untested under {name}); set it to false")
    if name == "DeepSpeed" and zero_stage not in (None, 0, 1, 2):
        problems.append(
            f"zero_stage = {zero_stage} in the accelerate config (ZeRO-3 partitions the weights, "
            "which lorakit's adapter export and checkpoints cannot read back); set zero_stage: 2 "
            "(presets/accelerate/deepspeed-zero2.yaml) or use FSDP (presets/accelerate/fsdp.yaml)"
        )
    if name == "DeepSpeed" and grad_accum not in (None, "auto", c.train.grad_accum):
        problems.append(
            f"gradient_accumulation_steps = {grad_accum} in the accelerate config differs from "
            f"train.grad_accum = {c.train.grad_accum}; make them equal"
        )
    if not problems:
        return None
    return (
        f"This run uses {name} through its accelerate config, which lorakit supports only for "
        f"plain LoRA training: {'; '.join(problems)}. Or run with DDP "
        "(presets/accelerate/ddp.yaml or --num-processes N), which supports everything."
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: all ranks, same order) or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t` (a whole tensor of p's full shape) sharded the way parameter `p` is (FSDP2)."""
    if not hasattr(p, "device_mesh"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)


def _opt_params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _capture(step, order, params, optimizer, lr_schedule, accelerator, history):
    """Under FSDP and DeepSpeed ZeRO a collective (every rank gathers the LoRA and its optimizer
    state); the optimizer state always has the layout of a plain torch `state_dict()`."""
    from lorakit.zero import gather_state, zero_optimizer

    opt = gather_state(optimizer) if zero_optimizer(optimizer) else optimizer.state_dict()
    opt = {
        **opt,
        "state": {
            i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for i, st in sorted(opt["state"].items())
        },
    }
    return ckpt.TrainState(
        step=step,
        epoch=order.epoch,
        position=order.position,
        params=[_full(p.detach()) for p in params],
        optimizer=opt,
        scheduler=lr_schedule.state_dict(),
        scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        rng=ckpt.rng_state(),
        history=history,
    )


def _restore(state, params, optimizer, lr_schedule, accelerator, order) -> int:
    if len(state.params) != len(params) or any(
        a.shape != b.shape for a, b in zip(state.params, params, strict=True)
    ):
        raise LorakitError(
            "The checkpoint's LoRA does not match this config's LoRA (rank or target modules "
            "differ). Resume with the run's own config.toml."
        )
    with torch.no_grad():
        for p, saved in zip(params, state.params, strict=True):
            p.copy_(_like(saved, p) if hasattr(p, "device_mesh") else saved.to(p.device, p.dtype))
    opt_state = state.optimizer
    if any(hasattr(p, "device_mesh") for p in params):  # FSDP2: re-shard the whole state
        owners = _opt_params(optimizer)
        opt_state = {
            **opt_state,
            "state": {
                i: {
                    k: _like(v, owners[i]) if k != "step" and isinstance(v, torch.Tensor) else v
                    for k, v in st.items()
                }
                for i, st in sorted(opt_state["state"].items())
            },
        }
    from lorakit.zero import scatter_state, zero_optimizer

    if zero_optimizer(optimizer):  # DeepSpeed ZeRO-1/2: this rank's slice, after the params
        scatter_state(optimizer, opt_state)
    else:
        optimizer.load_state_dict(opt_state)
    lr_schedule.load_state_dict(state.scheduler)
    if state.scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    order.seek(state.epoch, state.position)
    ckpt.set_rng_state(state.rng)
    return state.step


# Keys that may change between a run and its resumption; everything else must match.
_RESUMABLE_CHANGES = {
    "train.steps", "train.save_every", "train.save_every_epochs", "train.keep_last",
    "train.log_every", "train.resume", "train.overwrite", "train.device", "export.title",
    "export.description",
}  # fmt: skip


def _check_resume_config(folder: Path, c: Config) -> None:
    from lorakit import config as cfg

    saved = cfg.build(
        cfg.check_layer(cfg.read_toml(folder / "config.toml", "Checkpoint config"), str(folder))
    )
    now, then = c.to_dict(), saved.to_dict()
    diff = [
        f"{s}.{k} ({then[s][k]!r} → {now[s][k]!r})"
        for s in now
        for k in now[s]
        if now[s][k] != then[s][k] and f"{s}.{k}" not in _RESUMABLE_CHANGES and s != "sample"
    ]
    if diff:
        raise ConfigError(
            f"Cannot resume from {folder}: the config differs in {', '.join(diff)}. Resume with "
            "the same settings (only steps, save/log intervals, samples and device may change)."
        )


def _check_scaler(accelerator, step: int, t: TrainConfig, out: Path) -> None:
    """fp16: the grad scaler skips steps whose gradients overflow and halves its scale each time.
    A scale that fell below 1 (from 65536) means many recent skips: training is not progressing."""
    scaler = accelerator.scaler
    if scaler is not None and scaler.is_enabled() and scaler.get_scale() < 1.0:
        found = ckpt.complete_checkpoints(out)
        last = f"The last good checkpoint is {found[-1][1]}." if found else ""
        raise LorakitError(
            f"fp16 gradients kept overflowing up to step {step} (the grad scaler skipped most "
            f"recent steps). Use train.mixed_precision = 'bf16' if the GPU supports it, or lower "
            f"train.lr (now {t.lr}). {last}"
        )


def _diverged(step: int, t: TrainConfig, out: Path) -> LorakitError:
    found = ckpt.complete_checkpoints(out)
    last = (
        f"The last good checkpoint is {found[-1][1]}." if found else "No checkpoint was saved yet."
    )
    return LorakitError(
        f"The training loss became NaN/inf at step {step}: training diverged and was stopped. "
        f"Lower train.lr (now {t.lr}), keep train.max_grad_norm > 0, or use "
        f"train.mixed_precision = 'bf16' instead of 'fp16'. {last}"
    )


def _save_failed(
    out: Path, step: int, e: Exception, adapters: dict[str, Path] | None = None
) -> LorakitError:
    found = [p for s, p in ckpt.complete_checkpoints(out) if s != step]
    if adapters:  # the final step: the adapter files were written before the checkpoint
        written = ", ".join(str(p) for p in adapters.values())
        last = f"Training finished and the adapter is written ({written}); only this resumable "
        last += (
            f"checkpoint is missing (the last one is {found[-1]})."
            if found
            else "checkpoint is missing."
        )
    elif found:
        last = f"The previous checkpoint {found[-1]} is intact; continue with --resume latest."
    else:
        last = "No earlier checkpoint exists; the run has to start again."
    if isinstance(e, OSError):
        why = f"{e.strerror or e}. Free disk space or fix the folder's permissions."
    else:
        cause = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
        why = (
            f"{type(e).__name__}: {cause[:300]}. This is a lorakit bug or an unexpected library "
            "version; please report it with this message."
        )
    return LorakitError(
        f"Could not write the checkpoint for step {step} ({ckpt.step_dir(out, step)}): {why} "
        f"Its unfinished folder was removed. {last}"
    )


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


def _bucket_granularity(c: Config, family: Family):
    """Bucket sides must map to whole latent patches: VAE factor 8, times 2 for transformers
    that pack 2×2 latent patches (SD3, FLUX). The automatic step (64 px, or 8 px below 256 px)
    is rounded up to the family's multiple."""
    step = family_step(c.data.resolution, c.data.bucket_step, family.pixel_multiple)
    if step == auto_step(c.data.resolution, c.data.bucket_step):
        return c.data
    return replace(c.data, bucket_step=step)


def _frozen_dtype(name: str, module, weight_dtype: torch.dtype) -> torch.dtype:
    """VAEs stay fp32 (SD-family VAEs overflow in fp16); T5 overflows in fp16 too, so under fp16
    it runs in bf16 where supported, else fp32."""
    if name == "vae":
        return torch.float32
    if weight_dtype == torch.float16 and type(module).__name__.startswith("T5"):
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return weight_dtype


def _device_kwargs(t: TrainConfig) -> dict[str, Any]:
    """Accelerator arguments for the device. A DeepSpeed accelerate config on a machine without
    CUDA runs DeepSpeed on the CPU: accelerate 1.15 ignores DeepSpeed when `cpu=True` (or the
    config's `use_cpu: true`), and with `cpu=False` its `_prepare_backend` finds no device backend
    (None), so PartialState counts 1 process although DeepSpeed's `init_distributed` (falling
    back to gloo without oneCCL) joined 2 — DeepSpeed then rejects train_batch_size 1 != 1 × 1 × 2.
    Naming gloo makes accelerate initialise DeepSpeed's process group with it and count both."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not (deepspeed and "LOCAL_RANK" in os.environ and not torch.cuda.is_available()):
        return {"cpu": _use_cpu(t)}
    from accelerate.utils import InitProcessGroupKwargs

    os.environ["ACCELERATE_USE_CPU"] = "false"  # AcceleratorState would force cpu=True (DDP)
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


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


@torch.no_grad()
def _encode_images(family: Family, comps, data, cache_dir: Path, device, accelerator) -> list:
    """Every record's latents, from the on-disk cache or encoded now (one bucket at a time).

    The cache is keyed by the image content, bucket, crop and the VAE's identity, so an unchanged
    image is never encoded twice across runs, and a changed image or another VAE never reuses a
    stale latent. Only the main process writes it (it runs first; the others then only read).
    """
    vae = comps.vae
    if device.type == "cuda" and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()  # one image at a time: 8 × 1024 px through an fp32 VAE needs ~20 GiB
    store = LatentCache(cache_dir / "latents", vae_identity(vae))
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(data.records):
        by_bucket.setdefault(r.bucket, []).append(i)
    out: list = [None] * len(data.records)
    for indices in by_bucket.values():

        def compute(missing: list[int], indices=indices) -> torch.Tensor:
            chunks = []
            for start in range(0, len(missing), 8):
                part = [indices[m] for m in missing[start : start + 8]]
                pixels = torch.stack([data.pixels(i) for i in part]).to(device)
                chunks.append(family.encode_images(comps, pixels).float().cpu())
            return torch.cat(chunks)

        keys = [latent_key(data.records[i]) for i in indices]
        if not accelerator.is_main_process:
            store.write = _no_write  # type: ignore[method-assign]
        for i, lat in zip(indices, store.get_or_compute(keys, compute), strict=True):
            out[i] = lat
    return out


def _no_write(*args, **kwargs) -> None:
    """Non-main processes never write cache files (rank 0 already did)."""


@torch.no_grad()
def _encode_captions(
    family: Family, comps, captions: list[str], with_empty: bool, cache_dir: Path, accelerator
) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {caption: tensor}} for every distinct caption (plus "" for caption dropout),
    through the on-disk text cache keyed by caption text and text-encoder identity."""
    encoders = [m for n, m in family.frozen_modules(comps).items() if n != "vae"]
    store = TextEncoderCache(cache_dir / "text", module_identity(*encoders))
    if not accelerator.is_main_process:
        store.write = _no_write  # type: ignore[method-assign]
    unique = sorted(set(captions) | ({""} if with_empty else set()))
    encoded = store.get_or_compute(unique, lambda caps: family.encode_prompts(comps, caps))
    return {k: {cap: v[j] for j, cap in enumerate(unique)} for k, v in encoded.items()}


def _image_conditioning(family: Family, comps, records) -> list[dict[str, torch.Tensor]] | dict:
    """{name: [per-record tensor [1, …]]} of per-image conditioning (SDXL's time ids)."""
    out: dict[str, list[torch.Tensor]] = {}
    for r in records:
        target = (r.bucket[1], r.bucket[0])  # bucket is (w, h); conditioning wants (h, w)
        for k, v in family.image_conditioning(
            comps, r.original_size, r.crop_top_left, target
        ).items():
            out.setdefault(k, []).append(v.float().cpu())
    return out


def _eval_subset(records, k: int) -> list[int]:
    """A fixed validation subset of k training images, spread evenly over the set, all from the
    most common bucket (one batch shape); regularization images are never scored."""
    if k <= 0:
        return []
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        if not r.is_reg:
            by_bucket.setdefault(r.bucket, []).append(i)
    if not by_bucket:
        return []
    largest = max(by_bucket.values(), key=len)
    return [largest[j] for j in heldout_indices(len(largest), k)]


def _brand_palette(data, colors: int, seed: int):
    """The brand palette of (up to 64 of) the training images, regularization images excluded."""
    idx = [i for i, r in enumerate(data.records) if not r.is_reg]
    idx = idx[:: max(1, len(idx) // 64)][:64]
    images = [
        ((data.pixels(i).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        for i in idx
    ]
    return extract_palette(images, colors, seed=seed) if images else None


def _plain(accelerator, denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser without its DDP and `torch.compile` wrappers (same parameters): held-out
    scoring and previews run it in eval mode without grad, which the compiled training graph
    does not cover; through the compiled module each would trigger a compile of its own."""
    return accelerator.unwrap_model(denoiser, keep_torch_compile=False)


def _num(x) -> float | None:
    return None if x is None else float(_full(x) if isinstance(x, torch.Tensor) else x)


def _sample_rng(seed: int, uid: int) -> random.Random:
    """Per-sample RNG for caption dropout / tag shuffle: layout-independent and resumable."""
    return random.Random((seed * 0x9E3779B1 + uid * 0x85EBCA77 + 1) % 2**63)


def scaled_lr(c: Config, world: int) -> float:
    """train.lr under train.lr_scaling, with k = global batch = batch × grad_accum × processes."""
    k = c.train.batch_size * c.train.grad_accum * world
    return {"none": 1.0, "linear": float(k), "sqrt": k**0.5}[c.train.lr_scaling] * c.train.lr


from lorakit.optim import _BNB_PROBLEM, bnb_8bit_problem, build_optimizer  # noqa: E402, F401


def build_lr_schedule(optimizer, t: TrainConfig, num_processes: int = 1):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process, hence the factor.
    return get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.warmup_steps * num_processes,
        num_training_steps=t.steps * num_processes,
    )


def _render(family, comps, trainable: list, accelerator, spec, c: Config, step: int,
            path: Path | None, keep_on_device: bool, embeds: list | None = None):  # fmt: skip
    """Render a grid with the current adapter: trained modules in eval mode, no grad; frozen
    modules brought to the device for it and moved off again unless training needs them: only
    the VAE when `embeds` (the prompt rows pre-encoded by `encode_prompt_rows`) are given, else
    the text encoders too. `path` None: only run the denoiser (an FSDP rank other than 0), write
    nothing, return None."""
    frozen = family.frozen_modules(comps)
    if embeds is not None:
        frozen = {"vae": frozen["vae"]}  # the text encoders stay where they are (off the device)
    device = accelerator.device
    for module in frozen.values():
        module.to(device)
    for module in trainable:
        module.eval()
    try:
        pipe = family.pipeline(comps, c.sample.scheduler)
        title = f"{c.export.name} - step {step} - {c.model.name}"
        if path is None:
            render_cells(pipe, spec, embeds)
            return None
        individual = path.with_suffix("") if c.sample.save_individual else None
        return render_grid_result(pipe, spec, title, path, individual, embeds)
    finally:
        for module in trainable:
            module.train()
        if device.type != "cpu" and not keep_on_device:
            for module in frozen.values():
                module.to("cpu")
            torch.cuda.empty_cache()


def _banner(reporter: Reporter, c: Config, data, data_dir: str, procs: int,
            order: BatchOrder, resume_from: Path | None) -> None:  # fmt: skip
    eff = (
        f"{c.train.batch_size * c.train.grad_accum * procs} ({c.train.batch_size} per device × "
        f"{procs} process{'es' if procs > 1 else ''} × {c.train.grad_accum} accumulation)"
    )
    per_epoch = order.per_epoch() // c.train.grad_accum or 1
    epochs = c.train.steps / per_epoch
    saves = f"every {c.train.save_every} steps" if c.train.save_every else "at the end only"
    samples = f"at step 0 and every {c.sample.every} steps" if c.sample.every else "off"
    warnings = [p for p in data.problems if p.severity != "info"]
    reporter.message(
        f"[bold]lorakit[/bold] {c.model.name} on {data_dir}: {data.summary()} → {per_epoch} "
        f"steps per epoch at effective batch {eff}; {c.train.steps} steps ≈ {epochs:.1f} "
        f"epochs. LoRA rank {c.lora.rank} alpha {c.lora.alpha:g}"
        f"{' + text encoder' if c.lora.train_text_encoder else ''}, {c.train.optimizer}, "
        f"lr {scaled_lr(c, procs):g}"
        f"{'' if c.train.lr_scaling == 'none' else f' ({c.train.lr_scaling}-scaled)'}. "
        f"Checkpoints {saves}; samples {samples}. Output: {c.train.out}"
    )
    if warnings:
        listed = "; ".join(f"{p.file}: {p.message}" for p in warnings[:5])
        more = f" (+{len(warnings) - 5} more)" if len(warnings) > 5 else ""
        reporter.message(f"[yellow]data warnings:[/yellow] {listed}{more}")
    if resume_from is not None:
        reporter.message(
            f"resuming from {resume_from} (epoch {order.epoch}, batch {order.position})"
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
