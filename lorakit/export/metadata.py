"""Header metadata for exported adapters: kohya `ss_*` and Stability AI `modelspec.*`.

All values are strings (safetensors metadata is `dict[str, str]`).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter

from lorakit import __version__
from lorakit.config import Config
from lorakit.fileio import tensor_data_sha256
from lorakit.models.base import Family
from lorakit.spec import RunSpec

MODELSPEC_VERSION = "1.0.1"
PER_FILE = ("lorakit.strength", "lorakit.dora_note")
"""Keys each writer sets for the file it writes (never carried over from the file it read).
`lorakit.strength` says how a loader gets the trained strength: `alpha` (an `.alpha` tensor per
module: ΔW = up·down·alpha/rank), `folded` (alpha/rank multiplied into lora_B, alpha = rank, so a
loader that assumes scale 1 is right), `header` (alpha only in `lora_adapter_metadata`, which
diffusers/peft read)."""


def training_metadata(
    config: Config,
    spec: RunSpec,
    captions: list[str],
    num_images: int,
    started_at: float,
    step: int,
    dataset_name: str = "data",
    components=None,
) -> dict[str, str]:
    """What a run knows about itself; stored in every adapter it writes. With the loaded
    `components`, the base model version and modelspec architecture name the exact variant
    (`variant_metadata`, the family's member). Family and resolution come from the run's
    `spec`, as the run used them."""
    c, family = config, spec.family
    tags: Counter[str] = Counter()
    for caption in captions:
        tags.update(t.strip() for t in caption.split(",") if t.strip())
    res = spec.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dropout": str(c.lora.dropout),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": c.model.name,
        "ss_output_name": c.export.name,
        "ss_resolution": f"({res}, {res})",
        "ss_tag_frequency": json.dumps({dataset_name: dict(tags)}, ensure_ascii=False),
        "ss_num_train_images": str(num_images),
        "ss_learning_rate": str(c.train.lr),
        "ss_unet_lr": str(c.train.lr),
        "ss_lr_scheduler": c.train.lr_scheduler,
        "ss_lr_warmup_steps": str(c.train.warmup_steps),
        "ss_max_train_steps": str(c.train.steps),
        "ss_steps": str(step),
        "ss_optimizer": c.train.optimizer,
        "ss_seed": str(c.train.seed),
        "ss_batch_size_per_device": str(c.train.batch_size),
        "ss_gradient_accumulation_steps": str(c.train.grad_accum),
        "ss_gradient_checkpointing": str(c.train.gradient_checkpointing),
        "ss_mixed_precision": c.train.mixed_precision,
        "ss_max_grad_norm": str(c.train.max_grad_norm),
        "ss_training_started_at": str(started_at),
        "ss_training_comment": f"trigger: {c.data.trigger}" if c.data.trigger else "",
        "modelspec.title": c.export.title or c.export.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.trigger_phrase": c.data.trigger,
        "modelspec.description": c.export.description,
        "lorakit.version": __version__,
        "lorakit.base_model": c.model.name,
        "lorakit.family": family.name,
    }
    if spec.text_length:  # the prompt length it learned with: `lorakit sample` renders with it
        meta["lorakit.text_length"] = str(spec.text_length)
    if components is not None:
        meta |= variant_metadata(family, components)
    return meta


def variant_metadata(family: Family, components) -> dict[str, str]:
    """`ss_base_model_version` / `modelspec.architecture` of the loaded variant, where they
    differ from the family's defaults (`family.variant_metadata(components)`)."""
    return dict(family.variant_metadata(components))


def finalize(
    meta: dict[str, str], family: Family, tensors, rank: int, alpha: float
) -> dict[str, str]:
    """Add what depends on the written tensors: dims, hashes, architecture, date."""
    out = dict(meta)
    digest = tensor_data_sha256(tensors)
    out.update(
        {
            "ss_network_dim": str(rank),
            "ss_network_alpha": _num(alpha),
            "ss_base_model_version": out.get("ss_base_model_version") or family.base_model_version,
            "sshs_model_hash": digest,
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": out.get("modelspec.architecture")
            or family.modelspec_architecture,
            "modelspec.implementation": "diffusers",
            "modelspec.date": out.get("modelspec.date")
            or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.hash_sha256": "0x" + digest,
        }
    )
    out.setdefault("modelspec.title", out.get("ss_output_name", "lorakit"))
    out.setdefault("ss_network_module", "networks.lora")
    return {k: str(v) for k, v in out.items()}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
