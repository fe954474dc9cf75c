"""The training loop: set-up → loop → finish, each step a named function.

    train(config, data_dir)
      spec = build_spec(config, family)      every run decision, once (lorakit/spec.py)
      set-up: accelerator (distributed.py) → resume point (resume.py) → images + captions
        → base model → latent / caption caches (data/cache.py) → LoRA → optimizer + LR
        schedule (optim.py) → restore a checkpoint → [sample + score at step 0]
      loop, per step: micro-batches from the cache (data/order.py) → family.loss → backward
        → clip → step; log every `train.log_every`, checkpoint every `train.save_every`,
        preview every `sample.every` (sampling.py), held-out score (evaluate.py), stop on a
        signal after a checkpoint (stop.py)
      finish: final export (kohya + diffusers), checkpoint, score, sample grid, report.

Everything random (LoRA init, data order, noise, timesteps) comes from generators seeded by
`train.seed`, so the same config gives byte-identical adapters on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from lorakit import checkpoint as ckpt
from lorakit.config import Config
from lorakit.data.cache import Cached, encode_captions, encode_images, image_conditioning
from lorakit.data.masks import batch_weights, check_masks, latent_masks, loss_mask
from lorakit.data.order import BatchOrder, draw_noise, sample_rng, trace_batch
from lorakit.data.reg import ClassOrder, check_reg_folder
from lorakit.data.training import TrainingSet, caption_for_step, load_training_set
from lorakit.distributed import (
    Consensus,
    check_distributed,
    check_precision,
    cpu_fsdp,
    device_kwargs,
    full_tensor,
    is_deepspeed,
    is_sharded,
    unwrapped,
)
from lorakit.ema import RAW, AdapterEMA, write_report_state
from lorakit.evaluate import (
    baseline_key,
    cached_baseline,
    eval_subset,
    heldout_inputs,
    score_heldout,
)
from lorakit.export import EXPORTERS, write_adapter
from lorakit.export.metadata import training_metadata
from lorakit.fileio import atomic_write_text
from lorakit.hostmem import keep_freed_memory, release_host_memory
from lorakit.lora import (
    extract_adapter,
    inject_lora,
    inject_text_encoder_lora,
    text_encoder_targets,
)
from lorakit.models import Family, load_model, resolve_family
from lorakit.models.quantize import bnb_advice
from lorakit.optim import build_lr_schedule, build_optimizer, scaled_lr
from lorakit.palette import (
    LabHistogram,
    extract_palette,
    lab_emd,
    lab_histogram,
    palette_distance,
)
from lorakit.preserve import (
    Recording,
    adapters_disabled,
    cached_captions,
    heldout_bleed,
    preservation_mse,
    without_trigger,
)
from lorakit.progress import Phases, Reporter
from lorakit.report import History, write_report
from lorakit.resume import (
    capture,
    check_resume_config,
    check_resume_data,
    check_resume_step,
    claim_output,
    data_fingerprint,
    mark_holder,
    restore,
    run_lock,
    save_failed,
)
from lorakit.sampling import encode_prompt_rows, grid_spec, preview, sample_due
from lorakit.spec import RunSpec, build_spec, frozen_dtype
from lorakit.stop import Interrupted, StopRequest, check_scaler, diverged, fault
from lorakit.texture import TextureReference, texture_distance, texture_reference
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


@dataclass
class Run:
    """The set-up objects the loop's steps share; built once in `train`, then only the
    bookkeeping fields (history, result, sampled/scored steps, last_sample) change."""

    c: Config
    spec: RunSpec
    accelerator: Any
    out: Path
    data_dir: str | Path
    data: TrainingSet
    comps: Any
    denoiser: torch.nn.Module
    """As prepared by accelerate (DDP / FSDP2 / compiled); `unwrapped` gives the plain one."""
    params: list[torch.Tensor]
    """The trainable LoRA weights (FSDP2: the sharded DTensors)."""
    optimizer: Any
    lr_schedule: Any
    order: BatchOrder
    cached: Cached
    text_encoders: list[torch.nn.Module]
    preview_spec: Any
    """The preview grid (`sampling.GridSpec`), None when sampling is off."""
    preview_embeds: list | None
    result: TrainResult
    sharded: bool
    """FSDP: extraction, checkpoints, samples are collectives (every rank takes part). Decided
    when the Accelerator is set up (accelerate's `distributed_type` may read otherwise after
    `prepare`)."""
    history: History = field(default_factory=History)
    start_step: int = 0
    eval_idx: list[int] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    reporter: Reporter | None = None
    started: float = 0.0
    last_sample: float = 0.0
    sampled: set[int] = field(default_factory=set)
    """Steps sampled / scored in this session, the same on every rank."""
    scored: set[int] = field(default_factory=set)
    phases: Phases = field(default_factory=Phases)
    """Wall time per phase (set by `train`; read by run.json and the report)."""
    brand_hist: LabHistogram | None = None
    """The training images' Lab histogram (eval.lab_emd), main process."""
    brand_texture: TextureReference | None = None
    """The training images' texture statistics (eval.texture), main process."""
    ema: AdapterEMA | None = None
    """`train.ema`: the EMA of `params` (previews, scores and the main adapter use it)."""
    prior: ClassOrder | None = None
    """Prior preservation (class images among the records): the class batch of each
    micro-batch (lorakit/data/reg.py); None = off."""
    bleed_base: list[torch.Tensor] = field(default_factory=list)
    """The base model's held-out predictions of the bleed score, computed once (`_bleed`)."""


def train(config: Config, data_dir: str | Path, reporter: Reporter | None = None) -> TrainResult:
    c = config
    phases = Phases()  # where the time goes: run.json, the report, the first-step line
    spec = build_spec(c, resolve_family(c.model)[0])
    # class images that cannot be used are refused before the run folder is touched
    check_reg_folder(data_dir, c.data, c.model.name, files=True)
    accelerator = _accelerator(c, spec)
    if accelerator.device.type == "cpu":  # step buffers reuse their pages (lorakit/hostmem.py)
        keep_freed_memory()
    sharded = is_sharded(accelerator)  # FSDP: extraction, checkpoints, samples are collectives
    from lorakit.planner import check_before_training  # cheap; returns at once on CPU / tiny

    warnings = [check_before_training(c, accelerator.device, c.train.strict_memory)]
    warnings.append(bnb_advice(c.model.quantize, spec.family))  # nf4 larger than fp8 would be
    torch.manual_seed(c.train.seed)

    # -- set-up -----------------------------------------------------------------------------
    out, device = Path(c.train.out), accelerator.device
    # one run per folder, held until train() returns or raises (a crash releases it too)
    with run_lock(out, data_dir, enabled=accelerator.is_main_process):
        resume_from, state = _resume_point(out, c, accelerator, warnings.append)
        with accelerator.main_process_first(), phases("data"):  # rank 0 first, the others read
            data = load_training_set(
                data_dir,
                spec.data,
                c.train.batch_size,
                c.train.seed,
                pixel_multiple=spec.pixel_multiple,
            )
            check_masks(data, c.train)  # train.masked_loss: no or empty masks stop here
        if resume_from:
            check_resume_data(resume_from, data.records, c, warnings.append)
        with phases("model"):
            comps = _load_model(c, spec, accelerator, out)
        with phases("cache"):
            cached, preview_spec, preview_embeds = _cache(c, spec, comps, data, accelerator)
        with phases("model"):
            _free_encoders(spec, comps)  # first: their memory is gone before the denoiser's read
            _place_for_training(spec, comps, device)
            denoiser, params, text_encoders = _attach_lora(c, spec, comps, device)
            denoiser, optimizer, lr_schedule, params = _optimizer(
                c, denoiser, params, accelerator, sharded
            )
        world, rank = accelerator.num_processes, accelerator.process_index
        order = BatchOrder(data.records, c.train.batch_size, c.train.seed, world, rank)
        prior = None
        if any(r.is_reg for r in data.records):  # DreamBooth prior preservation
            prior = ClassOrder(data.records, c.train.batch_size, c.train.seed, world, rank)
        result = TrainResult(out, {}, [], {}, spec.family, comps, c)
        run = Run(c, spec, accelerator, out, data_dir, data, comps, denoiser, params, optimizer,
                  lr_schedule, order, cached, text_encoders, preview_spec, preview_embeds, result,
                  sharded)  # fmt: skip
        run.phases = phases
        run.prior = prior
        if c.train.ema:  # from the initial weights; a resume replaces it with the saved one
            run.ema = AdapterEMA(params, c.train.ema_decay, c.train.ema_device)
        if state is not None:
            _restore(run, state)
        init_trackers(accelerator, c, out)
        run.eval_idx = eval_subset(data.records, c.eval.images)
        if accelerator.is_main_process:
            _brand_references(run)
        run.started = time.time()
        run.meta = training_metadata(
            c,
            spec,
            cached.captions,
            len(data.records),
            run.started,
            0,
            Path(data_dir).name,
            components=comps,
        )
        run.last_sample = time.monotonic()
        run.reporter = reporter or Reporter(
            c.train.steps, device=device, enabled=accelerator.is_main_process
        )
        _announce(run, resume_from, [w for w in warnings if w])

        # -- the loop ---------------------------------------------------------------------------
        step = run.start_step
        window, window_n, grad_norm = torch.zeros((), device=device), 0, None
        consensus = Consensus(accelerator.reduce if world > 1 else None, device)
        stop_signal = 0  # the stop request acted on: this process's, or all ranks' agreed one
        with run.reporter, StopRequest() as stop:
            if run.start_step == 0:
                if spec.sampling:
                    _sample(run, 0)
                _score(run, 0)
            for step in range(run.start_step + 1, c.train.steps + 1):
                epoch_before = order.epoch
                fault(f"signal-rank{rank}", step)
                for micro in range(c.train.grad_accum):
                    with phases("steps"):
                        loss, grad_norm = _micro_step(run, step, micro, grad_norm)
                    window += loss.detach()  # summed on device: no host sync per step
                    window_n += 1
                    agreed, bad_step = consensus.check(stop.requested, loss, step)
                    if bad_step:
                        raise diverged(bad_step, c.train, out)
                    stop_signal = max(stop_signal, agreed)
                if run.ema is not None:  # once per optimizer step, on every rank
                    with phases("steps"):
                        run.ema.update()
                if not phases.first_step:
                    _first_step(run, phases.mark_first_step())
                if step % c.train.log_every == 0 or step == c.train.steps:
                    _log(run, step, window, window_n, grad_norm)
                    window.zero_()
                    window_n = 0
                epoch_done = order.epoch > epoch_before
                if world == 1:  # nothing to agree on: act on a request at once, not a step late
                    stop_signal = stop.requested
                if step < c.train.steps and (
                    _checkpoint_due(c, step, epoch_done, order.epoch) or stop_signal
                ):
                    _save_checkpoint(run, step)
                if _preview_due(run, step, epoch_done):
                    _sample(run, step)
                if c.eval.every and step % c.eval.every == 0:
                    _score(run, step)
                if stop_signal and step < c.train.steps:
                    raise Interrupted(stop_signal, step, out)
            bad_step = consensus.flush()[1]
            if bad_step:
                raise diverged(bad_step, c.train, out)
            _finish(run, step)

        # -- finish -----------------------------------------------------------------------------
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_outputs(run)
        accelerator.end_training()
        return result


# ---------------------------------------------------------------------------------------------
# set-up


def _accelerator(c: Config, spec: RunSpec):
    """The Accelerator for this run, refusing what lorakit does not support under it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if "WORLD_SIZE" not in os.environ:
        # A second run in one process (tests, notebooks) may use another precision.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=spec.mixed_precision,
        gradient_accumulation_steps=c.train.grad_accum,
        **device_kwargs(c.train),
    )
    cpu_fsdp(accelerator)
    check_distributed(accelerator, c)
    if accelerator.state.deepspeed_plugin is not None:
        # lorakit prepares no DataLoader, from which accelerate would take the micro-batch size.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = c.train.batch_size
    check_precision(c.train, accelerator.device)
    return accelerator


def _resume_point(out: Path, c: Config, accelerator, warn):
    """(checkpoint folder, its state) to resume from, or (None, None) after claiming `out`.
    A damaged newer checkpoint passed over by `--resume latest` is named through `warn`."""
    resume = c.train.resume
    resume_from = ckpt.resolve_resume(out, resume, on_skip=warn) if resume else None
    state = ckpt.load_state(resume_from) if resume_from else None
    if resume_from:
        check_resume_config(resume_from, c)
        check_resume_step(resume_from, state.step, c)
    elif accelerator.is_main_process:
        claim_output(out, c.train.overwrite)
    if accelerator.is_main_process:
        mark_holder(out)  # the folder is this run's now: name it for a second run
    accelerator.wait_for_everyone()
    return resume_from, state


def _load_model(c: Config, spec: RunSpec, accelerator, out: Path):
    """The base components; the frozen encoders on the device (for caching), the run's
    config.toml written."""
    from lorakit.models.loading import deferred, is_deferred, load_in

    if spec.fp8_matmul:  # a GPU without fp8 tensor cores: refused before minutes of loading
        from lorakit.models.quantize import check_fp8_matmul

        check_fp8_matmul(accelerator.device)

    # straight into the run's dtype (no fp32 copy in RAM first); a local denoiser is read only
    # after caching (`_place_for_training`), so it never sits in RAM beside the encoders
    with load_in(spec.weight_dtype), deferred():
        _, comps = load_model(c.model)
    family, device = spec.family, accelerator.device
    denoiser = getattr(comps, family.denoiser_name)
    if spec.block_swap:  # more blocks than this model has: refused before minutes of caching
        from lorakit.blockswap import swapped_blocks

        swapped_blocks(denoiser, family, spec.block_swap)
    if getattr(denoiser, "is_quantized", False) and device.type == "cuda":
        # bitsandbytes put the quantized weights on the GPU while loading; parked in host memory
        # while the encoders cache, so they do not share it (FLUX: T5-XXL 9 GiB + NF4 5.7 GiB).
        # A bitsandbytes that cannot move quantized weights leaves them (and the `to(device)`
        # after caching brings back any that did move).
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            denoiser.to("cpu")
    for name, module in family.frozen_modules(comps).items():
        dtype = frozen_dtype(name, module, spec.weight_dtype)
        if spec.stream_encoders and name != "vae":
            module.to(dtype=dtype)  # host memory; `_cache` streams it (`encoder_stream`)
        else:
            module.to(device, dtype)
    if spec.fp8_storage and not is_deferred(denoiser):  # fp8 from here on, in host memory
        _store_fp8(spec, denoiser)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", c.to_toml())
    return comps


def _cache(c: Config, spec: RunSpec, comps, data: TrainingSet, accelerator):
    """(latents + caption embeddings + image conditioning, preview grid, preview embeddings).

    The preview prompts are fixed: encoded once while the encoders are on the device, grids then
    need only the denoiser and the VAE there (FLUX/SD3: not T5-XXL's 9 GiB). Text-encoder LoRA
    changes the embeddings every step: those grids encode the strings each time.

    `train.stream_encoders`: the text encoders run from host memory, their layers' weights
    streamed to the device as they run (`encoder_stream.streamed`); on leaving, their resident
    parts are on the device as a resident encoder is, and leave it in `_place_for_training`."""
    stream = contextlib.nullcontext()
    if spec.stream_encoders:
        from lorakit.encoder_stream import streamed

        encoders = {n: m for n, m in spec.family.frozen_modules(comps).items() if n != "vae"}
        stream = streamed(encoders, accelerator.device)
    with stream:
        return _encode_all(c, spec, comps, data, accelerator)


def _encode_all(c: Config, spec: RunSpec, comps, data: TrainingSet, accelerator):
    family, cache_dir = spec.family, spec.cache_dir
    captions = [r.caption for r in data.records]
    # preservation prompts and the bleed score's trigger-less held-out captions, cached alike
    heldout = eval_subset(data.records, c.eval.images)
    extra = cached_captions(spec.preservation, spec.bleed_trigger, captions, heldout)
    with accelerator.main_process_first():
        latents = encode_images(family, comps, data, cache_dir, accelerator.device, accelerator)
        masks = (  # at latent resolution, cached next to the latents (data/masks.py)
            latent_masks(data, latents, cache_dir, accelerator.is_main_process)
            if c.train.masked_loss
            else []
        )
        cond = (
            {}
            if spec.encode_each_step  # captions vary per step: no text cache
            else encode_captions(
                family,
                comps,
                captions + extra,
                spec.cache_empty_caption,
                cache_dir,
                accelerator,
                text_length=spec.text_length,
            )
        )
    preview_spec = (
        grid_spec(c.sample, c.data.trigger, spec.resolution, spec.text_length)
        if spec.sampling
        else None
    )
    preview_embeds = (
        encode_prompt_rows(family.pipeline(comps, c.sample.scheduler), preview_spec)
        if spec.preview_embeds
        else None
    )
    image_cond = image_conditioning(family, comps, data.records)
    return Cached(latents, captions, cond, image_cond, masks), preview_spec, preview_embeds


def _place_for_training(spec: RunSpec, comps, device: torch.device) -> None:
    """Encoders off the device unless they encode every step; the denoiser onto it (only now:
    during caching the encoders have it to themselves)."""
    from lorakit.models.loading import is_deferred, materialize
    from lorakit.models.quantize import is_fp8_stored

    family = spec.family
    if device.type != "cpu" and not spec.encoders_stay_on_device:
        for module in family.frozen_modules(comps).values():
            if module is not None and not _on_meta(module):  # `_free_encoders` freed them
                module.to("cpu")  # only the denoiser is needed from here on
    denoiser = getattr(comps, family.denoiser_name)
    if is_deferred(denoiser):  # read now, after caching (`_load_model`)
        materialize(denoiser)
        if spec.fp8_storage:
            _store_fp8(spec, denoiser)

    if spec.block_swap:
        # Cast in host memory; `blockswap.enable_block_swap` moves all but the streamed blocks
        # to the device once the LoRA is injected (`_attach_lora`). fp8-stored layers stay fp8
        # (the rest is in the weight dtype already): they stream as fp8.
        if not getattr(denoiser, "is_quantized", False) and not is_fp8_stored(denoiser):
            denoiser.to(dtype=spec.weight_dtype)
    elif getattr(denoiser, "is_quantized", False) or is_fp8_stored(denoiser):
        denoiser.to(device)  # bitsandbytes / fp8-stored weights keep their storage dtypes
    else:
        denoiser.to(device, spec.weight_dtype)


def _on_meta(module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _store_fp8(spec: RunSpec, denoiser) -> None:
    """fp8 storage of the denoiser's frozen Linear/Conv weights, in host memory, and with
    `model.fp8_matmul` fp8 matmuls on them (see quantize)."""
    from lorakit.models.quantize import enable_fp8_matmul, enable_fp8_storage

    denoiser.to(dtype=spec.weight_dtype)  # the layers it skips (norms, ...) stay in this
    enable_fp8_storage(denoiser, spec.weight_dtype)
    if spec.fp8_matmul:
        enable_fp8_matmul(denoiser)


def _free_encoders(spec: RunSpec, comps) -> None:
    """A run without previews never decodes or encodes again once every caption is cached: the
    VAE and text encoders leave host memory too (meta tensors; module objects and configs
    stay). With previews they stay (the pipeline runs the VAE and reads its device off them)."""
    if spec.sampling or spec.encoders_stay_on_device:
        return
    for module in spec.family.frozen_modules(comps).values():
        if module is not None:
            module.to("meta")
    release_host_memory()


def _attach_lora(c: Config, spec: RunSpec, comps, device: torch.device):
    """(denoiser, trainable LoRA params, text encoders): LoRA injected (fp32 weights), the
    trained modules in train mode with gradient checkpointing as configured, compiled if asked."""
    family = spec.family
    denoiser = getattr(comps, family.denoiser_name)
    lora_cfg = replace(c.lora, target_modules=list(spec.targets))
    params = inject_lora(denoiser, lora_cfg, c.train.seed)
    if spec.train_text_encoder:
        params += inject_text_encoder_lora(family, comps, spec.text_encoder_lora, c.train.seed)
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
    if spec.block_swap:
        from lorakit.blockswap import enable_block_swap

        enable_block_swap(denoiser, family, spec.block_swap, device)
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
    if spec.train_text_encoder:
        for te in text_encoders:
            if c.train.gradient_checkpointing:
                te.gradient_checkpointing_enable()
            te.train()
    if c.train.compile:
        # After LoRA injection (parameters are shared with comps); the first steps compile.
        denoiser = torch.compile(denoiser, backend=c.train.compile_backend)
    return denoiser, params, text_encoders


def _optimizer(c: Config, denoiser, params: list, accelerator, sharded: bool):
    """(denoiser, optimizer, LR schedule, params), all prepared by accelerate."""
    n = accelerator.num_processes
    optimizer = build_optimizer(params, c.train, accelerator.device, lr=scaled_lr(c, n))
    lr_schedule = build_lr_schedule(optimizer, c.train, n)
    names = {id(p): n for n, p in denoiser.named_parameters()}
    lora_names = [names[id(p)] for p in params if id(p) in names]
    denoiser, optimizer, lr_schedule = accelerator.prepare(denoiser, optimizer, lr_schedule)
    if sharded:  # FSDP2 replaced the denoiser's parameters by sharded DTensors
        now = dict(accelerator.unwrap_model(denoiser).named_parameters())
        params = [now[n] for n in lora_names]
    return denoiser, optimizer, lr_schedule, params


def _restore(run: Run, state: ckpt.TrainState) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, RNG, data position, history."""
    run.start_step = restore(
        state, run.params, run.optimizer, run.lr_schedule, run.accelerator, run.order, run.ema,
        where=run.c.train.resume,
    )  # fmt: skip
    run.result.losses = {int(k): v for k, v in state.history.get("losses", {}).items()}
    run.result.samples = [Path(p) for p in state.history.get("samples", [])]
    run.history = History.from_dict(state.history["report"])


def _announce(run: Run, resume_from: Path | None, warnings: list[str]) -> None:
    c, accelerator, reporter = run.c, run.accelerator, run.reporter
    device, procs = accelerator.device, accelerator.num_processes
    reporter.start_at(run.start_step)
    _banner(reporter, c, run.data, str(run.data_dir), procs, run.order, resume_from)
    if run.sharded:
        reporter.message(
            f"FSDP2: the denoiser's weights, gradients and optimizer state are sharded over "
            f"{procs} processes"
        )
    elif is_deepspeed(accelerator) and device.type == "cpu":
        reporter.message(
            f"DeepSpeed ZeRO-2 on the CPU (gloo): optimizer state and gradients are partitioned "
            f"over {procs} processes"
        )
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and device.type == "cpu":
        reporter.message(
            "[yellow]warning:[/yellow] train.device = 'cpu' on a machine with a GPU: accelerate "
            "runs the DeepSpeed config as plain data parallel (DDP) on the CPU."
        )
    swap = getattr(unwrapped(accelerator, run.denoiser), "_lorakit_block_swap", None)
    if swap is not None:
        reporter.message(
            f"block swap: the frozen weights of the last {len(swap.blocks)} transformer blocks "
            f"({swap.host_bytes / 2**30:.2f} GiB, host memory pinned: {swap.pinned}) stream to "
            f"the device through {len(swap.ring)} slots ({swap.device_bytes / 2**30:.2f} GiB)"
        )
    for warning in warnings:  # the planner's memory check, damaged checkpoints passed over
        reporter.message(f"[yellow]warning:[/yellow] {escape(warning)}")


# ---------------------------------------------------------------------------------------------
# the loop's steps


def _batch(run: Run, idx: list[int], uid0: int):
    """(latents, conditioning) of the records `idx` on the device; `uid0`: the run-wide number
    of the batch's first sample (seeds its caption dropout / tag shuffle)."""
    spec, cached = run.spec, run.cached
    device, dtype = run.accelerator.device, spec.weight_dtype
    lat = torch.stack([cached.latents[i] for i in idx]).to(device, dtype)
    cond = _caption_cond(run, _step_captions(run, idx, uid0))
    for k, v in cached.image_cond.items():  # fp32: SDXL time ids are pixel counts
        cond[k] = torch.cat([v[i] for i in idx]).to(device)
    return lat, cond


def _step_captions(run: Run, idx: list[int], uid0: int) -> list[str]:
    """The captions the records `idx` train on in this step (caption dropout, tag shuffle)."""
    c, captions = run.c, run.cached.captions
    return [
        caption_for_step(captions[i], c.data, sample_rng(c.train.seed, uid0 + j))
        for j, i in enumerate(idx)
    ]


def _caption_cond(run: Run, caps: list[str]) -> dict[str, torch.Tensor]:
    """The embeddings of `caps` (batch-first, on the device): from the text cache, or encoded
    now when the run encodes captions every step (with grad for a text-encoder LoRA)."""
    spec, device, dtype = run.spec, run.accelerator.device, run.spec.weight_dtype
    if spec.encode_each_step:
        with torch.set_grad_enabled(spec.train_text_encoder):
            enc = spec.family.encode_prompts_train(run.comps, caps)
        return {k: v.to(device, dtype) for k, v in enc.items()}
    return {
        k: torch.stack([v[cap] for cap in caps]).to(device, dtype)
        for k, v in run.cached.cond.items()
    }


def _micro_step(run: Run, step: int, micro: int, grad_norm):
    """One micro-batch: forward, backward, and (on the last micro-batch of the accumulation)
    clip + optimizer step. Returns (loss, the latest gradient norm)."""
    c, acc = run.c, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    idx = run.order.next()
    trace_batch(rank, step, idx)
    first_uid = ((step - 1) * c.train.grad_accum + micro) * world * c.train.batch_size
    uid0 = first_uid + rank * len(idx)
    lat, cond = _batch(run, idx, uid0)
    noise, timesteps = draw_noise(run.spec.family, run.comps, lat, c, uid0)
    # anti-bleed preservation reads the inputs the loss gives the denoiser
    recording = Recording(run.spec.family) if run.spec.preservation else None
    family = recording.family if recording else run.spec.family
    weights = batch_weights(run.cached.masks, idx, c.train.mask_background, lat)
    with acc.accumulate(run.denoiser), acc.autocast():
        with loss_mask(weights):  # train.masked_loss: the loss weighted by the batch's masks
            loss = family.loss(run.comps, run.denoiser, lat, cond, noise, timesteps, c.train)
        acc.backward(loss)
        if recording is not None:  # after the first backward: one graph alive at a time
            loss = loss.detach() + _preserve(run, recording, _step_captions(run, idx, uid0))
        if run.prior is not None:  # likewise: the class batch after the instance backward
            n = (step - 1) * c.train.grad_accum + micro  # global micro-batch number
            loss = loss.detach() + _prior(run, n)
        if acc.sync_gradients and c.train.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.params, c.train.max_grad_norm)
        run.optimizer.step()
        run.lr_schedule.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _prior(run: Run, n: int) -> torch.Tensor:
    """DreamBooth prior preservation for the global micro-batch `n`: its class batch
    (`ClassOrder`, as many class images as instance images) through the family's loss, masks
    included, × train.prior_weight, backward; returns that term, detached. Gradients add up to
    those of instance loss + λ · class loss (lorakit/data/reg.py: why two passes, not one
    batch of 2B)."""
    c, family = run.c, run.spec.family
    idx, uid0 = run.prior.batch(n)
    lat, cond = _batch(run, idx, uid0)
    noise, timesteps = draw_noise(family, run.comps, lat, c, uid0)
    weights = batch_weights(run.cached.masks, idx, c.train.mask_background, lat)
    with loss_mask(weights):
        loss = family.loss(run.comps, run.denoiser, lat, cond, noise, timesteps, c.train)
    term = c.train.prior_weight * loss
    run.accelerator.backward(term)
    return term.detach()


def _preserve(run: Run, recording: Recording, caps: list[str]) -> torch.Tensor:
    """Anti-bleed preservation of one micro-batch whose plain loss `recording` saw: the
    weighted MSE between adapter and base on the captions' preservation prompts, backward
    through the adapter; returns its detached value (lorakit/preserve.py)."""
    pres = run.spec.preservation
    text = _caption_cond(run, [pres.caption(cap) for cap in caps])
    base = unwrapped(run.accelerator, run.denoiser)  # no grad, no DDP / compile wrapper
    term = pres.weight * preservation_mse(recording, run.denoiser, base, text)
    run.accelerator.backward(term)
    return term.detach()


def _log(run: Run, step: int, window: torch.Tensor, window_n: int, grad_norm) -> None:
    """Mean loss of the window (over all ranks), LR and grad norm to history, progress and
    trackers; stops an fp16 run whose grad scaler keeps skipping steps."""
    acc = run.accelerator
    mean = (acc.reduce(window, "mean") / window_n).item()
    run.result.losses[step] = mean
    lr = run.lr_schedule.get_last_lr()[0]
    run.history.losses[step], run.history.lr[step] = mean, lr
    run.reporter.update(step, mean, lr, run.order.epoch)
    log_scalars(acc, step, loss=mean, lr=lr, grad_norm=_num(grad_norm))
    check_scaler(acc, step, run.c.train, run.out)


def _checkpoint_due(c: Config, step: int, epoch_done: bool, epoch: int) -> bool:
    t = c.train
    return bool(
        (t.save_every and step % t.save_every == 0)
        or (t.save_every_epochs and epoch_done and epoch % t.save_every_epochs == 0)
    )


def _preview_due(run: Run, step: int, epoch_done: bool) -> bool:
    s = run.c.sample
    epoch_sample = s.every_epochs and epoch_done and run.order.epoch % s.every_epochs == 0
    return run.preview_spec is not None and bool(
        sample_due(s, step, run.last_sample) or epoch_sample
    )


def _first_step(run: Run, seconds: float) -> None:
    """One line when the first step is done: what the run spent before it, by phase."""
    run.reporter.message(f"first step done {seconds:.1f} s into the run ({run.phases.line()})")


def _sample(run: Run, step: int) -> None:
    """A preview grid with the current adapter (under FSDP every rank runs the denoiser)."""
    with run.phases("previews"):
        _render_sample(run, step)


def _render_sample(run: Run, step: int) -> None:
    run.last_sample = time.monotonic()
    run.sampled.add(step)
    acc, spec = run.accelerator, run.spec
    if run.preview_spec is None or not (acc.is_main_process or run.sharded):
        return
    path = run.out / "samples" / f"step-{step:06d}.png"
    if not acc.is_main_process:  # FSDP: every rank runs the sharded denoiser
        path = None
    trainable = [unwrapped(acc, run.denoiser)]
    trainable += run.text_encoders if spec.train_text_encoder else []
    with _ema_weights(run):
        grid = preview(
            spec.family,
            run.comps,
            trainable,
            acc,
            run.preview_spec,
            run.c,
            step,
            path,
            keep_on_device=spec.encoders_stay_on_device,
            embeds=run.preview_embeds,
        )
    if grid is None:
        return
    # brand fidelity of the adapter at full strength (a sample.scales sweep's 1.0 column)
    images, brand = grid.images(), run.history.brand_palette
    pal = palette_distance(images, brand, seed=run.c.train.seed) if brand and images else None
    emd = lab_emd(lab_histogram(images), run.brand_hist) if run.brand_hist and images else None
    tex = texture_distance(images, run.brand_texture) if run.brand_texture and images else None
    run.history.add_grid(step, path, palette=pal, lab_emd=emd, texture=tex)
    log_grid(acc, step, path)
    log_scalars(acc, step, palette_de00=pal, lab_emd=emd, texture=tex)
    run.result.samples.append(path)
    run.reporter.last_grid = str(path)
    named = (("palette ΔE00", pal), ("Lab EMD", emd), ("texture", tex))
    scores = ", ".join(f"{name} {v:.3g}" for name, v in named if v is not None)
    run.reporter.message(f"sample grid: {path}" + (f" ({scores})" if scores else ""))


def _score(run: Run, step: int, path: Path | str = "") -> None:
    """Held-out loss of the current adapter on the fixed validation subset."""
    with run.phases("scoring"):
        _score_now(run, step, path)


def _score_now(run: Run, step: int, path: Path | str = "") -> None:
    run.scored.add(step)
    acc, c = run.accelerator, run.c
    if not run.eval_idx or not (acc.is_main_process or run.sharded):
        return
    family, denoiser = run.spec.family, unwrapped(acc, run.denoiser)
    args = (run.cached, run.eval_idx, run.spec.encode_each_step)
    score = (family, run.comps, denoiser, *args, c.train, c.eval.seed, c.eval.timesteps)
    if step == 0 and not run.sharded:
        # the base model's score: a pure function of model, data and eval settings, computed
        # once per content and read back by every later run (the EMA equals the weights here)
        lat, cond = heldout_inputs(family, run.comps, *args)
        key = baseline_key(denoiser, lat, cond, c.train, c.eval.seed, c.eval.timesteps)
        folder = run.spec.cache_dir / "scores"
        value, _ = cached_baseline(folder, key, lambda: score_heldout(*score))
    else:
        with _ema_weights(run):  # the main adapter's score
            value = score_heldout(*score)
    bleed = None
    if run.spec.bleed_trigger and not run.sharded:  # (FSDP: not verified, not scored)
        with _ema_weights(run):
            bleed = _bleed(run, denoiser)
    if not acc.is_main_process:
        return
    run.history.add_checkpoint(step, path, heldout=value, bleed=bleed)
    log_scalars(acc, step, heldout_loss=value, bleed=bleed)


def _bleed(run: Run, denoiser: torch.nn.Module) -> float:
    """The held-out bleed score of the current adapter (lorakit/preserve.py): how much it
    changes the prediction on the held-out captions without the trigger."""
    c, spec, trigger = run.c, run.spec, run.spec.bleed_trigger
    args = (spec.family, run.comps, run.cached, run.eval_idx, spec.encode_each_step)
    edit = lambda caption: without_trigger(caption, trigger)  # noqa: E731
    lat, cond = heldout_inputs(*args, edit=edit)
    base_cond = None
    if spec.train_text_encoder and not run.bleed_base:  # base: without the text-encoder LoRA
        with adapters_disabled(*run.text_encoders):
            base_cond = heldout_inputs(*args, edit=edit)[1]
    return heldout_bleed(spec.family, run.comps, denoiser, lat, cond, c.train, c.eval.seed,
                         timesteps=c.eval.timesteps, base_cond=base_cond,
                         base_cache=run.bleed_base)  # fmt: skip


def _ema_weights(run: Run):
    """Inside: the model runs on the EMA weights when `train.ema` is on (else unchanged)."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


def _extract(run: Run, step: int, raw: bool = False):
    """The adapter on rank 0 (None elsewhere); under FSDP every rank must call this. With
    `train.ema` the main adapter holds the EMA weights and `raw=True` gives the trained weights
    themselves (None without `train.ema`: the main adapter is the raw one)."""
    if not (run.accelerator.is_main_process or run.sharded) or (raw and run.ema is None):
        return None
    run.meta.update(ss_steps=str(step))
    if raw:
        return extract_adapter(run.spec.family, run.comps, run.meta)
    with _ema_weights(run):
        adapter = extract_adapter(run.spec.family, run.comps, run.meta)
    if run.ema is not None:
        adapter.metadata["lorakit.ema_decay"] = str(run.c.train.ema_decay)
    return adapter


def _export_to(run: Run, folder: Path, adapter, raw=None) -> dict[str, Path]:
    """The adapter in every export format in `folder`; `raw` (`train.ema`'s raw adapter) the
    same way in `folder/raw/`. Returns the main files."""
    e = run.c.export
    if raw is not None:
        for fmt in e.formats:
            path = EXPORTERS[fmt].default_path(folder / RAW, e.name)
            write_adapter(raw, fmt, path, naming=e.kohya_names, dtype=e.dtype)
    return {
        fmt: write_adapter(
            adapter,
            fmt,
            EXPORTERS[fmt].default_path(folder, e.name),
            naming=e.kohya_names,
            dtype=e.dtype,
        )
        for fmt in e.formats
    }


def _save_checkpoint(run: Run, step: int, adapter: Any = ..., raw: Any = None) -> None:
    """`adapter` (and `raw`, see `_extract`): the ones `_extract` gave, if the caller already
    extracted them (under FSDP extraction is a collective: every rank extracts here or every
    rank already did)."""
    with run.phases("checkpoints"):
        _write_checkpoint(run, step, adapter, raw)


def _write_checkpoint(run: Run, step: int, adapter: Any, raw: Any = None) -> None:
    c, acc, out, result = run.c, run.accelerator, run.out, run.result
    acc.wait_for_everyone()
    if adapter is ...:
        adapter, raw = _extract(run, step), _extract(run, step, raw=True)
    saved = {
        "losses": result.losses,
        "samples": [str(p) for p in result.samples],
        "report": run.history.to_dict(),
    }
    if acc.is_main_process or run.sharded or is_deepspeed(acc):
        state = capture(
            step, run.order, run.params, run.optimizer, run.lr_schedule, acc, saved, run.ema
        )
    final = ckpt.step_dir(out, step)
    if acc.is_main_process:
        try:
            tmp = ckpt.begin(out, step)
            _export_to(run, tmp, adapter, raw)
            atomic_write_text(tmp / "config.toml", c.to_toml())
            fault("save", step)
            ckpt.save_state(tmp, state)
            data = data_fingerprint(run.data.records)  # resume checks the data set against it
            summary = {"step": step, "time": time.time(), "data": data}
            final = ckpt.commit(out, step, tmp, summary)
        except Exception as e:  # anything: the torn folder goes, one paragraph says why
            import shutil

            shutil.rmtree(ckpt.partial_dir(out, step), ignore_errors=True)
            raise save_failed(out, step, e, result.adapters) from e
        ckpt.prune(out, c.train.keep_last)
    if not c.eval.every:
        _score(run, step, EXPORTERS[c.export.formats[0]].default_path(final, c.export.name))
    if not acc.is_main_process:
        return
    result.checkpoints.append(final)
    run.reporter.last_checkpoint = str(final)
    run.reporter.message(f"saved step {step}: {final}")


def _finish(run: Run, step: int) -> None:
    """The final adapter, then (if checkpoints are on) a resumable checkpoint, and the final
    score and grid unless this session already made them. `step`: the last step trained."""
    c, acc, steps, history = run.c, run.accelerator, run.c.train.steps, run.history
    # The adapter before the final checkpoint: a checkpoint that cannot be written must not
    # cost the run its result.
    acc.wait_for_everyone()
    with run.phases("export"):
        adapter, raw = _extract(run, steps), _extract(run, steps, raw=True)
        if acc.is_main_process:
            run.result.adapters = _export_to(run, run.out, adapter, raw)
    if (c.train.save_every or c.train.save_every_epochs) and step > run.start_step:
        # resumable: a finished run can be extended
        _save_checkpoint(run, steps, adapter, raw)
    # Rank-independent conditions: under FSDP every rank must take part or none.
    if steps not in run.scored and not any(rec.step == steps for rec in history.checkpoints):
        final_path = EXPORTERS[c.export.formats[0]].default_path(run.out, c.export.name)
        _score(run, steps, run.result.adapters.get(c.export.formats[0], final_path))
    if (
        run.spec.sampling
        and steps not in run.sampled
        and not any(g.step == steps for g in history.grids)
    ):
        _sample(run, steps)


def _write_outputs(run: Run) -> None:
    """run.json and the run report (main process)."""
    _write_summary(run.result, run.started, run.phases)
    history = run.history
    summary = {
        "data": f"{run.data_dir}: {run.data.summary()}",
        "time": f"{run.phases.first_step:.1f} s to the first step; {run.phases.line()}",
        "held-out images": len(run.eval_idx),
        "brand palette": history.brand_palette.hex() if history.brand_palette else "off",
    }
    write_report_state(run.out, summary, history, run.data_dir)  # `lorakit ema` adds rows
    run.result.report = write_report(run.out, run.c, summary, history)


# ---------------------------------------------------------------------------------------------
# helpers


def _brand_references(run: Run) -> None:
    """What the sample grids are measured against, from (up to 64 of) the training images,
    regularization images excluded, each decoded once: the brand palette (kept in the history,
    so a resumed run keeps its own), the Lab histogram and the texture statistics."""
    c, data = run.c, run.data
    want_palette = c.eval.palette_colors and run.history.brand_palette is None
    # the palette is shown in the report in any case; the other two only measure sample grids
    want_hist = c.eval.lab_emd and run.preview_spec is not None
    want_texture = c.eval.texture and run.preview_spec is not None
    if not (want_palette or want_hist or want_texture):
        return
    idx = [i for i, r in enumerate(data.records) if not r.is_reg]
    idx = idx[:: max(1, len(idx) // 64)][:64]
    images = [
        ((data.pixels(i).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        for i in idx
    ]
    if not images:
        return
    if want_palette:
        run.history.brand_palette = extract_palette(
            images, c.eval.palette_colors, seed=c.train.seed
        )
    if want_hist:
        run.brand_hist = lab_histogram(images)
    if want_texture and len(images) >= 2:  # one image has no spread to measure against
        run.brand_texture = texture_reference(images)


def _num(x) -> float | None:
    return None if x is None else float(full_tensor(x) if isinstance(x, torch.Tensor) else x)


def _banner(
    reporter: Reporter,
    c: Config,
    data,
    data_dir: str,
    procs: int,
    order: BatchOrder,
    resume_from: Path | None,
) -> None:
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
        # escaped: a class image's name starts with "[reg] ", which rich reads as a tag
        reporter.message(f"[yellow]data warnings:[/yellow] {escape(listed)}{more}")
    if resume_from is not None:
        reporter.message(
            f"resuming from {resume_from} (epoch {order.epoch}, batch {order.position})"
        )


def _write_summary(result: TrainResult, started: float, phases: Phases) -> None:
    summary = {
        "adapters": {k: str(v) for k, v in result.adapters.items()},
        "samples": [str(p) for p in result.samples],
        "checkpoints": [str(p) for p in result.checkpoints],
        "losses": result.losses,
        "seconds": round(time.time() - started, 2),
        "seconds_total": round(time.monotonic() - phases.started, 2),  # set-up included
        "seconds_to_first_step": round(phases.first_step, 2),
        "phases": phases.to_dict(),
    }
    atomic_write_text(result.out_dir / "run.json", json.dumps(summary, indent=2))
