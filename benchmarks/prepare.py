"""images/s of `lorakit prepare` vs a plain single-process PIL loop (not a timed test).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/prepare.py [--n 200] [--resolution 512]

Generates N 1024-px JPEGs (1024×1024, 1024×768, 768×1024), then times on the same files:
  plain     : one process, Image.open → convert RGB → LANCZOS resize to cover the bucket → crop
  prepare   : lorakit's prepare into a fresh OUT (hash, validate, normalise, bucket, resize,
              uncompressed PPM store, perceptual hash, dataset + reports), all cores
  prepare*  : the same with JPEG DCT-domain downscaling off (fast_decode=False): the gain of
              the worker processes alone
  rerun     : prepare again on the unchanged source (incremental: no decoding)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakit.config import DataConfig
from lorakit.data.buckets import closest_bucket, make_buckets, resize_and_crop_plan
from lorakit.data.prepare import prepare


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [(1024, 1024), (1024, 768), (768, 1024)]
    for i in range(n):
        w, h = sizes[i % 3]
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        arr = np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.jpg", quality=90)
        (folder / f"img_{i:03d}.txt").write_text(f"bench, picture {i}", encoding="utf-8")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def plain_loop(files: list[Path], resolution: int) -> float:
    buckets = make_buckets(resolution)
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            bucket = closest_bucket(im.size, buckets)
            (rw, rh), (top, left) = resize_and_crop_plan(im.size, bucket)
            im = im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
            im.crop((left, top, left + bucket[0], top + bucket[1])).load()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    try:
        src = work / "src"
        src.mkdir()
        make_images(src, args.n)
        files = sorted(src.glob("*.jpg"))
        data = DataConfig(resolution=args.resolution, near_duplicate_distance=-1)
        # One-time library imports (datasets ≈ 2 s) are start-up cost, not throughput.
        import datasets  # noqa: F401
        import imagehash  # noqa: F401

        plain_loop(files[:10], args.resolution)  # warm the page cache and PIL
        c0 = cpu_seconds()
        t_plain = plain_loop(files, args.resolution)
        c_plain = cpu_seconds() - c0

        t0, c0 = time.perf_counter(), cpu_seconds()
        p = prepare(src, work / "out", data)
        t_prep = time.perf_counter() - t0
        c_prep = cpu_seconds() - c0
        assert p.decoded == args.n and not p.fatal, p.fatal

        t0 = time.perf_counter()
        p2 = prepare(src, work / "out", data)
        t_rerun = time.perf_counter() - t0
        assert p2.decoded == 0

        t0 = time.perf_counter()
        prepare(src, work / "out_slow", data, fast_decode=False)
        t_slow = time.perf_counter() - t0

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = args.n
        print(f"{n} JPEGs (1024 px long side) → resolution {args.resolution}, {cores} cores")
        print(f"plain PIL loop, 1 process : {n / t_plain:7.1f} img/s  ({t_plain:.2f} s)")
        print(f"lorakit prepare           : {n / t_prep:7.1f} img/s  ({t_prep:.2f} s)")
        print(f"prepare, fast_decode off  : {n / t_slow:7.1f} img/s  ({t_slow:.2f} s)")
        print(f"prepare re-run, unchanged : {t_rerun:.2f} s ({p2.decoded} decoded)")
        tp = p.timings["process"]
        print(
            f"  prepare phases: read+hash {p.timings['list_hash']:.2f} s, decode/resize/encode "
            f"{tp:.2f} s ({n / tp:.1f} img/s), write dataset+reports {p.timings['write']:.2f} s"
        )
        print(
            f"  CPU per image: plain {1000 * c_plain / n:.1f} ms, "
            f"prepare {1000 * c_prep / n:.1f} ms (all processes); "
            f"prepare kept {c_prep / t_prep:.2f} cores busy on average"
        )
        print(f"load average (1/5/15 min): {os.getloadavg()}")
        print(f"ratio prepare / plain     : {t_plain / t_prep:.2f}x (whole command)")
        print(f"ratio process phase/plain : {t_plain / tp:.2f}x (decode+resize+encode only)")
        print(f"ratio (fast_decode off)   : {t_plain / t_slow:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
