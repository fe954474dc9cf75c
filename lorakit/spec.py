"""A run's decisions, resolved once from the config and the model family before anything runs.

    spec = build_spec(config, family)        # pure: no model loaded, no device touched
    spec.targets, spec.bucket_step, spec.encode_each_step, …

Every other module (train, data loading, sampling, metadata, the planner) reads these values
from the `RunSpec` instead of deriving them again from the config, so `prepare`, `plan` and
`train` cannot disagree on what a run does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorakit.blockswap import check_family
from lorakit.config import Config, DataConfig, LoraConfigSection, check_stream_encoders
from lorakit.data.buckets import auto_step, family_step, make_buckets
from lorakit.models.base import Family
from lorakit.preserve import Preservation, check_preservation, preservation

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""`train.mixed_precision` → dtype of the frozen weights and of the batches."""


@dataclass(frozen=True)
class RunSpec:
    """What a run does, decided once (see `build_spec`)."""

    family: Family
    """The model family (registry object). Read by train (model calls, LoRA, caching, metadata)."""
    targets: tuple[str, ...]
    """Denoiser modules that get a LoRA: `lora.target_modules`, or the family's
    `default_targets` when that is empty. Read by train (`inject_lora`)."""
    train_text_encoder: bool
    """Whether the CLIP text encoders get a LoRA too (`lora.train_text_encoder`). Read by train
    (injection, grad during encoding, previews)."""
    text_encoder_targets: tuple[str, ...]
    """Text-encoder modules that get a LoRA (`lora.text_encoder_target_modules`); empty when
    `train_text_encoder` is off. For lora.py's `inject_text_encoder_lora` and the planner."""
    text_encoder_rank: int
    """Text-encoder LoRA rank: `lora.text_encoder_rank`, 0 meaning the denoiser's `lora.rank`
    (0 when `train_text_encoder` is off). For lora.py and the planner."""
    text_encoder_alpha: float
    """Text-encoder LoRA alpha: `lora.text_encoder_alpha`, 0 meaning `lora.alpha` (0 when
    off)."""
    text_encoder_lora: LoraConfigSection | None
    """The `lora` section as the text encoders get it (rank, alpha and target modules above;
    dropout, init and adapter kind shared with the denoiser); None when off. Read by train
    (`inject_text_encoder_lora`)."""
    mixed_precision: str
    """`train.mixed_precision` ('no', 'fp16', 'bf16'): the Accelerator's autocast. Read by
    train."""
    weight_dtype: torch.dtype
    """dtype of the frozen weights and of each batch (fp32 / fp16 / bf16 from
    `mixed_precision`); trainable LoRA weights stay fp32. Read by train."""
    pixel_multiple: int
    """Every bucket side must be a multiple of this (the family's `pixel_multiple`: 8 = the VAE
    factor, 16 where 2×2 latent patches are packed). Read by data loading (`check_prepared`)."""
    bucket_step: int
    """Bucket side step in pixels: `data.bucket_step` (0 = auto) rounded up to `pixel_multiple`.
    Read through `data`."""
    data: DataConfig
    """`config.data` with `bucket_step` set to the family's step when it differs from the
    automatic one (else the config's own object, so prepare-cache keys stay unchanged). Read by
    train (`load_training_set`) and, through `bucketed_data`, by `lorakit prepare`."""
    resolution: int
    """Training resolution (`data.resolution`): target area R² of every bucket. Read by train
    (preview grid size) and sampling."""
    buckets: tuple[tuple[int, int], ...]
    """The (width, height) buckets images are assigned to: one square (R, R) without
    `data.bucketing`, else `make_buckets(R, bucket_step, data.bucket_max_ratio)`. For reports and
    the planner (the largest bucket sets the activation size)."""
    text_length: int
    """Token length of the long (T5) text encoder: `model.t5_max_length`, 0 meaning the family's
    `text_length` (0 for families without T5). For the planner and the families' loaders."""
    encode_each_step: bool
    """Captions are encoded anew every step instead of cached once: a text-encoder LoRA changes
    the embeddings, and tag shuffling changes the strings. Read by train (no text cache, grad
    through the encoders, held-out scoring) and sampling (encoders stay on the device)."""
    cache_empty_caption: bool
    """The text cache also holds the empty caption (`data.caption_dropout` > 0). Read by train."""
    sampling: bool
    """Preview grids are rendered during the run (`sample.every`, `every_minutes` or
    `every_epochs` set). Read by train."""
    preview_embeds: bool
    """Preview prompts are encoded once up front (sampling on, the text encoders frozen, and the
    family's pipeline takes prompt embeddings: `sampling.pre_encodes`), so grids need only the
    denoiser and the VAE on the device. Read by train and the planner (sample phase)."""
    encoders_stay_on_device: bool
    """The VAE and text encoders stay on the training device for the whole run (they encode
    every step); otherwise they leave it after caching and return only for previews. Read by
    train and sampling (`render_preview`'s `keep_on_device`)."""
    block_swap: int
    """`train.block_swap`: how many of the denoiser's last transformer blocks stream their
    frozen weights from host memory (0 = off); checked against the family here. Read by train
    (`_place_for_training`, `blockswap.enable_block_swap`) and the planner."""
    fp8_storage: bool
    """`model.quantize = "fp8"`: the denoiser's frozen Linear/Conv weights are stored in float8
    once its weights are read (`quantize.enable_fp8_storage`). Read by train (`_load_model`,
    `_place_for_training`)."""
    fp8_matmul: bool
    """`model.fp8_matmul`: the fp8-stored Linear layers multiply in fp8 (`quantize.
    enable_fp8_matmul`), applied with the fp8 storage. Read by train (`_store_fp8`)."""
    stream_encoders: bool
    """`train.stream_encoders`: while caching, the frozen text encoders stay in host memory and
    their repeated layers' weights are streamed to the device as they run
    (`lorakit/encoder_stream.py`); refused with `encode_each_step`. Read by train (`_load_model`,
    `_cache`) and the planner (the caching phase)."""
    preservation: Preservation | None
    """Anti-bleed preservation (`train.preserve_weight` > 0): the weight and how each caption's
    preservation prompt is made (`lorakit/preserve.py`); None = off. Read by train (text cache,
    the extra forward and backward passes) and the planner."""
    prior_weight: float
    """DreamBooth prior preservation: λ of the class-image loss (`train.prior_weight`) when
    `data.reg_folder` is set, else 0 (off). Each micro-batch then adds a class batch of as many
    class images, its own forward and backward (lorakit/data/reg.py). Read by the planner (two
    passes, both batches' tensors); train turns it on from the records (a prepared set may carry
    class images) with `train.prior_weight`."""
    bleed_trigger: str
    """The trigger the held-out bleed score removes from the captions: `data.trigger` when
    `eval.bleed` is on and `eval.images` > 0, else "" (no bleed score). Read by train."""
    cache_dir: Path
    """Latent and text-encoder caches: `data.cache_dir`, or OUT/cache. Read by train."""


def bucketed_data(data: DataConfig, pixel_multiple: int) -> DataConfig:
    """`data` with the bucket step a model of `pixel_multiple` needs: `data.bucket_step` (0 =
    auto: 64 px, or 8 px below 256 px) rounded up to the multiple. Unchanged (the same object)
    when the automatic step already fits, so the prepare cache's parameter key stays the same.
    `train` (through `build_spec`) and `lorakit prepare` both call this."""
    step = family_step(data.resolution, data.bucket_step, pixel_multiple)
    if step == auto_step(data.resolution, data.bucket_step):
        return data
    return replace(data, bucket_step=step)


def masked_data(c, data: DataConfig) -> DataConfig:
    """`data` with `mask_flatten` on when `train.masked_loss` has `train.mask_background = 0`:
    then nothing outside a mask is learned and nothing of it is seen either (images with a mask
    file are flattened through it, as a transparent PNG's alpha is), so two sets that differ only
    outside their masks train bit-identical adapters. With a background weight above 0 the
    surroundings stay in the images as context (unless `data.mask_flatten = true`). `train` (via
    `build_spec`) and `lorakit prepare` both call this."""
    if c.train.masked_loss and c.train.mask_background == 0 and not data.mask_flatten:
        return replace(data, mask_flatten=True)
    return data


def any_family_multiple(families) -> int:
    """The pixel multiple that suits every family in `families` (a set prepared without a
    model trains on any of them)."""
    return math.lcm(*(f.pixel_multiple for f in families))


def text_encoder_section(lora: LoraConfigSection) -> LoraConfigSection:
    """`lora` with the text-encoder rank, alpha and targets in place of the denoiser's (0 rank
    or alpha = the denoiser's)."""
    return replace(
        lora,
        rank=lora.text_encoder_rank or lora.rank,
        alpha=lora.text_encoder_alpha or lora.alpha,
        target_modules=list(lora.text_encoder_target_modules),
    )


def build_spec(config: Config, family: Family) -> RunSpec:
    """Every run decision from `config` and the resolved `family`; nothing is loaded."""
    c = config
    data = masked_data(c, bucketed_data(c.data, family.pixel_multiple))
    step = family_step(c.data.resolution, c.data.bucket_step, family.pixel_multiple)
    res = c.data.resolution
    if c.data.bucketing:
        buckets = tuple(make_buckets(res, step, c.data.bucket_max_ratio))
    else:
        buckets = ((res, res),)
    te = c.lora.train_text_encoder
    te_lora = text_encoder_section(c.lora) if te else None
    encode_each_step = te or c.data.shuffle_tags
    check_family(family, c.train.block_swap)  # a UNet family has no blocks to stream
    check_stream_encoders(c)  # captions encoded every step need the encoders resident
    check_preservation(c)  # preservation needs the base model's caption embeddings
    sampling = bool(c.sample.every or c.sample.every_minutes or c.sample.every_epochs)
    from lorakit.sampling import pre_encodes  # (lazy: sampling imports the image stack)

    return RunSpec(
        family=family,
        targets=tuple(c.lora.target_modules or family.default_targets),
        train_text_encoder=te,
        text_encoder_targets=tuple(te_lora.target_modules) if te_lora else (),
        text_encoder_rank=te_lora.rank if te_lora else 0,
        text_encoder_alpha=te_lora.alpha if te_lora else 0.0,
        text_encoder_lora=te_lora,
        mixed_precision=c.train.mixed_precision,
        weight_dtype=WEIGHT_DTYPES[c.train.mixed_precision],
        pixel_multiple=family.pixel_multiple,
        bucket_step=step,
        data=data,
        resolution=res,
        buckets=buckets,
        text_length=c.model.text_length(family.text_length),
        encode_each_step=encode_each_step,
        cache_empty_caption=c.data.caption_dropout > 0,
        sampling=sampling,
        preview_embeds=sampling and not te and pre_encodes(family),
        encoders_stay_on_device=encode_each_step,
        block_swap=c.train.block_swap,
        fp8_storage=c.model.quantize == "fp8",
        fp8_matmul=c.model.fp8_matmul,
        stream_encoders=c.train.stream_encoders,
        preservation=preservation(c),
        prior_weight=c.train.prior_weight if c.data.reg_folder else 0.0,
        bleed_trigger=c.data.trigger if c.eval.bleed and c.eval.images > 0 else "",
        cache_dir=Path(c.data.cache_dir) if c.data.cache_dir else Path(c.train.out) / "cache",
    )


def frozen_dtype(
    name: str, module, weight_dtype: torch.dtype, bf16_supported: bool | None = None
) -> torch.dtype:
    """dtype of a frozen module (`Family.frozen_modules` name) under `weight_dtype`: VAEs stay
    fp32 (SD-family VAEs overflow in fp16); T5 overflows in fp16 too, so under fp16 it runs in
    bf16 where the device supports it (`bf16_supported`; None = ask CUDA), else fp32. Read by
    train (placing the frozen modules), the planner (their bytes) and `loading.target_dtype`
    (the dtype they load in; it passes the class name, `frozen_dtype_of`)."""
    return frozen_dtype_of(name, type(module).__name__, weight_dtype, bf16_supported)


def frozen_dtype_of(
    name: str, class_name: str, weight_dtype: torch.dtype, bf16_supported: bool | None = None
) -> torch.dtype:
    """`frozen_dtype` of a module of class `class_name`, without the module."""
    if name == "vae":
        return torch.float32
    if weight_dtype == torch.float16 and class_name.startswith("T5"):
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float32
    return weight_dtype


def place_frozen(family, comps, device: torch.device, weight_dtype: torch.dtype) -> None:
    """The frozen modules (VAE, text encoders) onto `device` in their `frozen_dtype`: what a
    command that encodes or renders outside `train` (class images, post-hoc EMA scoring) does
    before it starts."""
    for name, module in family.frozen_modules(comps).items():
        if module is not None:
            module.to(device, frozen_dtype(name, module, weight_dtype))
