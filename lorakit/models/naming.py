"""Name tables between diffusers module names and a family's ORIGINAL checkpoint names.

Each family keeps ONE table in `models/<family>/names.py`; everything that maps names derives
its direction from it: kohya export/import of LoRA modules (`Family.kohya_original_table`),
`lorakit merge --single-file` (`Family.to_single_file`) and loading single-file checkpoints
(`Family.from_single_file`). This module holds what the tables are made of.

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
`named_modules()` of installed libraries; keyed by `(component, original dotted path)`.
The same entries convert full weights (`entries_to_original` / `entries_from_original`): a fused
module's weight and bias are the parts' stacked along dim 0, swapped halves swapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def swaps(self, out_features: int, in_features: int) -> bool:
        """Whether the original module's two output halves are in the other order."""
        if self.swap == "if_two_chunks":
            return out_features == 2 * in_features
        return bool(self.swap)


def identity_table(family, components: tuple[str, ...] | None = None) -> dict:
    """Every module of the given components under its own (diffusers/transformers) name."""
    out = {}
    for target in family.targets:
        if components is not None and target.component not in components:
            continue
        for path in family.known_modules(target.component):
            out[(target.component, path)] = Entry(target.component, (path,))
    return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) → (b, a) along dim 0: diffusers' AdaLayerNormContinuous is (scale, shift), original
    files store (shift, scale). Its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies, cut from autograd: what a checkpoint writer stores."""
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


KINDS = ("weight", "bias")


def entries_to_original(
    table: dict, state: dict[str, torch.Tensor], kinds: tuple[str, ...] = KINDS
) -> dict[str, torch.Tensor]:
    """Full weights under diffusers names → original names, one `Entry` at a time: the parts'
    `weight`/`bias` stacked along dim 0 (in the entry's order), halves swapped where the entry
    says. Raises KeyError on a missing weight."""
    out = {}
    for (_, orig), entry in table.items():
        if entry.fused:
            for kind in kinds:
                out[f"{orig}.{kind}"] = torch.cat([state[f"{p}.{kind}"] for p in entry.parts])
            continue
        weight = state[f"{entry.parts[0]}.weight"]
        swap = bool(entry.swap) and entry.swaps(weight.shape[0], weight.shape[1])
        for kind in kinds:
            t = state[f"{entry.parts[0]}.{kind}"]
            out[f"{orig}.{kind}"] = swap_halves(t) if swap else t
    return out


def entries_from_original(
    table: dict, checkpoint: dict[str, torch.Tensor], kinds: tuple[str, ...] = KINDS
) -> dict[str, torch.Tensor]:
    """Inverse of `entries_to_original`: a fused weight split by rows in the ratio of the entry's
    `mults` (KeyError when they do not divide), swapped halves swapped back. Raises KeyError on
    a missing weight."""
    out = {}
    for (_, orig), entry in table.items():
        if entry.fused:
            for kind in kinds:
                t = checkpoint[f"{orig}.{kind}"]
                base, rest = divmod(t.shape[0], sum(entry.mults))
                if rest:
                    raise KeyError(f"{orig}.{kind}: {t.shape[0]} rows do not split {entry.mults}")
                sizes = [m * base for m in entry.mults]
                for part, piece in zip(entry.parts, t.split(sizes), strict=True):
                    out[f"{part}.{kind}"] = piece
            continue
        weight = checkpoint[f"{orig}.weight"]
        swap = bool(entry.swap) and entry.swaps(weight.shape[0], weight.shape[1])
        for kind in kinds:
            t = checkpoint[f"{orig}.{kind}"]
            out[f"{entry.parts[0]}.{kind}"] = swap_halves(t) if swap else t
    return out


class _Reads(dict):
    """A checkpoint that records which keys were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def read_under(checkpoint: dict, prefix: str, convert, skip: tuple = (), ignore: tuple = ()):
    """`convert(part)`, `part` = the checkpoint's keys under `prefix` with the prefix removed
    (except those starting with one of `skip`: other components'). Loading a single file: every
    key of the component must be read by its table; ValueError naming the keys none reads
    (except those ending with one of `ignore`: buffers, unused scalars)."""
    owned = (k for k in checkpoint if k.startswith(prefix) and not k.startswith(skip))
    part = _Reads({k[len(prefix) :]: checkpoint[k] for k in owned})
    out = convert(part)
    unread = sorted(k for k in part if k not in part.read and not k.endswith(ignore))
    if unread:
        raise ValueError(
            f"{len(unread)} keys under '{prefix}' that no naming table maps "
            f"({', '.join(unread[:3])}{' …' if len(unread) > 3 else ''})"
        )
    return out


def from_original(prefix: str, fn, skip: tuple = (), ignore: tuple = ()):
    """A `single_file.load_converted` converter: `fn(model, part)` over the keys under `prefix`
    (see `read_under`)."""
    return lambda model, checkpoint: read_under(
        checkpoint, prefix, lambda part: fn(model, part), skip, ignore
    )
