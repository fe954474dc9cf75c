"""Issue #19, resident memory and per-step cost on the CPU: the denoiser is read only after
caching, the encoders leave host memory before it is read, and step buffers reuse their pages.

The figures these guard (real SD1.5 at 128 px on this project's CPU machine, measured with
psutil and `getrusage`, in BENCHMARKS.md): peak RSS 4.98 → 4.42 GiB, 0.9 million page faults
and 2.3 s per step → under 100 faults and 1.65 s. Here: the mechanisms, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.config import ModelConfig
from lorakit.errors import LorakitError
from lorakit.models import FAMILIES, load_model, loading

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "brand"


def _folder(tmp_path, name="sd15"):
    fam = FAMILIES[name]
    fam.save(fam.build_tiny(seed=0), str(tmp_path / "m"))
    return fam, str(tmp_path / "m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_deferred_denoiser_is_meta_until_materialized_then_equal(tmp_path, dtype):
    """Inside `deferred()` a local folder's denoiser is built on meta (no weights in RAM) in the
    load dtype; `materialize` reads exactly what an immediate read gives."""
    fam, folder = _folder(tmp_path)
    with loading.load_in(dtype), loading.deferred():
        _, comps = load_model(ModelConfig(name=folder))
    den = getattr(comps, fam.denoiser_name)
    assert loading.is_deferred(den)
    assert all(p.is_meta for p in den.parameters())
    assert {p.dtype for p in den.parameters()} == {dtype}
    assert not any(p.is_meta for p in comps.vae.parameters())  # only the denoiser waits
    loading.materialize(den)
    assert not loading.is_deferred(den) and not den.training
    with loading.load_in(dtype):
        _, now = load_model(ModelConfig(name=folder))
    a, b = den.state_dict(), getattr(now, fam.denoiser_name).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                        for k in a)  # fmt: skip
    assert not any(p.requires_grad for p in den.parameters())  # still frozen
    loading.materialize(den)  # a second call is a no-op


def test_a_truncated_denoiser_file_is_named(tmp_path):
    fam, folder = _folder(tmp_path)
    path = Path(folder) / fam.denoiser_name / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    with pytest.raises(LorakitError, match="truncated") as e:
        load_model(ModelConfig(name=folder))
    assert str(path) in str(e.value)


def test_mixed_stored_dtypes_convert_through_the_staging_buffer(tmp_path):
    """fp16, bf16 and fp32 tensors in one file, read as fp32 and as bf16: each equals the file's
    tensor converted on its own (the shared staging buffer leaks nothing between tensors)."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=g).half(),
        "b": torch.randn(300, generator=g).bfloat16(),
        "c": torch.randn(3, 2, 2, generator=g),
        "d": torch.randn((), generator=g).half(),
        "e": torch.randn(2, generator=g).half(),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    plan = loading._plan_streamed([tmp_path / "x.safetensors"], set(tensors))
    assert loading._plan_streamed([tmp_path / "x.safetensors"], {"a", "b"}) is None  # extra keys
    for dtype in (torch.float32, torch.bfloat16):
        got = loading._read_planned(plan, dtype)
        for k, t in tensors.items():
            assert got[k].dtype == dtype and torch.equal(got[k], t.to(dtype)), (k, dtype)


def test_train_reads_the_denoiser_after_caching_and_after_freeing_the_encoders(
    tmp_path, monkeypatch
):
    """While the latents and captions are encoded the denoiser is not in host memory (meta),
    and when it is read the VAE and text encoders are gone already (a run without previews):
    the peak never holds both. The adapter is bit-identical to a run that reads the denoiser
    at load time."""
    from lorakit import config as cfg
    from lorakit import train as tr

    fam, folder = _folder(tmp_path)
    seen: dict = {}
    encode_images, materialize = tr.encode_images, loading.materialize

    def spy_encode(family, comps, *a, **k):
        seen["denoiser at caching"] = [p.is_meta for p in getattr(comps, fam.denoiser_name)
                                       .parameters()]  # fmt: skip
        return encode_images(family, comps, *a, **k)

    def spy_materialize(module):
        seen["encoders at read"] = [p.is_meta for p in seen["comps"].vae.parameters()]
        return materialize(module)

    load = tr._load_model

    def spy_load(*a, **k):
        seen["comps"] = load(*a, **k)
        return seen["comps"]

    def run(out):
        sets = ["train.steps=2", "train.save_every=0", "sample.every=0", f"train.out='{out}'",
                f"model.name='{folder}'"]  # fmt: skip
        return tr.train(cfg.resolve(preset="tiny-cpu", sets=sets), SAMPLES)

    with monkeypatch.context() as mp:
        mp.setattr(tr, "encode_images", spy_encode)
        mp.setattr(tr, "_load_model", spy_load)
        mp.setattr(loading, "materialize", spy_materialize)
        deferred = run(tmp_path / "a")
    assert seen["denoiser at caching"] and all(seen["denoiser at caching"])
    assert seen["encoders at read"] and all(seen["encoders at read"])
    with monkeypatch.context() as mp:  # the denoiser read at load time, as before #19
        import contextlib

        mp.setattr(loading, "deferred", contextlib.nullcontext)
        seen.clear()
        mp.setattr(tr, "encode_images", spy_encode)
        at_load = run(tmp_path / "b")
    assert not any(seen["denoiser at caching"])
    a, b = (load_file(str(r.adapters["kohya"])) for r in (deferred, at_load))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_FAULTS = """
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from lorakit.hostmem import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.manual_seed(0)
# an SD1.5 UNet's widest conv: oneDNN reorders its 59 MB weight into new buffers on every
# forward and backward, as it does for every large conv of a real step
conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
x = torch.randn(2, 1280, 8, 8, requires_grad=True)
counts = []
for _ in range(6):
    f0 = faults()
    conv(x).square().mean().backward()
    counts.append(faults() - f0)
print(json.dumps(counts))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_keep_freed_memory_stops_the_page_faults_of_each_step():
    """A frozen conv's forward and backward, six times: without `keep_freed_memory` every pass
    maps its large buffers anew (29k page faults each time, 117 MB of fresh pages); with it the
    second pass on reuses the first one's pages."""

    def counts(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, kept = counts("plain"), counts("keep")
    assert min(plain[1:]) > 10000, plain
    assert max(kept[1:]) < 1000, kept


def test_cpu_training_keeps_freed_memory_and_trims_after_freeing_encoders(tmp_path, monkeypatch):
    from lorakit import config as cfg
    from lorakit import train as tr

    calls: list[str] = []
    monkeypatch.setattr(tr, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(tr, "release_host_memory", lambda: calls.append("trim"))
    sets = ["train.steps=1", "train.save_every=0", "sample.every=0", f"train.out='{tmp_path}'"]
    tr.train(cfg.resolve(preset="tiny-cpu", sets=sets), SAMPLES)
    assert calls == ["keep", "trim"]


@pytest.mark.slow  # ~6 s per family
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_trains_and_previews_from_a_folder_read_after_caching(name, tmp_path):
    """The deferred read on every family: a local folder's denoiser is meta while the latents,
    captions and preview prompts are encoded (the pipelines read devices and dtypes off it),
    then read; one step and the step-0 and step-1 grids come out."""
    from lorakit import config as cfg
    from lorakit.train import train

    fam, folder = _folder(tmp_path, name)
    out = tmp_path / "out"
    sets = ["train.steps=1", "train.save_every=0", "sample.every=1", "sample.steps=1",
            f"train.out='{out}'", f"model.name='{folder}'", "data.resolution=64"]  # fmt: skip
    result = train(cfg.resolve(preset="tiny-cpu", sets=sets), SAMPLES)
    assert not loading.is_deferred(getattr(result.components, fam.denoiser_name))
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert grids[:2] == ["step-000000.png", "step-000001.png"], grids
