"""lorakit against the diffusers reference LoRA script on the same work, side by side.

The reference is diffusers' `examples/text_to_image/train_text_to_image_lora.py` (the script the
diffusers docs point SD1.5 LoRA users to). It is not part of the diffusers wheel and its code is
not copied into this repository: pass the file from a diffusers checkout,

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers
    OMP_WAIT_POLICY=PASSIVE python benchmarks/reference_script.py \\
        --reference /tmp/diffusers/examples/text_to_image/train_text_to_image_lora.py

Same work on both sides: one SD1.5-shaped model with random weights written once as a diffusers
folder (both load it with `from_pretrained`), the 20 images of `samples/brand` with their
captions (an `imagefolder` + `metadata.jsonl` for the reference), centre crops at `--resolution`,
batch 2, LoRA rank 4 (alpha 4) on the UNet's to_q/to_k/to_v/to_out.0, torch AdamW at 1e-4 with a
constant schedule, gradient clipping at 1.0, the same number of optimizer steps, gradient
checkpointing off on both (the reference's default; `--checkpointing` turns it on on both), no
previews, no intermediate checkpoints, the final adapter saved as safetensors. lorakit runs
`lorakit train` as users run it (prepare, cache latents and text embeddings once, train, export);
the reference encodes every batch with the VAE and the text encoder inside each step and keeps
both resident, as the script does.

Measured per side, each run in its own process (sides alternate, `--rounds` times):
- median optimizer-step interval after `--warmup` steps (a global optimizer step hook: both
  sides step a torch AdamW once per training step), which is the steady-state s/it;
- whole-command wall time (start-up, data, caching, training, export);
- peak memory: `ru_maxrss` of the process on CPU; `torch.cuda.max_memory_allocated` on CUDA.

The ratios printed are reference / lorakit (>1: lorakit is faster or leaner).

`--steps2 M` splits each side's wall time into a fixed cost and a per-step cost (issue #19):
every round also runs both sides for M steps, and per side

    per step = (wall(M) - wall(N)) / (M - N),    fixed = wall(N) - N · per step.

lorakit's runs share one content-keyed cache folder per round (`data.cache_dir`): its first
N-step run starts cold (the "first run" fixed cost); a second N-step run over the same data is
the "second run" (nothing to encode), and the M-step run is warm too. The reference has no
cache: each of its runs is a first run. `--arch mid` uses
a wider UNet (the planner benchmark's mid size); `--arch sd15` the real SD1.5 UNet, VAE and
CLIP-L with random weights, for a lent GPU: `--arch sd15 --device cuda --mixed-precision fp16
--resolution 512`.

torchvision is the reference's only extra import. If it is missing or cannot load (on this
project's CPU machine the only torchvision wheel for torch 2.13 is a CUDA build), the child
process supplies PIL equivalents of the transforms the scripts use (Resize, CenterCrop,
RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize, Compose, functional.crop), which is
what torchvision does on PIL images too; this is printed in the report.
"""

from __future__ import annotations

import argparse
import enum
import importlib.machinery
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = 4
LR = 1e-4
BATCH = 2


# --- the shared inputs ---------------------------------------------------------------------------


SCRIPTS = {
    "sd15": "examples/text_to_image/train_text_to_image_lora.py",
    "sdxl": "examples/text_to_image/train_text_to_image_lora_sdxl.py",
    "flux": "examples/dreambooth/train_dreambooth_lora_flux.py",
}
"""The diffusers example each family is compared with (`--reference`: that file)."""
MIXED = {"sd15": "fp16", "sdxl": "bf16", "flux": "bf16"}  # the GPU rows' precisions (#19)
CONDITIONING_KEYS = ("in_channels", "out_channels", "joint_attention_dim",
                     "pooled_projection_dim", "guidance_embeds")  # fmt: skip


def write_model(folder: Path, arch: str, family: str = "sd15", flux_depth=(19, 38)) -> None:
    """A pipeline of `family` with random weights (offline tokenizers) as a diffusers folder.

    tiny = lorakit's test model; mid (SD1.5) = the same with a wider UNet; real (or sd15) = the
    real SD1.5 / SDXL UNet, VAE and CLIP text encoders (random weights, saved in fp16: a GPU
    comparison); FLUX real = FLUX.1-dev's transformer width and `flux_depth` (double, single)
    blocks (19, 38 = the real depth) on the tiny VAE and text encoders (T5-XXL alone would be
    9.5 GB to write per session), in bf16.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.models import FAMILIES

    fam = FAMILIES[family]
    comps = fam.build_tiny(seed=0)
    torch.manual_seed(0)
    if arch == "sd15":
        arch = "real"

    def clip(cfg, cls=CLIPTextModel):
        return cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))

    if family == "sd15" and arch == "mid":  # planner_cpu.py's mid UNet, tiny text width
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from planner_cpu import MID_UNET

        comps.unet = UNet2DConditionModel(**dict(MID_UNET, cross_attention_dim=32))
    elif arch == "mid":
        sys.exit("--arch mid is an SD1.5 size; use tiny or real for this family")
    elif arch == "real" and family in ("sd15", "sdxl"):
        configs = fam.single_file_configs()
        comps.unet = UNet2DConditionModel.from_config(configs["unet"])
        comps.vae = AutoencoderKL.from_config(configs["vae"])
        if family == "sd15":
            from lorakit.models.text_encoders import CLIP_L_TEXT

            comps.text_encoder = clip(CLIP_L_TEXT)  # the tiny tokenizer's ids are < its vocab
            parts = (comps.unet, comps.vae, comps.text_encoder)
        else:
            comps.text_encoder = clip(configs["text_encoder"])
            comps.text_encoder_2 = clip(configs["text_encoder_2"], CLIPTextModelWithProjection)
            parts = (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2)
        for m in parts:
            m.to(torch.float16)
    elif arch == "real":  # flux
        from lorakit import planner

        small, real = comps.transformer, planner.build_denoiser(family)  # meta: config only
        cfg = {k: v for k, v in dict(real.config).items() if not k.startswith("_")}
        cfg.update({k: small.config[k] for k in CONDITIONING_KEYS if k in small.config})
        cfg.update(num_layers=flux_depth[0], num_single_layers=flux_depth[1])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            comps.transformer = type(real).from_config(cfg).to(torch.bfloat16).to("cpu")
    fam.save(comps, str(folder))


def write_imagefolder(src: Path, dst: Path) -> int:
    """`samples/brand` as the `imagefolder` layout the reference reads (metadata.jsonl captions)."""
    dst.mkdir(parents=True)
    rows = []
    for img in sorted(p for p in src.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"}):
        shutil.copy2(img, dst / img.name)
        caption = img.with_suffix(".txt").read_text(encoding="utf-8").strip()
        rows.append(json.dumps({"file_name": img.name, "text": caption}))
    (dst / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def reference_argv(reference: str, model: Path, data: Path, out: Path, a) -> list[str]:
    family = getattr(a, "family", "sd15")
    argv = [
        reference, "--pretrained_model_name_or_path", str(model),
        "--output_dir", str(out), "--resolution", str(a.resolution), "--center_crop",
        "--train_batch_size", str(BATCH), "--max_train_steps", str(a.steps),
        "--learning_rate", str(LR), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--rank", str(RANK), "--seed", "0", "--checkpointing_steps", str(10 * a.steps),
        "--max_grad_norm", "1.0", "--report_to", "tensorboard",
        "--mixed_precision", a.mixed_precision,
    ]  # fmt: skip
    if family == "flux":
        # per-image captions from the imagefolder (the script's --dataset_name path); the
        # instance prompt is required but unused then; lorakit's default targets and alpha
        from lorakit.models import FAMILIES

        argv += ["--dataset_name", str(data), "--image_column", "image", "--caption_column",
                 "text", "--instance_prompt", "brand", "--lora_alpha", str(RANK),
                 "--lora_layers", ",".join(FAMILIES["flux"].default_targets),
                 "--optimizer", "AdamW", "--adam_weight_decay", "1e-2"]  # fmt: skip
    else:
        argv += ["--train_data_dir", str(data)]
    if a.checkpointing:
        argv.append("--gradient_checkpointing")
    return argv


def lorakit_argv(model: Path, out: Path, a, cache: Path | None = None) -> list[str]:
    device = "cuda" if a.device == "cuda" else "cpu"
    sets = [
        f"model.name='{model}'", f"train.steps={a.steps}", f"train.batch_size={BATCH}",
        f"data.resolution={a.resolution}", "data.bucketing=false", f"lora.rank={RANK}",
        f"lora.alpha={float(RANK)}", f"train.lr={LR}", "train.lr_scheduler='constant'",
        "train.warmup_steps=0", "train.optimizer='adamw'", "train.max_grad_norm=1.0",
        f"train.gradient_checkpointing={'true' if a.checkpointing else 'false'}",
        f"train.mixed_precision='{a.mixed_precision}'", f"train.device='{device}'",
        "train.save_every=0", "sample.every=0", "eval.images=0", "eval.palette_colors=0",
        "log.tensorboard=false", "train.log_every=1000",
    ]  # fmt: skip
    if getattr(a, "quantize", "none") != "none":
        sets.append(f"model.quantize='{a.quantize}'")
    if getattr(a, "compile", False):
        sets.append("train.compile=true")
    if cache is not None:
        sets.append(f"data.cache_dir='{cache}'")
    argv = ["train", str(ROOT / "samples" / "brand"), "--preset", "tiny-cpu", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


# --- one side in its own process ---------------------------------------------------------------


def _pil_transforms() -> types.ModuleType:
    """PIL stand-ins for the torchvision transforms the reference script uses (see module doc)."""
    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode(enum.Enum):
        NEAREST = Image.Resampling.NEAREST
        BILINEAR = Image.Resampling.BILINEAR
        BICUBIC = Image.Resampling.BICUBIC
        LANCZOS = Image.Resampling.LANCZOS
        BOX = Image.Resampling.BOX
        HAMMING = Image.Resampling.HAMMING

    class Resize:  # shorter side to `size`, as torchvision does for an int size
        def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
            self.size, self.resample = size, interpolation.value

        def __call__(self, im):
            w, h = im.size
            s = self.size / min(w, h)
            return im.resize((max(1, round(w * s)), max(1, round(h * s))), self.resample)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, im):
            w, h = im.size
            left, top = round((w - self.size) / 2), round((h - self.size) / 2)
            return im.crop((left, top, left + self.size, top + self.size))

    class RandomCrop(CenterCrop):
        def __call__(self, im):
            w, h = im.size
            left = int(torch.randint(0, w - self.size + 1, ()))
            top = int(torch.randint(0, h - self.size + 1, ()))
            return im.crop((left, top, left + self.size, top + self.size))

    class RandomHorizontalFlip:
        def __init__(self, p=0.5):
            self.p = p

        def __call__(self, im):
            flip = torch.rand(()) < self.p
            return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    class ToTensor:
        def __call__(self, im):
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean[0], std[0]

        def __call__(self, x):
            return (x - self.mean) / self.std

    class Compose:
        def __init__(self, ts):
            self.ts = ts

        def __call__(self, x):
            for t in self.ts:
                x = t(x)
            return x

    def crop(im, top, left, height, width):  # torchvision.transforms.functional.crop
        return im.crop((left, top, left + width, top + height))

    mod = types.ModuleType("torchvision.transforms")
    for obj in (InterpolationMode, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, Lambda,
                ToTensor, Normalize, Compose):  # fmt: skip
        setattr(mod, obj.__name__, obj)
    mod.functional = types.ModuleType("torchvision.transforms.functional")
    mod.functional.crop = crop
    return mod


def _torchvision_or_stand_in() -> str:
    try:
        import torchvision.transforms  # noqa: F401

        return "torchvision"
    except Exception:  # missing, or a build for another torch (it raises at import)
        # The libraries record at import whether torchvision is usable: import them while it
        # is not, so only the script itself sees the stand-in.
        import datasets  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        pkg = types.ModuleType("torchvision")
        pkg.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        pkg.transforms = _pil_transforms()
        sys.modules["torchvision"] = pkg
        sys.modules["torchvision.transforms"] = pkg.transforms
        sys.modules["torchvision.transforms.functional"] = pkg.transforms.functional
        return "PIL stand-in"


def child(side: str, argv: list[str], result: Path) -> None:
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    transforms = ""
    t0 = time.perf_counter()
    if side == "reference":
        transforms = _torchvision_or_stand_in()
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    else:
        from lorakit.cli import app

        try:
            app(argv, standalone_mode=False)
        except SystemExit as e:  # typer exits 0 after a finished run
            if e.code not in (0, None):
                raise
    wall = time.perf_counter() - t0
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    result.write_text(json.dumps({
        "side": side, "wall_s": wall, "stamps": [s - t0 for s in stamps],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "transforms": transforms,
    }))  # fmt: skip


# --- the comparison ----------------------------------------------------------------------------


def run_side(side: str, argv: list[str], work: Path, i) -> dict:
    result = work / f"{side}-{i}.json"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    if side == "lorakit":  # `--compile`: lorakit compiles through train.compile, not accelerate
        env.pop("ACCELERATE_DYNAMO_BACKEND", None)
    cmd = [sys.executable, __file__, "--child", side, "--result", str(result), "--", *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not result.exists():
        tail = f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        sys.exit(f"{side} run failed (exit {p.returncode}):\n{tail}")
    r = json.loads(result.read_text())
    if len(r["stamps"]) < 2:
        sys.exit(f"{side} run recorded {len(r['stamps'])} optimizer steps; expected more")
    return r


def median_step(r: dict, warmup: int) -> float:
    s = r["stamps"]
    gaps = [b - a for a, b in zip(s[warmup:], s[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", help="the family's diffusers example script (SCRIPTS)")
    ap.add_argument("--family", choices=sorted(SCRIPTS), default="sd15")
    ap.add_argument(
        "--quantize",
        choices=["none", "fp8", "nf4"],
        default="none",
        help="lorakit's base (model.quantize); the reference scripts have none",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile on both sides: train.compile / ACCELERATE_DYNAMO_BACKEND",
    )
    ap.add_argument("--flux-depth", default="19,38", help="FLUX --arch real: double,single blocks")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--steps2", type=int, default=0, help="second step count: fixed vs per step")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument(
        "--arch",
        choices=["tiny", "mid", "real", "sd15"],
        default="tiny",
        help="sd15 = real (kept for the recorded commands)",
    )
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--child", choices=["reference", "lorakit"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.rest, Path(a.result))
        return
    if not a.reference or not Path(a.reference).is_file():
        sys.exit(
            f"benchmarks/reference_script.py needs --reference PATH: diffusers' "
            f"{SCRIPTS[a.family]} from a diffusers checkout (it is not in the diffusers wheel): "
            "git clone --depth 1 https://github.com/huggingface/diffusers"
        )
    if a.compile:  # the reference's Accelerator compiles what it prepares (accelerate's own knob)
        os.environ["ACCELERATE_DYNAMO_BACKEND"] = "inductor"
    if a.device == "cpu" and a.mixed_precision != "no":
        sys.exit("--mixed-precision needs --device cuda (the CPU comparison runs fp32)")
    work = Path(tempfile.mkdtemp(prefix="lorakit-ref-"))
    model, data = work / "model", work / "imagefolder"
    write_model(model, a.arch, a.family, tuple(int(x) for x in a.flux_depth.split(",")))
    n = write_imagefolder(ROOT / "samples" / "brand", data)
    if a.steps2:
        split_costs(a, model, data, work, n)
        return
    runs: dict[str, list[dict]] = {"reference": [], "lorakit": []}
    for i in range(a.rounds):
        for side in ("reference", "lorakit"):  # alternate against drift on a noisy machine
            out = work / f"out-{side}-{i}"
            argv = (
                reference_argv(a.reference, model, data, out, a)
                if side == "reference"
                else lorakit_argv(model, out, a)
            )
            r = run_side(side, argv, work, i)
            if not list(out.rglob("*.safetensors")):
                sys.exit(f"{side} run {i} wrote no .safetensors adapter under {out}")
            runs[side].append(r)
            print(
                f"round {i + 1} {side:>9}: median step {median_step(r, a.warmup) * 1e3:7.1f} ms, "
                f"whole command {r['wall_s']:6.2f} s, {len(r['stamps'])} steps, "
                f"peak RSS {r['peak_rss_gib']:.3f} GiB"
                + (f", CUDA peak {r['cuda_peak_gib']:.3f} GiB" if r["cuda_peak_gib"] else ""),
                flush=True,
            )

    def best(side: str, key) -> float:
        return min(key(r) for r in runs[side])

    step = {s: best(s, lambda r: median_step(r, a.warmup)) for s in runs}
    wall = {s: best(s, lambda r: r["wall_s"]) for s in runs}
    rss = {s: best(s, lambda r: r["peak_rss_gib"]) for s in runs}
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{n} images at {a.resolution} px, batch {BATCH}, {a.steps} steps, {a.family} {a.arch}, "
        f"lorakit base {a.quantize}, compile {'on' if a.compile else 'off'}, "
        f"checkpointing {'on' if a.checkpointing else 'off'}, {a.device}, "
        f"mixed precision {a.mixed_precision}; reference transforms: "
        f"{runs['reference'][0]['transforms']}"
    )
    rounds = ", ".join(
        f"{median_step(r, a.warmup) / median_step(k, a.warmup):.2f}"
        for r, k in zip(runs["reference"], runs["lorakit"], strict=True)
    )
    print(
        f"median step   reference / lorakit: {step['reference'] / step['lorakit']:.2f}x "
        f"(best of each side; round by round: {rounds})"
    )
    print(f"whole command reference / lorakit: {wall['reference'] / wall['lorakit']:.2f}x")
    print(f"peak RSS      reference / lorakit: {rss['reference'] / rss['lorakit']:.2f}x")
    if runs["lorakit"][0]["cuda_peak_gib"]:
        cuda = {s: best(s, lambda r: r["cuda_peak_gib"]) for s in runs}
        print(f"CUDA peak     reference / lorakit: {cuda['reference'] / cuda['lorakit']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))


def split_costs(a, model: Path, data: Path, work: Path, n: int) -> None:
    """`--steps2`: fixed cost and per-step cost per side (see the module docstring)."""
    import copy

    longer = copy.copy(a)
    longer.steps = a.steps2
    rows: dict[str, list[dict]] = {}
    for i in range(a.rounds):
        cache = work / f"lorakit-cache-{i}"
        plan = [
            ("reference", "first", a, None),
            ("lorakit", "first", a, cache),
            ("reference", "long", longer, None),
            ("lorakit", "second", a, cache),
            ("lorakit", "long", longer, cache),
        ]
        for side, kind, args, c in plan:
            out = work / f"out-{side}-{kind}-{i}"
            argv = (
                reference_argv(a.reference, model, data, out, args)
                if side == "reference"
                else lorakit_argv(model, out, args, c)
            )
            r = run_side(side, argv, work, f"{kind}-{i}")
            rows.setdefault(f"{side} {kind}", []).append(r)
            print(
                f"round {i + 1} {side:>9} {kind:>6} ({args.steps} steps): whole command "
                f"{r['wall_s']:6.2f} s, first step at {r['stamps'][0]:6.2f} s, peak RSS "
                f"{r['peak_rss_gib']:.3f} GiB",
                flush=True,
            )

    dn = a.steps2 - a.steps
    per_round = []
    for i in range(a.rounds):
        w = {k: v[i]["wall_s"] for k, v in rows.items()}
        c = {}
        for side in ("reference", "lorakit"):
            # per step from two runs that start alike: the reference's are both first runs;
            # lorakit's "long" run is warm, so it pairs with its warm "second" run
            short = w["lorakit second"] if side == "lorakit" else w["reference first"]
            per = (w[f"{side} long"] - short) / dn
            c[side] = {
                "per_step": per,
                "fixed_first": w[f"{side} first"] - a.steps * per,
                "fixed_second": short - a.steps * per,
                "rss": max(v[i]["peak_rss_gib"] for k, v in rows.items() if k.startswith(side)),
            }
        per_round.append(c)
        print(
            f"round {i + 1}: per step {c['reference']['per_step']:.2f} / "
            f"{c['lorakit']['per_step']:.2f} s, fixed first {c['reference']['fixed_first']:.1f} / "
            f"{c['lorakit']['fixed_first']:.1f} s, second {c['reference']['fixed_second']:.1f} / "
            f"{c['lorakit']['fixed_second']:.1f} s (reference / lorakit)"
        )
    cost = {
        side: {k: statistics.mean(c[side][k] for c in per_round) for k in per_round[0][side]}
        for side in ("reference", "lorakit")
    }
    ref, lk = cost["reference"], cost["lorakit"]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {n} images "
        f"at {a.resolution} px, batch {BATCH}, {a.steps} and {a.steps2} steps, {a.family} "
        f"{a.arch}, "
        f"checkpointing {'on' if a.checkpointing else 'off'}, {a.device}; mean of {a.rounds} "
        "round(s), each computed within its round"
    )
    print(f"{'':24}{'reference':>12}{'lorakit':>12}   target")
    print(
        f"{'per step (s)':24}{ref['per_step']:12.2f}{lk['per_step']:12.2f}   "
        f"lorakit/ref {lk['per_step'] / ref['per_step']:.2f} (<= 0.80)"
    )
    print(
        f"{'fixed, first run (s)':24}{ref['fixed_first']:12.1f}{lk['fixed_first']:12.1f}   "
        f"lorakit - ref {lk['fixed_first'] - ref['fixed_first']:+.1f} s (<= +5)"
    )
    print(
        f"{'fixed, second run (s)':24}{ref['fixed_second']:12.1f}{lk['fixed_second']:12.1f}   "
        f"lorakit - ref {lk['fixed_second'] - ref['fixed_second']:+.1f} s (<= 0)"
    )
    print(
        f"{'peak RSS (GiB)':24}{ref['rss']:12.3f}{lk['rss']:12.3f}   "
        f"lorakit/ref {lk['rss'] / ref['rss']:.2f} (<= 0.85)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": rows, "cost": cost}, indent=1))


if __name__ == "__main__":
    main()
