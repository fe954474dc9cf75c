"""FLUX.2 [klein]'s `AgreementSupport` (see `lorakit/models/base.py`): the default tiny model
(hidden 128: the features of a 2×2×32 patch) with its VAE's batch-norm statistics set to the
training image's patch statistics, as a real FLUX.2 VAE's are the data's, so its latents have
unit scale per patch channel."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from lorakit.models.agreement import flow_epsilon_target, patched
from lorakit.models.base import AgreementSetting
from lorakit.models.flux2_klein import Flux2Klein


def transposed_ids():
    """Image position ids (t, col, row, l) instead of (t, row, col, l)."""
    from lorakit.models import flux2_klein as kl

    original = kl.pack

    def pack(latents):
        tokens, ids = original(latents)
        return tokens, ids[..., [0, 2, 1, 3]]

    return patched(kl, "pack", pack)


def other_text_layers():
    """Prompt embeddings from other Qwen3 hidden states than layers (9, 18, 27)."""
    from lorakit.models import flux2_klein as kl

    return patched(kl, "TEXT_LAYERS", (9, 18, 26))


class KleinAgreement:
    targets = (
        *Flux2Klein.default_targets, "x_embedder", "context_embedder", "proj_out",
        "norm_out.linear", "linear_1", "linear_2", "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    )  # fmt: skip
    text_length = 32
    """Captions are padded to it and the transformer attends to all of it: short keeps it cheap."""
    default_tier = True
    default = AgreementSetting(steps=150, threshold=0.6, layout_threshold=0.6)
    slow = AgreementSetting(steps=400, threshold=0.7, layout_threshold=0.7)
    faults = MappingProxyType(
        {
            "target": flow_epsilon_target,
            "ids": transposed_ids,
            "text_layers": other_text_layers,
        }
    )

    def components(self, pixels: torch.Tensor, seed: int = 0) -> Any:
        from lorakit.models.flux2_klein import _pipe_cls, tiny_flux2_klein

        comps = tiny_flux2_klein(seed)
        comps.max_sequence_length = self.text_length
        with torch.no_grad():
            raw = comps.vae.encode(pixels).latent_dist.mean
            patches = _pipe_cls()._patchify_latents(raw)
            comps.vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
            comps.vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)) + 1e-3)
        return comps

    def latents_from_pipeline(self, pipe, latents, height, width):
        # Flux2KleinPipeline returns the VAE's latents (batch-norm undone, unpatchified)
        from lorakit.models.flux2_klein import normalise

        return normalise(pipe.vae, latents)


AGREEMENT = KleinAgreement()
