"""FLUX.1's `AgreementSupport` (see `lorakit/models/base.py`): the default tiny transformer
(hidden 32, fewer features than a 2×2×16 patch) widened to 128, a short T5 sequence, the VAE's
`scaling_factor` / `shift_factor` set so the training image's latent has mean 0 and RMS 1."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.agreement import (
    JOINT_TARGETS,
    fit_vae_scale,
    flow_epsilon_target,
    patched,
)
from lorakit.models.base import AgreementSetting

# sum(axes_dims_rope) = head_dim, as in the default tiny config
WIDE = dict(attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12))


def transposed_ids():
    """Image position ids transposed, (0, col, row) instead of (0, row, col)."""
    from lorakit.models import flux

    original = flux.image_ids

    def image_ids(h, w, device=None, dtype=torch.float32):
        return original(h, w, device, dtype)[:, [0, 2, 1]]

    return patched(flux, "image_ids", image_ids)


class FluxAgreement:
    targets = (*JOINT_TARGETS, "x_embedder", "norm.linear", "proj_mlp")
    text_length = 64
    """The caption fits (52 tiny-T5 tokens); the default 512 would dominate the cost."""
    default_tier = True
    default = AgreementSetting(steps=100, threshold=0.6, layout_threshold=0.5)
    slow = AgreementSetting(steps=400, threshold=0.95, layout_threshold=0.9, seeds=(0, 1, 2, 3))
    faults = MappingProxyType({"target": flow_epsilon_target, "ids": transposed_ids})

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from diffusers import FluxTransformer2DModel

        from lorakit.models.flux import TINY_FLUX_TRANSFORMER, tiny_flux
        from lorakit.models.loading import freeze

        comps = tiny_flux(seed)
        torch.manual_seed(seed)
        comps.transformer = FluxTransformer2DModel(**dict(TINY_FLUX_TRANSFORMER, **WIDE))
        freeze(comps.transformer)
        comps.t5_max_length = self.text_length
        fit_vae_scale(comps.vae, pixels, centre=True)
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        # FluxPipeline returns its packed tokens for output_type="latent"
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


AGREEMENT = FluxAgreement()
