"""Original-architecture names for the kohya format: one table entry per ORIGINAL module.

A `Entry` says which diffusers modules (of one component) one original module stands for:
- a rename: one part, e.g. SGM `input_blocks.4.1.proj_in` ← diffusers
  `down_blocks.1.attentions.0.proj_in`;
- a fusion: several parts stacked along the OUTPUT dimension in order, e.g. BFL
  `double_blocks.0.img_attn.qkv` ← `to_q`, `to_k`, `to_v`. `mults` are the parts' output widths
  in units of a common base width (q/k/v: 1 each; FLUX single-block MLP: 4), so a missing part
  can be zero-padded on export and the fused output split on import.
- `swap`: the original module orders its two output halves (scale, shift) the other way round
  (FLUX/SD3 `final_layer.adaLN_modulation.1` vs diffusers `norm_out.linear`, SD3's last
  `context_block.adaLN_modulation.1`).

Tables are built from the families' fixed module tables (`known_modules()`), never from
`named_modules()` of installed libraries. Each naming module (`sgm`, `bfl`, `sd3_names`)
provides `table(family) -> dict[str, Entry]` keyed by `(component, original dotted path)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    component: str
    parts: tuple[str, ...]
    """Diffusers module paths, in the original module's output order."""
    mults: tuple[int, ...] = (1,)
    swap: bool | str = False
    """True, False, or "if_two_chunks" (swap only when out features = 2 × in features)."""

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def identity_table(family, components: tuple[str, ...] | None = None) -> dict:
    """Every module of the given components under its own (diffusers/transformers) name."""
    out = {}
    for target in family.targets:
        if components is not None and target.component not in components:
            continue
        for path in family.known_modules(target.component):
            out[(target.component, path)] = Entry(target.component, (path,))
    return out
