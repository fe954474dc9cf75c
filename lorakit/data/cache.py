"""On-disk caches of encoder outputs, so unchanged inputs are never encoded twice.

Each entry is one safetensors file named by sha256 of its full key and carrying the key in its
metadata (checked on read). Keys:

- latents: `Record.key` (sha256 of the normalised pixels + bucket + crop) + the VAE identity +
  dtype. A changed image changes its pixels, hence its key; a different VAE changes the identity.
- text-encoder outputs: the caption text + `text_identity` (the encoders' identity, the family
  and the run's text length).

`module_identity(*modules)` is sha256 over each module's class, config and every parameter and
buffer's name, dtype, shape and bytes (≈0.3 s for an SD1.5 VAE on CPU, once per run), so a
fine-tuned or swapped encoder never reuses a stale entry. A damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorakit.fileio import save_safetensors

if TYPE_CHECKING:
    from lorakit.models.base import Family


def canonical_config(config) -> str:
    """A model config as canonical JSON: what determines the module's output, nothing else.
    Private keys go (diffusers' `_use_default_values` is a list whose order follows the hash
    seed, `_name_or_path` the folder it was read from): with them, every new process computed
    another identity and re-encoded every image."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items() if not str(k).startswith("_")}
        if isinstance(v, (set, frozenset)):
            return sorted(clean(x) for x in v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    return json.dumps(clean(d), sort_keys=True)


def module_identity(*modules) -> str:
    """Identity of frozen modules for the caches: class, canonical config and the weights'
    content (sha256 of every tensor's bytes), stable across processes and hash seeds."""
    h = hashlib.sha256()
    for m in modules:
        h.update(type(m).__qualname__.encode())
        config = getattr(m, "config", None)
        if config is not None:
            try:
                h.update(canonical_config(config).encode())
            except (TypeError, ValueError):
                h.update(repr(config).encode())
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            # reshape: a 0-dim buffer (BatchNorm's num_batches_tracked) has no byte view
            # the bytes in place (buffer protocol), not a `tobytes()` copy of every tensor
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()[:32]


def text_identity(family: Family, comps, text_length: int) -> str:
    """Identity of what a cached caption encoding depends on: the text encoders
    (`module_identity`), the family (its encoding convention: which hidden states, template,
    padding) and the run's text length (`RunSpec.text_length`: T5/Qwen tokens per caption; the
    same encoders at another `model.t5_max_length` give other embeddings)."""
    encoders = [m for n, m in family.frozen_modules(comps).items() if n != "vae"]
    return f"{module_identity(*encoders)}:{family.name}:text_length={text_length}"


def vae_identity(vae) -> str:
    """Identity of a VAE for `LatentCache` (see `module_identity`)."""
    return module_identity(vae)


def latent_key(record) -> str:
    """The latent cache key of a `Record`: its content key + bucket + crop, spelled out."""
    (w, h), (top, left) = record.bucket, record.crop_top_left
    return f"{record.key}|{w}x{h}|{top},{left}"


class _Store:
    def __init__(self, folder: Path, identity: str, kind: str):
        self.folder = Path(folder)
        self.identity = identity
        self.kind = kind
        self.computed = 0
        """Entries computed (not found) since this object was made: tests assert on it."""
        self.hits = 0

    def _full(self, key: str) -> str:
        return f"{self.kind}|{key}|{self.identity}"

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(self._full(key).encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                if (f.metadata() or {}).get("key") != self._full(key):
                    return None
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(self.path(key), tensors, {"key": self._full(key)})


class LatentCache(_Store):
    """VAE latents on disk. `get_or_compute(keys, compute)` returns `[N, C, h, w]` in key order;
    `compute(missing_indices)` must return the latents of those positions, in that order."""

    def __init__(self, folder: Path, vae_identity: str, dtype: torch.dtype = torch.float32):
        super().__init__(folder, f"{vae_identity}|{dtype}", "latent")
        self.dtype = dtype

    def get_or_compute(
        self, keys: list[str], compute: Callable[[list[int]], torch.Tensor]
    ) -> torch.Tensor:
        found: list[torch.Tensor | None] = []
        for k in keys:
            entry = self.read(k)
            found.append(None if entry is None else entry["latent"])
        missing = [i for i, t in enumerate(found) if t is None]
        self.hits += len(keys) - len(missing)
        if missing:
            fresh = compute(missing).detach().to("cpu", self.dtype)
            if fresh.shape[0] != len(missing):
                raise ValueError(f"compute returned {fresh.shape[0]} latents for {len(missing)}")
            for i, t in zip(missing, fresh, strict=True):
                self.write(keys[i], {"latent": t.contiguous()})
                found[i] = t
            self.computed += len(missing)
        return torch.stack([t.to(self.dtype) for t in found])  # type: ignore[union-attr]


class TextEncoderCache(_Store):
    """Text-encoder outputs on disk, keyed by caption text + encoder identity.

    `get_or_compute(captions, compute)` returns {name: [N, …]} in caption order;
    `compute(missing_captions)` returns {name: [len(missing), …]} (e.g. `Family.encode_prompts`).
    """

    def __init__(self, folder: Path, encoder_identity: str):
        super().__init__(folder, encoder_identity, "text")

    def get_or_compute(
        self, captions: list[str], compute: Callable[[list[str]], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        found: dict[str, dict[str, torch.Tensor]] = {}
        for cap in dict.fromkeys(captions):
            entry = self.read(cap)
            if entry is not None:
                found[cap] = entry
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        self.hits += len(set(captions)) - len(missing)
        if missing:
            fresh = compute(missing)
            for j, cap in enumerate(missing):
                entry = {k: v[j].detach().to("cpu").float().contiguous() for k, v in fresh.items()}
                self.write(cap, entry)
                found[cap] = entry
            self.computed += len(missing)
        names = sorted(found[captions[0]]) if captions else []
        return {n: torch.stack([found[c][n] for c in captions]) for n in names}


# ---------------------------------------------------------------------------------------------
# what a run caches before its first step


@dataclass
class Cached:
    """What the loop reads per batch instead of running the encoders: per-record latents, the
    captions as prepared (trigger applied), their embeddings and per-image conditioning."""

    latents: list
    """Per record: latents [C, h, w] (fp32, CPU)."""
    captions: list[str]
    cond: dict[str, dict[str, torch.Tensor]]
    """{name: {caption: tensor}} (`encode_captions`); empty when captions are encoded each step."""
    image_cond: dict[str, list[torch.Tensor]]
    """{name: [per-record tensor [1, …]]} (`image_conditioning`; SDXL's time ids)."""
    masks: list = field(default_factory=list)
    """Per record: its loss mask at latent resolution [h, w] (fp32 in [0, 1]) or None (no
    mask); empty when train.masked_loss is off (`data.masks.latent_masks`)."""


@torch.no_grad()
def encode_images(family: Family, comps, data, cache_dir: Path, device, accelerator) -> list:
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
def encode_captions(
    family: Family,
    comps,
    captions: list[str],
    with_empty: bool,
    cache_dir: Path,
    accelerator,
    *,
    text_length: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {caption: tensor}} for every distinct caption (plus "" for caption dropout),
    through the on-disk text cache keyed by caption text and `text_identity`."""
    store = TextEncoderCache(cache_dir / "text", text_identity(family, comps, text_length))
    if not accelerator.is_main_process:
        store.write = _no_write  # type: ignore[method-assign]
    unique = sorted(set(captions) | ({""} if with_empty else set()))
    encoded = store.get_or_compute(unique, lambda caps: family.encode_prompts(comps, caps))
    return {k: {cap: v[j] for j, cap in enumerate(unique)} for k, v in encoded.items()}


def image_conditioning(family: Family, comps, records) -> list[dict[str, torch.Tensor]] | dict:
    """{name: [per-record tensor [1, …]]} of per-image conditioning (SDXL's time ids)."""
    out: dict[str, list[torch.Tensor]] = {}
    for r in records:
        target = (r.bucket[1], r.bucket[0])  # bucket is (w, h); conditioning wants (h, w)
        for k, v in family.image_conditioning(
            comps, r.original_size, r.crop_top_left, target
        ).items():
            out.setdefault(k, []).append(v.float().cpu())
    return out
