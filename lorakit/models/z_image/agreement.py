"""Z-Image's `AgreementSupport` (see `lorakit/models/base.py`): the tiny transformer widened to
128 (head dim 32) and the VAE's `scaling_factor` / `shift_factor` set so the training image's
latent has mean 0 and RMS 1."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.agreement import fit_vae_scale, flow_epsilon_target, patched
from lorakit.models.base import AgreementSetting

# dim = n_heads × sum(axes_dims), as in the default tiny config
WIDE = dict(dim=128, n_heads=4, n_kv_heads=4, axes_dims=[8, 12, 12])


def padded_captions():
    """The zero padding of cached captions reaches the transformer (`unpad_captions` returning
    every padded row)."""
    from lorakit.models import z_image

    return patched(z_image, "unpad_captions", lambda cond: list(cond["cap_feats"].unbind(0)))


class ZImageAgreement:
    targets = (
        "to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3", "noise_refiner.0.adaLN_modulation.0", "layers.0.adaLN_modulation.0",
        "layers.1.adaLN_modulation.0", "adaLN_modulation.1", "linear", "all_x_embedder.2-1",
        "cap_embedder.1", "mlp.0", "mlp.2",
    )  # fmt: skip
    text_length = 128
    """`max_sequence_length` with the chat template included: the caption fits."""
    default_tier = True
    default = AgreementSetting(steps=100, threshold=0.6, layout_threshold=0.5)
    slow = AgreementSetting(steps=400, threshold=0.95, layout_threshold=0.9)
    faults = MappingProxyType({"target": flow_epsilon_target, "caption_padding": padded_captions})

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from lorakit.models.z_image import tiny_z_image

        comps = tiny_z_image(seed, **WIDE)
        comps.max_sequence_length = self.text_length
        fit_vae_scale(comps.vae, pixels, centre=True)
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        return latents


AGREEMENT = ZImageAgreement()
