"""`lorakit env`: what this machine can do for training, checked by running it, not by imports.

bitsandbytes install problems are a top complaint with other trainers, so the 8-bit optimizer and
the 4-bit quantization are exercised for real (a tiny step / a tiny quantized matmul), each with
the fix to try when it fails.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lorakit", "torch", "diffusers", "transformers", "peft", "accelerate",
                "bitsandbytes", "safetensors", "datasets"):  # fmt: skip
        out[pkg] = _version(pkg)
    out["cuda (torch build)"] = torch.version.cuda or "none (CPU build)"
    return out


def gpus() -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        found.append(
            {
                "index": i,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "total_gib": round(total / 2**30, 2),
                "free_gib": round(free / 2**30, 2),
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    return found


_BNB_FIX = (
    "pip install -U bitsandbytes (it ships CPU and CUDA kernels in one wheel); on CUDA check that "
    "torch sees the GPU (torch.cuda.is_available()) and run `python -m bitsandbytes` for a "
    "diagnosis. Meanwhile use --set train.optimizer=adamw."
)


def check_8bit_optimizer(device: str) -> Check:
    t0 = time.perf_counter()
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.ones(64, 64, device=device))
        opt = bnb.optim.AdamW8bit([p], lr=0.1)
        p.grad = torch.ones_like(p)
        opt.step()
        ok = opt.state[p]["state1"].dtype == torch.uint8 and bool((p.detach() < 1).all())
        detail = "8-bit state, weights updated" if ok else "the step did not update the weights"
    except Exception as e:
        ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ms = (time.perf_counter() - t0) * 1000
    return Check(f"8-bit AdamW on {device}", ok, f"{detail} ({ms:.0f} ms)", "" if ok else _BNB_FIX)


def check_4bit(device: str) -> Check:
    t0 = time.perf_counter()
    try:
        import bitsandbytes as bnb

        torch.manual_seed(0)
        ref = torch.nn.Linear(128, 64, bias=False)
        q = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q = q.to(device)
        x = torch.randn(4, 128, device=device)
        err = (q(x).float().cpu() - ref(x.cpu())).abs().max().item()
        scale = ref(x.cpu()).abs().max().item()
        ok = err < 0.25 * scale
        detail = f"NF4 matmul rel. error {err / scale:.3f}"
    except Exception as e:
        ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ms = (time.perf_counter() - t0) * 1000
    fix = "" if ok else _BNB_FIX.replace("--set train.optimizer=adamw", "model.quantize = 'none'")
    return Check(f"4-bit NF4 quantization on {device}", ok, f"{detail} ({ms:.0f} ms)", fix)


def report() -> dict[str, object]:
    devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    checks = [check_8bit_optimizer(d) for d in devices] + [check_4bit(d) for d in devices]
    if not torch.cuda.is_available():
        checks.append(
            Check(
                "CUDA GPU",
                False,
                "torch sees no CUDA GPU: training runs on the CPU (tiny models only in practice)",
                "install a CUDA build of torch matching your driver (see pytorch.org), then "
                "check `nvidia-smi`",
            )
        )
    return {"versions": versions(), "gpus": gpus(), "checks": [asdict(c) for c in checks]}
