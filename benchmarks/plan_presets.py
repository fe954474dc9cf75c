"""`lorakit plan` for shipped presets, with and without `train.block_swap`: a Markdown table of
the predicted need (allocated peak + allocator slack + CUDA context) against the budget in each
preset's name, as recorded in BENCHMARKS.md.

    python benchmarks/plan_presets.py qwen-image z-image flux2-klein

Per preset: the plan as shipped; then `propose(--vram <budget>)` — the `--set` lines the planner
itself adds to fit (from the block-swap step on it tries the smallest `train.block_swap` that
fits); then the shipped preset with `train.block_swap = N` for N = a quarter and half of the
family's blocks (what streaming saves). Planning only: no weights are loaded, nothing runs on a
GPU; the planner's accuracy is the subject of BENCHMARKS.md's "Planner accuracy".
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lorakit import config as cfg
from lorakit import planner
from lorakit.blockswap import block_list
from lorakit.errors import LorakitError

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def _budget(name: str) -> float:
    # the budget in the name, in GiB, as tests/test_planner.py's preset test checks it
    m = re.search(r"(\d+)gb", name)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefixes", nargs="+", help="preset name prefixes, e.g. qwen-image")
    a = ap.parse_args()
    names = sorted(
        p.stem for p in PRESETS.glob("*.toml") if any(p.stem.startswith(x) for x in a.prefixes)
    )
    print("| preset | real model | budget GiB | need GiB (peak phase) | planner's fix for the "
          "budget | block_swap N: need GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in names:
        c = cfg.resolve(preset=name)
        budget = _budget(name)
        p = planner.plan(c)
        fam = planner._family(planner.planner_key(c))
        blocks = len(block_list(planner._real_denoiser(planner.planner_key(c)), fam))
        try:
            sets, fixed = planner.propose(c, budget)
            fix = "fits as shipped" if not sets else (
                f"`{'`, `'.join(sets)}` → {fixed.needed / planner.GIB:.1f}"
            )  # fmt: skip
        except LorakitError as e:
            fix = f"nothing fits: {str(e)[:80]}"
        swaps = []
        for n in sorted({blocks // 4, blocks // 2}):
            try:
                cs = cfg.resolve(preset=name, sets=[f"train.block_swap={n}"])
            except LorakitError:  # e.g. fp8 storage, which block swap cannot stream yet
                swaps.append(f"{n}: refused ({c.model.quantize})")
                continue
            swaps.append(f"{n}: {planner.plan(cs).needed / planner.GIB:.1f}")
        print(
            f"| `{name}` | {p.real} | {budget:.1f} | {p.needed / planner.GIB:.1f} "
            f"({p.peak_phase}) | {fix} | {'; '.join(swaps)} (of {blocks}) |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
