"""SD1.5 names: diffusers ↔ the original ldm (CompVis) checkpoint layout.

- kohya LoRA names: kohya trains SD1.5 on the diffusers UNet, so its `original` naming IS the
  diffusers module names (`kohya_table` → None: identity).
- Single-file checkpoints: `model.diffusion_model.` (UNet, ldm numbering from the shared table in
  `models/ldm_names.py` with SD1.5's block list), `first_stage_model.` (VAE),
  `cond_stage_model.transformer.` (CLIP-L). `to_single_file` writes them (`lorakit merge
  --single-file`), `FROM_SINGLE_FILE` reads them back (`SD15.from_single_file`), both from the
  same ldm tables.
"""

from __future__ import annotations

import torch

from lorakit.models import ldm_names as ldm
from lorakit.models.naming import detached, from_original

SINGLE_FILE_MARKERS = ("cond_stage_model.transformer.text_model.",)
"""Key prefixes only an SD1.5 single-file checkpoint has."""
LAYERS_PER_BLOCK = 2
UP_HAS_ATTENTION = (False, True, True, True)
"""Real SD1.5 UNet: 4 levels, the first up block without attention."""
UNET_PAIRS = ldm.unet_prefix_map(LAYERS_PER_BLOCK, UP_HAS_ATTENTION)
CLIP_PREFIX = "cond_stage_model.transformer."


def ldm_module_name(path: str) -> str:
    """diffusers UNet module path → its ldm path in a real SD1.5 checkpoint."""
    return ldm.to_ldm(path, UNET_PAIRS)


def kohya_table(family) -> dict | None:
    """kohya's `original` names for SD1.5 are the diffusers names: None (identity)."""
    return None


def to_single_file(components) -> dict[str, torch.Tensor]:
    """Every weight of `components` under its ldm key (contiguous detached copies)."""
    state = {**ldm.unet_to_ldm(components.unet), **ldm.vae_to_ldm(components.vae)}
    state |= ldm.clip_to_ldm(components.text_encoder, CLIP_PREFIX)
    return detached(state)


FROM_SINGLE_FILE = {
    "unet": from_original(ldm.UNET_PREFIX, ldm.unet_from_ldm),
    "vae": from_original(ldm.VAE_PREFIX, ldm.vae_from_ldm),
    "text_encoder": from_original(CLIP_PREFIX, ldm.clip_from_ldm, ignore=ldm.CLIP_IGNORED),
}
"""component → converter of `single_file.load_converted`: the inverse of `to_single_file`."""
