"""Step-time cost of the brand controls on the CPU, side by side in one run (issue #15).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/brand_controls.py [--arch mid] [--steps 30]

Variants of the same `lorakit train` command (reference_script.py's model and settings: the
20 `samples/brand` images at 128 px, batch 2, rank 4, torch AdamW, fp32, no previews, no
held-out scoring), each in its own process, alternating over `--rounds`:

- `base`: the plain run;
- `ema`: `train.ema = true` (one EMA update of the LoRA weights per optimizer step);
- `preserve`: `train.preserve_weight = 1.0`, `train.preserve_prompt = "image"` (per micro-batch
  one more forward without gradients — the base prediction, adapter off — and one forward and
  backward with the adapter on the preservation prompt).

Step time = median interval between optimizer steps after `--warmup` steps (a global
optimizer-step hook, as in reference_script.py); the ratio printed is variant / base (1.00 =
free). Then `lorakit plan` for a preset with and without `--recipe style` (which turns
preservation on): the planner's predicted peak and its pass count.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import reference_script as rs  # noqa: E402

VARIANTS = {
    "base": [],
    "ema": ["train.ema=true"],
    "preserve": ["train.preserve_weight=1.0", "train.preserve_prompt='image'"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["tiny", "mid", "sd15"], default="mid")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="sdxl-24gb", help="preset for the planner rows")
    a = ap.parse_args()
    a.checkpointing, a.mixed_precision, a.device = False, "no", "cpu"
    work = Path(tempfile.mkdtemp(prefix="lorakit-brand-"))
    model = work / "model"
    rs.write_model(model, a.arch)
    best: dict[str, float] = {}
    for i in range(a.rounds):
        for name, sets in VARIANTS.items():
            argv = rs.lorakit_argv(model, work / f"out-{name}-{i}", a, work / "cache")
            for s in sets:
                argv += ["--set", s]
            r = rs.run_side("lorakit", argv, work, f"{name}-{i}")
            step = rs.median_step(r, a.warmup)
            best[name] = min(best.get(name, step), step)
            print(f"round {i + 1} {name:>9}: median step {step * 1e3:7.1f} ms", flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, model "
        f"{a.arch}, {a.resolution} px, batch {rs.BATCH}, {a.steps} steps, best of {a.rounds}"
    )
    for name in VARIANTS:
        print(f"{name:>9}: {best[name] * 1e3:7.1f} ms/step   {best[name] / best['base']:.2f}x base")
    print(f"\nlorakit plan --preset {a.preset} [--recipe style] (predicted, real architecture):")
    for extra in ([], ["--recipe", "style", "--set", "data.trigger='tdwl'"]):
        cmd = [sys.executable, "-m", "lorakit.cli", "plan", "--preset", a.preset, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [x for x in p.stdout.splitlines() if "needed" in x or "passes" in x or "anti-bleed"
                 in x or "train phase" in x]  # fmt: skip
        print("  with the style recipe:" if extra else "  preset alone:")
        for x in lines:
            print("   ", x.strip())


if __name__ == "__main__":
    main()
