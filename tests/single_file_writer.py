"""Test helper: write diffusers components as an ORIGINAL-layout single-file checkpoint.

The converters live in the product (`lorakit.export.single_file`, used by `lorakit merge
--single-file`); the tests use the same functions to save the tiny models the way model sites
ship real ones. Loading such a file back through lorakit (= diffusers' forward converters) and
getting identical weights checks both directions.
"""

from lorakit.export.single_file import (  # noqa: F401  (re-exported for the tests)
    clip_to_ldm,
    flux_transformer_to_original,
    openclip_to_ldm,
    sd3_transformer_to_original,
    to_original,
    unet_to_ldm,
    vae_to_ldm,
)
