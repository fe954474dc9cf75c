"""Qwen-Image's `AgreementSupport` (see `lorakit/models/base.py`): the tiny transformer widened
to 128 (the default one, 32 wide, has fewer features than a 2×2×16 patch) and the VAE's
per-channel `latents_mean` / `latents_std` set to the training image's, so each channel of its
latent has mean 0 and RMS ≈ 1 (as the released statistics are the data's).

Per channel, not one global pair: the tiny video VAE maps the flat-coloured image to latents
whose per-channel constants hold 82 % of their energy, so with one global pair the layout is a
small signal (RMS ≈ 0.4) that 120 steps do not learn (layout cosine 0.34)."""

from __future__ import annotations

import contextlib
from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.agreement import flow_epsilon_target, patched
from lorakit.models.base import AgreementSetting
from lorakit.models.qwen_image import QwenImage

# sum(axes_dims_rope) = head_dim, as in the default tiny config
WIDE = dict(attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12))


@contextlib.contextmanager
def patch_channel_order():
    """Packing with the channel order (dy, dx, c) instead of the pipeline's (c, dy, dx), in
    `pack_latents` and `unpack_latents` alike: consistent inside lorakit, so the one-step check
    (which reads lorakit's layout off its own `loss`) cannot see it; the samples, unpacked by the
    pipeline's own code, can."""
    from lorakit.models import qwen_image as qi

    def pack(latents):
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(packed, h, w):
        b, _, d = packed.shape
        x = packed.view(b, h // 2, w // 2, 2, 2, d // 4).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, d // 4, h, w)

    with patched(qi, "pack_latents", pack), patched(qi, "unpack_latents", unpack):
        yield


class QwenImageAgreement:
    targets = (
        *QwenImage.default_targets, "img_mod.1", "txt_mod.1", "norm_out.linear", "proj_out",
        "img_in", "txt_in", "linear_1", "linear_2",
    )  # fmt: skip
    text_length = 512
    """The pipeline's default: captions are cut to their own length before the transformer,
    so the padding costs nothing."""
    default_tier = True
    default = AgreementSetting(steps=100, threshold=0.6, layout_threshold=0.6)
    slow = AgreementSetting(steps=400, threshold=0.95, layout_threshold=0.9, seeds=(0, 1, 2, 3))
    faults = MappingProxyType({"target": flow_epsilon_target, "pack": patch_channel_order})

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from diffusers import QwenImageTransformer2DModel

        from lorakit.models.loading import freeze
        from lorakit.models.qwen_image import TINY_QWEN_IMAGE_TRANSFORMER, tiny_qwen_image

        comps = tiny_qwen_image(seed)
        torch.manual_seed(seed)
        comps.transformer = QwenImageTransformer2DModel(**dict(TINY_QWEN_IMAGE_TRANSFORMER, **WIDE))
        freeze(comps.transformer)
        comps.max_sequence_length = self.text_length
        with torch.no_grad():  # the video VAE: one frame
            raw = comps.vae.encode(pixels[:, :, None]).latent_dist.mean
        # per channel, as the real VAE's statistics are the data's (a floor for flat channels)
        mean, var = raw.mean(dim=(0, 2, 3, 4)), raw.var(dim=(0, 2, 3, 4))
        std = (var + 1e-2 * var.mean()).sqrt()
        comps.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        # QwenImagePipeline returns its packed tokens for output_type="latent"; unpacked: frames
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]


AGREEMENT = QwenImageAgreement()
