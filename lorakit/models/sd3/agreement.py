"""SD3's `AgreementSupport` (see `lorakit/models/base.py`).

The tiny components need two changes to memorise an image:
- the default tiny transformer (hidden 32, fewer features than a 2×2×16 patch) is too narrow:
  a wider variant of the same config (caption_projection_dim = heads × head_dim) is used, with a
  short T5 sequence;
- SD3 builds its sin-cos position table on `pos_embed_max_size` points spread over
  `sample_size / patch_size` units: the default tiny config (sample_size 8, table 32) puts the
  4×4 patches of a 64 px image 1/8 apart, where their embeddings have cosine 0.9985 — the model
  cannot tell them apart and cannot place anything. sample_size 512 puts them 8 apart (cosine
  ≤ 0.85).
The VAE's `scaling_factor` / `shift_factor` are set so the training image's latent has mean 0
and RMS 1.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.agreement import JOINT_TARGETS, fit_vae_scale, flow_epsilon_target
from lorakit.models.base import AgreementSetting

WIDE = dict(
    attention_head_dim=16, num_attention_heads=8, caption_projection_dim=128, sample_size=512
)


class SD3Agreement:
    targets = (*JOINT_TARGETS, "pos_embed.proj")
    text_length = 64
    """The caption fits (52 tiny-T5 tokens), and the text stream does not cost 20–30× the 16
    image tokens (default 256)."""
    default_tier = True
    default = AgreementSetting(steps=100, threshold=0.6, layout_threshold=0.5)
    slow = AgreementSetting(steps=400, threshold=0.95, layout_threshold=0.9, seeds=(0, 1, 2, 3))
    faults = MappingProxyType({"target": flow_epsilon_target})

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from diffusers import SD3Transformer2DModel

        from lorakit.models.loading import freeze
        from lorakit.models.sd3 import SD3, TINY_SD3_TRANSFORMER

        comps = SD3().build_tiny(seed)
        torch.manual_seed(seed)
        comps.transformer = SD3Transformer2DModel(**dict(TINY_SD3_TRANSFORMER, **WIDE))
        freeze(comps.transformer)
        comps.t5_max_length = self.text_length
        fit_vae_scale(comps.vae, pixels, centre=True)
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        return latents


AGREEMENT = SD3Agreement()
