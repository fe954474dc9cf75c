"""Masked loss (lorakit/data/masks.py): where masks come from, how they follow their image, the
weighted loss of every family, the refusals, the cache, and the bit-identity guarantee."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli
from PIL import Image

from lorakit import config as cfg
from lorakit.config import DataConfig, TrainConfig
from lorakit.data import masks
from lorakit.data.prepare import build, load_prepared, prepare
from lorakit.errors import ConfigError, LorakitError
from lorakit.models import FAMILIES

# -- the loss ------------------------------------------------------------------------------------


def test_masked_mse_is_normalised_by_the_mask_weight():
    """Per sample Σ w·err² / Σ w: a constant error gives the same loss whatever the mask's
    area, elements of weight 0 do not count at all, and all-ones weights give the plain mean."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 6, 8, generator=g)
    target = pred + 0.5  # error² = 0.25 everywhere
    small = torch.zeros(3, 6, 8)
    small[:, :2, :2] = 1.0  # 4 of 48 cells
    big = torch.ones(3, 6, 8)
    big[:, 0, 0] = 0.0
    for w in (small, big, torch.full((3, 6, 8), 0.3)):
        assert torch.allclose(masks.masked_mse(pred, target, w), torch.full((3,), 0.25))
    wild = target.clone()
    wild[:, :, 2:, :] = 1e6  # far off, but only where `small` is 0
    assert torch.equal(masks.masked_mse(pred, wild, small), masks.masked_mse(pred, target, small))
    noisy = torch.randn(3, 4, 6, 8, generator=g)
    plain = ((pred - noisy) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(masks.masked_mse(pred, noisy, torch.ones(3, 6, 8)), plain, rtol=1e-6)
    # `[B, C, F, h, w]` (frames) broadcast the same way
    five = masks.masked_mse(pred[:, :, None], target[:, :, None], small)
    assert torch.allclose(five, torch.full((3,), 0.25))


def _family_inputs(name: str):
    """Tiny components, latents `[2, C, 8, 6]` (not square: a transposed mask cannot pass), the
    conditioning of two captions, noise and timesteps."""
    fam = FAMILIES[name]
    comps = fam.build_tiny(seed=0)
    channels = fam.encode_images(comps, torch.zeros(1, 3, 16, 16)).shape[1]
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, channels, 8, 6, generator=g)
    cond = fam.encode_prompts(comps, ["a red logo", "a blue cup"])
    for k, v in fam.image_conditioning(comps, (64, 48), (0, 0), (64, 48)).items():
        cond[k] = torch.cat([v, v])
    noise, t = fam.noise_and_timesteps(comps, lat, g, TrainConfig())
    return fam, comps, getattr(comps, fam.denoiser_name), lat, cond, noise, t


def _map_output(output, fn):
    """`fn(j, tensor)` applied to the denoiser's raw output: a tuple whose first item is a
    tensor or (Z-Image) a list of per-sample tensors."""
    first = output[0]
    if isinstance(first, (list, tuple)):
        return (type(first)(fn(j, x) for j, x in enumerate(first)), *output[1:])
    return (fn(0, first), *output[1:])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_ignores_the_denoiser_output_where_the_mask_is_zero(name):
    """For every family: a perturbation of the denoiser's RAW output (packed into 2×2 patches
    where the family packs) at exactly the elements that unpack into the masked-out latent cells
    leaves the masked loss bit-identical and gets an exactly-zero gradient, while the unmasked
    loss changes. The packed positions come from the family's own `predict` (its unpacking is
    a permutation: the vector-Jacobian product maps a latent-layout perturbation back into the
    packed layout), so this checks that the mask weights the elements of the latent it belongs
    to through each family's packing."""
    torch.manual_seed(0)
    fam, comps, den, lat, cond, noise, t = _family_inputs(name)
    tc = TrainConfig()
    weights = torch.ones(2, 8, 6)
    weights[0, :, 3:] = 0.0  # sample 0: right half ignored
    weights[1, 5:, :] = 0.0  # sample 1: bottom rows ignored
    weights[1, 0, 0] = 0.25
    dirt = torch.randn(lat.shape) * 10.0 * (weights == 0)[:, None]

    # 1. where the latent-layout perturbation lands in the denoiser's raw output
    leaves: list[torch.Tensor] = []

    def as_leaves(module, args, output):
        def leaf(j, x):
            leaves.append(x.detach().clone().requires_grad_(True))
            return leaves[-1]

        return _map_output(output, leaf)

    noisy = lat.clone()
    hook = den.register_forward_hook(as_leaves)
    try:
        pred = fam.predict(den, noisy, t, dict(cond, guidance=torch.ones(2)))
    finally:
        hook.remove()
    packed = torch.autograd.grad(pred, leaves, grad_outputs=dirt.to(pred.dtype))
    assert any(p.abs().sum() > 0 for p in packed), "the perturbation must reach the output"

    def loss(perturb: bool, masked: bool, grad_leaves: list | None = None):
        def add(j, x):
            x = x + packed[j].to(x.dtype) if perturb else x
            if grad_leaves is not None:
                grad_leaves.append(x.detach().clone().requires_grad_(True))
                return grad_leaves[-1]
            return x

        hook = den.register_forward_hook(lambda m, a, out: _map_output(out, add))
        try:
            with masks.loss_mask(weights if masked else None):
                return fam.loss(comps, den, lat, cond, noise, t, tc)
        finally:
            hook.remove()

    with torch.no_grad():
        clean, dirty = loss(False, True), loss(True, True)
        assert torch.equal(clean, dirty), f"{name}: masked loss {clean} != {dirty}"
        assert not torch.equal(loss(False, False), loss(True, False)), "unmasked loss must change"
    outs: list[torch.Tensor] = []
    grads = torch.autograd.grad(loss(False, True, outs), outs)
    for g, p in zip(grads, packed, strict=True):
        assert torch.all(g[p != 0] == 0), f"{name}: masked-out output elements get a gradient"
        assert g[p == 0].abs().sum() > 0


# -- prepare: sources, geometry, reports ---------------------------------------------------------


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def _grey(encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im.convert("L"))


def _rgb(encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im.convert("RGB"))


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _mask_set(root: Path) -> None:
    """Every mask source: alpha (garbage RGB under alpha 0), a sidecar, a `masks/` mirror, a
    full and an empty sidecar, and an image without a mask. The sidecar-masked images carry their
    mask in their red channel, so a prepared mask can be checked against its prepared image."""
    rng = np.random.default_rng(0)
    alpha = np.zeros((64, 96), np.uint8)
    alpha[16:48, 24:72] = 255
    rgba = np.dstack([rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), alpha])
    _png(root / "logo.png", rgba, "RGBA")
    m = np.zeros((60, 72), np.uint8)
    m[8:40, 8:56] = 255
    m[40:50, 30:60] = 128
    photo = np.dstack([m, rng.integers(0, 256, (60, 72, 2), dtype=np.uint8)])
    _png(root / "photo.png", photo)
    _png(root / "photo.mask.png", m)
    big = np.zeros((128, 160), np.uint8)  # resized 2× down to its bucket
    big[20:100, 30:110] = 255
    _png(root / "sub" / "big.png", np.dstack([big, big, big]))
    _png(root / "masks" / "sub" / "big.png", big)
    _png(root / "full.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _png(root / "full.mask.png", np.full((64, 64), 255, np.uint8))
    _png(root / "empty.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    _png(root / "empty.mask.png", np.zeros((64, 64), np.uint8))
    _png(root / "plain.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_prepare_keeps_alpha_and_mask_files_cropped_with_their_image(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _mask_set(src)
    before = _hashes(src)
    d = DataConfig(resolution=64, workers=1)
    p = prepare(src, out, d)
    assert not p.fatal, p.fatal
    assert _hashes(src) == before, "prepare must not modify the source"
    rows = {r["source"]: r for r in load_prepared(out)}
    assert set(rows) == {"logo.png", "photo.png", "sub/big.png", "full.png", "empty.png",
                         "plain.png"}, "mask files are not training images"  # fmt: skip
    assert rows["plain.png"]["mask"] is None
    # alpha: kept as the mask, the RGB flattened (white) is what the VAE sees
    logo_mask, logo_rgb = _grey(rows["logo.png"]["mask"]), _rgb(rows["logo.png"]["png"])
    assert logo_mask.shape == logo_rgb.shape[:2]
    far = torch.nn.functional.max_pool2d(torch.tensor(logo_mask)[None].float(), 9, 1, 4)[0]
    assert (logo_rgb[far.numpy() == 0] == 255).all(), "transparent pixels flattened onto white"
    assert 0.2 < (logo_mask > 127).mean() < 0.35  # 32×48 of 64×96, less the crop
    # a crop without resizing (72×60 → 72×56 bucket): the mask is exactly the image's red
    photo = rows["photo.png"]
    assert photo["bucket"] == (72, 56)
    assert np.array_equal(_grey(photo["mask"]), _rgb(photo["png"])[..., 0])
    # resized 2× down and cropped: box filter (mask) vs Lanczos (image) differ only at edges
    big_mask, big_rgb = _grey(rows["sub/big.png"]["mask"]), _rgb(rows["sub/big.png"]["png"])
    assert big_mask.shape == big_rgb.shape[:2] == rows["sub/big.png"]["bucket"][::-1]
    assert np.abs(big_mask.astype(int) - big_rgb[..., 0]).max() < 64
    assert ((big_mask > 127) == (big_rgb[..., 0] > 127)).mean() > 0.99
    # reported: empty and full masks (kept; train refuses the empty one under masked loss)
    kinds = {(pr.kind, pr.file) for pr in p.problems}
    assert ("mask_empty", "empty.png") in kinds and ("mask_full", "full.png") in kinds
    assert p.notes["loss mask from a mask file"] == 4
    assert p.notes["loss mask from its alpha channel"] == 1
    # the mask is part of the key; a changed mask alone is processed again, nothing else is
    keys = {s: r["key"] for s, r in rows.items()}
    _png(src / "photo.mask.png", np.full((60, 72), 255, np.uint8))
    again = prepare(src, out, d)
    assert again.decoded == 1
    new = {r["source"]: r["key"] for r in load_prepared(out)}
    assert [s for s in new if new[s] != keys[s]] == ["photo.png"]


def test_imagefolder_masks_are_found_and_not_reported_as_unlisted_images(tmp_path):
    src = tmp_path / "src"
    _one(src, "a.png", 40)
    _one(src, "b.png", 200)
    (src / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "tdwl, a"}\n{"file_name": "b.png", "text": "tdwl, b"}\n',
        encoding="utf-8",
    )
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    _png(src / "a.mask.png", half)
    _png(src / "masks" / "b.png", half.T.copy())
    p = build(src, DataConfig(resolution=64, workers=1))
    assert p.layout == "imagefolder" and not p.fatal
    assert not [pr for pr in p.problems if pr.kind == "unlisted_image"]
    got = {r["source"]: _grey(r["mask"]) for r in p.rows}
    assert np.array_equal(got["a.png"], half) and np.array_equal(got["b.png"], half.T)


def test_merged_bucket_moves_the_mask_with_its_image():
    from lorakit.data.doctor import encode_image, rebucket

    m = np.zeros((56, 72), np.uint8)
    m[10:40, 20:60] = 255
    png = encode_image(Image.fromarray(np.dstack([m, m, m])))
    moved = rebucket(png, (0, 0), (64, 64), masks.encode_mask(Image.fromarray(m)))
    mask, rgb = _grey(moved["mask"]), _rgb(moved["png"])
    assert mask.shape == (64, 64)
    assert ((mask > 127) == (rgb[..., 0] > 127)).mean() > 0.99
    assert moved["key"] != rebucket(png, (0, 0), (64, 64))["key"]


# -- refusals ------------------------------------------------------------------------------------


def _one(root: Path, name: str = "a.png", grey: int = 90) -> None:
    _png(root / name, np.full((64, 64, 3), grey, np.uint8))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("size", "is 48×64 px but the image is 64×64 px"),
        ("not_image", "not an image PIL can read"),
        ("orphan", "mask file without an image"),
        ("two", "has two masks"),
    ],
)
def test_bad_mask_files_are_refused_and_nothing_is_written(tmp_path, case, expect):
    src, out = tmp_path / "src", tmp_path / "out"
    _one(src)
    if case == "size":
        _png(src / "a.mask.png", np.full((64, 48), 255, np.uint8))
    elif case == "not_image":
        (src / "a.mask.png").write_bytes(b"this is not a picture")
    elif case == "orphan":
        _png(src / "masks" / "gone.png", np.full((64, 64), 255, np.uint8))
    else:
        _png(src / "a.mask.png", np.full((64, 64), 255, np.uint8))
        _png(src / "masks" / "a.png", np.full((64, 64), 255, np.uint8))
    before = _hashes(src)
    result = cli("prepare", src, out, "--preset", "tiny-cpu", "--batch-size", 1, expect=1)
    assert expect in result.output
    assert "The masks of" in result.output and "Traceback" not in result.output
    assert not out.exists(), "nothing may be written when refusing"
    assert _hashes(src) == before
    p = build(src, DataConfig(resolution=64, workers=1))
    assert p.fatal.startswith("The masks of") and "\n" not in p.fatal


def _run_config(out: Path, *sets: str):
    return cfg.resolve(
        preset="tiny-cpu",
        sets=[
            f"train.out='{out}'",
            "train.steps=2",
            "train.batch_size=2",
            "train.gradient_checkpointing=false",
            "train.optimizer='adamw'",
            "train.warmup_steps=0",
            "train.save_every=0",
            "sample.every=0",
            "eval.images=0",
            "eval.palette_colors=0",
            "log.tensorboard=false",
            "data.workers=1",
            "export.formats=['kohya']",
            *sets,
        ],
    )


def test_train_refuses_empty_or_absent_masks_and_bad_mask_background(tmp_path):
    from lorakit.train import train

    src = tmp_path / "src"
    _one(src, "a.png")
    _one(src, "b.png", 160)
    with pytest.raises(ConfigError, match="no image of the data set has a mask"):
        train(_run_config(tmp_path / "o1", "train.masked_loss=true"), src)
    _png(src / "a.mask.png", np.full((64, 64), 255, np.uint8))
    _png(src / "b.mask.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(LorakitError, match=r"masks of 1 image\(s\) are empty.*'b.png'") as e:
        train(_run_config(tmp_path / "o2", "train.masked_loss=true"), src)
    assert "\n" not in str(e.value) and "train.masked_loss = false" in str(e.value)
    assert not list((tmp_path / "o2").glob("*.safetensors"))
    assert not (tmp_path / "o2" / "config.toml").exists()
    with pytest.raises(ConfigError, match=r"train\.mask_background"):
        _run_config(tmp_path / "o3", "train.mask_background=1.5")


# -- training: bit identity, the mask at work, the cache -----------------------------------------


def _twin_sets(root: Path) -> tuple[Path, Path]:
    """Two sets of two 64-px images with mask files; the images of B differ from those of A
    only where the masks are 0 (their full-weight part, their grey edge and the captions are
    the same)."""
    rng = np.random.default_rng(7)
    sets = (root / "A", root / "B")
    for k in range(2):
        mask = np.zeros((64, 64), np.uint8)
        mask[12 + 4 * k : 44, 10 : 50 - 4 * k] = 255
        mask[44:48, 10:30] = 100  # a grey edge: counts at 100/255
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        other = image.copy()
        other[mask == 0] = rng.integers(0, 256, (int((mask == 0).sum()), 3), dtype=np.uint8)
        for folder, arr in zip(sets, (image, other), strict=True):
            _png(folder / f"img{k}.png", arr)
            _png(folder / f"img{k}.mask.png", mask)
            (folder / f"img{k}.txt").write_text(f"tdwl, brand mark {k}", encoding="utf-8")
    return sets


def _adapter(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.adapters["kohya"]))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sets_differing_only_outside_their_masks_train_bit_identical_adapters(tmp_path):
    """With train.mask_background = 0 nothing outside the masks reaches the model (images with
    mask files are flattened through them: `spec.masked_data`): the adapters of A and B are
    bit-identical, and the second run reads the latents and latent masks the first cached
    (their keys are content: B's flattened images are A's). The masked loss is at work in the
    loop: without it the same data trains another adapter."""
    from lorakit.train import train

    a, b = _twin_sets(tmp_path)
    cache = tmp_path / "cache"
    keep = ["train.masked_loss=true", "train.mask_background=0.0"]  # flattens (spec.masked_data)
    run_a = train(_run_config(tmp_path / "a", *keep, f"data.cache_dir='{cache}'"), a)
    cached = {p: p.stat().st_mtime_ns for p in (cache / "latents").rglob("*.safetensors")}
    assert len(cached) == 4, "2 latents + 2 latent-resolution masks"
    run_b = train(_run_config(tmp_path / "b", *keep, f"data.cache_dir='{cache}'"), b)
    assert _same(_adapter(run_a), _adapter(run_b)), "A and B must train bit-identical adapters"
    assert {p: p.stat().st_mtime_ns for p in (cache / "latents").rglob("*.safetensors")} == cached
    plain = train(_run_config(tmp_path / "p", "data.mask_flatten=true"), a)
    assert not _same(_adapter(plain), _adapter(run_a)), "the mask must change what is learned"


@pytest.mark.slow
def test_unflattened_surroundings_are_context_the_adapter_depends_on(tmp_path):
    """Why mask_background = 0 flattens: with a background weight above 0 (and no
    data.mask_flatten) the pixels outside the mask stay in the denoiser's input as context, and
    the VAE and denoiser are not local, so two sets that differ only there train different
    adapters even where the loss weight is tiny."""
    from lorakit.train import train

    a, b = _twin_sets(tmp_path)
    context = ["train.masked_loss=true", "train.mask_background=0.01"]
    ctx_a = train(_run_config(tmp_path / "ca", *context), a)
    ctx_b = train(_run_config(tmp_path / "cb", *context), b)
    assert not _same(_adapter(ctx_a), _adapter(ctx_b))
