"""Write a family's diffusers components as an ORIGINAL-layout single-file checkpoint
(`lorakit merge --single-file`): the layout model sites ship and ComfyUI/A1111/Forge load.

The conversion is the family's (`Family.to_single_file`, from its naming table in
`models/<family>/names.py`); lorakit's single-file loader (`Family.from_single_file`) reads
files through the inverse of the same table, and gives identical weights back
(tests/test_merge_single_file.py, tests/test_names_roundtrip.py — which also checks the table
against diffusers' own original→diffusers converters).
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.fileio import save_safetensors
from lorakit.models.base import Family


def _family(family: Family | str) -> Family:
    if not isinstance(family, str):
        return family
    from lorakit.models import FAMILIES

    if family not in FAMILIES:
        raise LorakitError(
            f"lorakit cannot write a single-file checkpoint for the {family} family; merge "
            "still writes the diffusers folder. Leave out --single-file."
        )
    return FAMILIES[family]


def to_single_file(family: Family | str, comps) -> dict[str, torch.Tensor]:
    """Every weight of `comps` under its original key name (contiguous CPU copies)."""
    return _family(family).to_single_file(comps)


def write_single_file(family: Family | str, comps, path) -> None:
    """Atomically write `to_single_file(...)` as safetensors to `path`."""
    fam = _family(family)
    state = {k: v.detach().cpu().contiguous() for k, v in fam.to_single_file(comps).items()}
    save_safetensors(path, state, {"format": "pt", "lorakit.family": fam.name})
