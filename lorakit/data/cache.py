"""On-disk caches of encoder outputs, so unchanged inputs are never encoded twice.

Each entry is one safetensors file named by sha256 of its full key and carrying the key in its
metadata (checked on read). Keys:

- latents: `Record.key` (sha256 of the normalised pixels + bucket + crop) + the VAE identity +
  dtype. A changed image changes its pixels, hence its key; a different VAE changes the identity.
- text-encoder outputs: the caption text + the encoder identity.

`module_identity(*modules)` is sha256 over each module's class, config and every parameter and
buffer's name, dtype, shape and bytes (≈0.3 s for an SD1.5 VAE on CPU, once per run), so a
fine-tuned or swapped encoder never reuses a stale entry. A damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorakit.fileio import save_safetensors


def module_identity(*modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(type(m).__qualname__.encode())
        config = getattr(m, "config", None)
        if config is not None:
            try:
                h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
            except (TypeError, ValueError):
                h.update(repr(config).encode())
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


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
