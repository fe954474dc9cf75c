"""SDXL names: diffusers ↔ the original SGM (`generative-models`) checkpoint layout.

- kohya LoRA names (`original` naming): the UNet in SGM names (`lora_unet_input_blocks_4_1_…`,
  from the shared ldm table in `models/ldm_names.py` with SDXL base's block list:
  `layers_per_block` = 2, 3 levels, attention on levels 1 and 2 — tiny models must use the same
  to be read by name), the text encoders under their transformers names.
- Single-file checkpoints: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE),
  `conditioner.embedders.0.transformer.` (CLIP-L) and `conditioner.embedders.1.model.` (OpenCLIP
  bigG: fused in_proj q/k/v, `text_projection` stored transposed). `to_single_file` writes them
  (`lorakit merge --single-file`), `FROM_SINGLE_FILE` reads them back (`SDXL.from_single_file`),
  both from the same ldm tables.
"""

from __future__ import annotations

import torch

from lorakit.models import ldm_names as ldm
from lorakit.models.naming import detached, from_original

SINGLE_FILE_MARKERS = ("conditioner.embedders.1.model.",)
"""Key prefixes only an SDXL single-file checkpoint has."""
LAYERS_PER_BLOCK = 2
UP_HAS_ATTENTION = (True, True, False)
"""Real SDXL base UNet: 3 levels, the last up block without attention."""
UNET_PAIRS = ldm.unet_prefix_map(LAYERS_PER_BLOCK, UP_HAS_ATTENTION)
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."


def sgm_name(path: str) -> str:
    """diffusers UNet module path → its SGM path in a real SDXL checkpoint."""
    return ldm.to_ldm(path, UNET_PAIRS)


def kohya_table(family) -> dict:
    """(component, original path) → Entry: UNet in SGM names, text encoders as they are."""
    return ldm.unet_table(family, UNET_PAIRS, ("text_encoder", "text_encoder_2"))


def to_single_file(components) -> dict[str, torch.Tensor]:
    """Every weight of `components` under its SGM key (contiguous detached copies)."""
    state = {**ldm.unet_to_ldm(components.unet), **ldm.vae_to_ldm(components.vae)}
    state |= ldm.clip_to_ldm(components.text_encoder, CLIP_PREFIX)
    state |= ldm.openclip_to_ldm(components.text_encoder_2, OPENCLIP_PREFIX)
    return detached(state)


FROM_SINGLE_FILE = {
    "unet": from_original(ldm.UNET_PREFIX, ldm.unet_from_ldm),
    "vae": from_original(ldm.VAE_PREFIX, ldm.vae_from_ldm),
    "text_encoder": from_original(CLIP_PREFIX, ldm.clip_from_ldm, ignore=ldm.CLIP_IGNORED),
    "text_encoder_2": from_original(
        OPENCLIP_PREFIX, ldm.openclip_from_ldm, ignore=ldm.CLIP_IGNORED
    ),
}
"""component → converter of `single_file.load_converted`: the inverse of `to_single_file`."""
