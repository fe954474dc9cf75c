"""Test helper: write diffusers components as an ORIGINAL-layout single-file checkpoint.

The converters live in the product (each family's `names.py`, used by `lorakit merge
--single-file` through `Family.to_single_file`); the tests use the same functions to save the
tiny models the way model sites ship real ones. Loading such a file back through lorakit (the
inverse of the same tables) and getting identical weights checks both directions; the tables are
checked against diffusers' own converters in tests/test_names_roundtrip.py.
"""

from lorakit.models import FAMILIES
from lorakit.models.flux.names import (  # noqa: F401  (re-exported for the tests)
    transformer_to_original as flux_transformer_to_original,
)
from lorakit.models.ldm_names import (  # noqa: F401  (re-exported for the tests)
    clip_to_ldm,
    openclip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from lorakit.models.sd3.names import (  # noqa: F401  (re-exported for the tests)
    transformer_to_original as sd3_transformer_to_original,
)


def to_original(family: str, comps) -> dict:
    """All weights of `comps` under original key names, as one checkpoint dict."""
    return FAMILIES[family].to_single_file(comps)
