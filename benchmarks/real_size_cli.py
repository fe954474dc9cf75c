"""One real-width CLI run per family on a GPU: 8-bit AdamW, a checkpoint, a resume and every export.

The issue it checks (#17): tiny models keep every LoRA tensor under bitsandbytes' 4096-element
threshold, so 8-bit optimizer state, checkpoints of it and the exporters' real-width key maps
were never exercised on CUDA. Per family this script writes a diffusers folder whose denoiser has
the REAL model's widths (SD1.5/SDXL UNets at full depth; SD3.5-large and FLUX.1-dev transformers at
their real width and reduced depth) with random bf16 weights, and the tiny text encoders and VAE
(the denoiser's conditioning widths follow them, so everything stays shape-consistent). Then,
through the real CLI:

1. `lorakit train … --steps 4 --set train.save_every=2` (adamw8bit, bf16, rank 16, 128 px:
   `samples/brand` is 192 px);
2. `lorakit train … --resume latest --steps 6` (reads the step-4 checkpoint back);
3. `lorakit export RUN --format all` and `lorakit inspect` of every file written.

It records exit codes, seconds, the number of 8-bit (uint8) optimizer tensors in the last
checkpoint (> 0 proves the state really is 8-bit), peak CUDA memory and the files. JSON lines
go to $OUT/real_size_cli.json. `--tiny` runs the same on the CPU with the tiny denoisers (script
check; fp32, torch AdamW where bitsandbytes' CPU path is missing).

    python benchmarks/real_size_cli.py [--tiny] [--families sd15,sdxl,sd3,flux]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Keys of the real denoiser config that must follow the (tiny) text encoders and VAE it is
# saved with; every other key (widths, heads, depth) stays the real model's.
CONDITIONING_KEYS = (
    "in_channels", "out_channels", "cross_attention_dim", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "joint_attention_dim", "pooled_projection_dim",
    "guidance_embeds", "sample_size",
)  # fmt: skip
BUILD_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCED_DEPTH = {"sd3": {"num_layers": 2}, "flux": {"num_layers": 1, "num_single_layers": 1}}


def write_model(family: str, folder: Path, tiny: bool) -> dict:
    from lorakit import planner
    from lorakit.models import get_family

    fam = get_family(family)
    comps = fam.build_tiny(seed=0)
    info = {"family": family}
    if not tiny:
        small = getattr(comps, fam.denoiser_name)
        real = planner.build_denoiser(family)  # meta device: config only
        cfg = {k: v for k, v in dict(real.config).items() if not k.startswith("_")}
        cfg.update({k: small.config[k] for k in CONDITIONING_KEYS if k in small.config})
        cfg.update(REDUCED_DEPTH.get(family, {}))
        torch.manual_seed(0)
        with torch.device(BUILD_DEVICE):
            model = type(real).from_config(cfg).to(torch.bfloat16)
        setattr(comps, fam.denoiser_name, model.to("cpu"))
        info["denoiser_params"] = sum(p.numel() for p in model.parameters())
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fam.save(comps, str(folder))
    return info


def lorakit(*args: str, limit: int = 400) -> tuple[int, float, str]:
    t0 = time.time()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=limit
        )
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timeout after {limit} s: {e}"
    return rc, round(time.time() - t0, 1), text[-1500:]


def in_process(*args: str) -> tuple[int, float, str]:
    """A lorakit command in this process (a CLI start costs ~20 s on the GPU machine)."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    t0 = time.time()
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, round(time.time() - t0, 1), r.output[-1500:]


def inspect_rc(path: Path) -> int:
    return in_process("inspect", str(path))[0]


def eight_bit_tensors(run: Path) -> int:
    from safetensors import safe_open

    ckpts = sorted((run / "checkpoints").glob("step-*"))
    if not ckpts:
        return -1
    with safe_open(str(ckpts[-1] / "state.safetensors"), framework="pt") as f:
        return sum(
            1 for k in f.keys() if k.startswith("optim") and f.get_slice(k).get_dtype() == "U8"
        )


def one_family(family: str, tiny: bool, work: Path) -> dict:
    model = work / f"model-{family}"
    row = write_model(family, model, tiny)
    run = work / f"run-{family}"
    device = "cpu" if tiny else "cuda"
    common = [
        str(ROOT / "samples" / "brand"), "--preset", "tiny-cpu", "--model", str(model),
        "--out", str(run), "--rank", "16",
        "--set", f"model.family='{family}'", "--set", f"train.device='{device}'",
        "--set", f"train.mixed_precision='{'no' if tiny else 'bf16'}'",
        "--set", "train.optimizer='adamw8bit'",
        "--set", f"train.optimizer_fallback={str(tiny).lower()}",
        "--set", "train.save_every=2", "--set", "sample.every=0", "--set", "train.batch_size=1",
        "--set", f"data.resolution={64 if tiny else 128}",
    ]  # fmt: skip
    row["train"] = lorakit("train", *common, "--steps", "4")
    row["eight_bit_tensors"] = eight_bit_tensors(run)
    row["resume"] = lorakit("train", *common, "--steps", "6", "--resume", "latest")
    exported = work / f"export-{family}"
    row["export_all"] = in_process("export", str(run), "--format", "all", "--out", str(exported))
    files = sorted(exported.rglob("*.safetensors")) + sorted(run.glob("*.safetensors"))
    row["files"] = [str(f.relative_to(work)) for f in files]
    row["inspect"] = {str(f.relative_to(work)): inspect_rc(f) for f in files}
    run_json = run / "run.json"
    if run_json.is_file():
        meta = json.loads(run_json.read_text())
        row["losses"] = meta.get("losses")
        row["peak_mem"] = meta.get("peak_mem") or meta.get("peak_memory")
    row["ok"] = (
        row["train"][0] == 0
        and row["resume"][0] == 0
        and row["export_all"][0] == 0
        and all(rc == 0 for rc in row["inspect"].values())
        and (tiny or row["eight_bit_tensors"] > 0)
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny denoisers (checks the script)")
    ap.add_argument("--families", default="flux,sd3,sdxl,sd15")  # riskiest first
    ap.add_argument("--deadline", type=float, default=1e9, help="start no family after N s")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "gpu-session-out")) / "real_size_cli.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real-size-"))
    rows = []
    start = time.time()
    for family in a.families.split(","):
        t0 = time.time()
        if t0 - start > a.deadline:
            print(f"{family}: not started (--deadline {a.deadline:.0f} s)", flush=True)
            continue
        try:
            row = one_family(family, a.tiny, work)
        except Exception as e:  # one family's failure must not lose the others' rows
            row = {"family": family, "ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        print(
            f"{family}: ok={row['ok']} 8-bit tensors={row.get('eight_bit_tensors')} "
            f"train={row.get('train', ['-'])[0]} resume={row.get('resume', ['-'])[0]} "
            f"export={row.get('export_all', ['-'])[0]} {row['seconds']} s",
            flush=True,
        )
        if not row["ok"]:
            for step in ("train", "resume", "export_all"):
                if step in row and row[step][0] != 0:
                    print(f"  {step}: {row[step][2]}", flush=True)
            if "error" in row:
                print(f"  {row['error']}", flush=True)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
