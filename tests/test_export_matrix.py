"""Every export lorakit writes, checked against the loaders that read it.

Matrix: family × format/naming × adapter kind × stored dtype. Each file is loaded by the
re-implemented ComfyUI and Forge rules (tests/loaders.py: key maps, alpha/rank, slices, swaps,
DoRA) and, where the README sends diffusers users to it, by diffusers' own `load_lora_weights` on
the tiny pipeline. A loader lorakit names for a file must read every key and reproduce the trained
update of every module (peft's ΔW, or for DoRA the loader's documented rule fed with the trained
direction and magnitude); every other weight must stay as it was. A loader NOT named for a file
must visibly not load it (keys left over, or Forge skipping it), so the README table is exact both
ways. Combinations no format can hold are refused before a file exists.

Adapters: rank 4, alpha 8 (alpha ≠ rank), `to_k` at rank 2 and one module at alpha 3 (so fused
q/k/v have unequal ranks and scales), CLIP q/v LoRA, non-attention modules per family (convs,
MLPs, FLUX/SD3 final adaLN with its scale/shift swap, SD3's last context adaLN).
"""

from __future__ import annotations

import dataclasses
from functools import cache

import loaders
import pytest
import torch
from conftest import cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.config import LoraConfigSection
from lorakit.errors import LorakitError
from lorakit.export import loads_in, read_adapter, write_adapter
from lorakit.export.diffusers import FILENAME
from lorakit.lora import canonical_name, extract_adapter, inject_lora, lora_layers
from lorakit.lora import text_encoder_targets as clip_targets
from lorakit.models import FAMILIES

LAYOUTS = [("kohya", "original"), ("kohya", "diffusers"), ("diffusers", "-"), ("lycoris", "-")]
KINDS = ("lora", "dora", "loha", "lokr")
DTYPES = ("fp32", "fp16", "bf16")
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
"""Allowed error relative to the largest trained change of a weight (storage rounding)."""

ALL = {"comfyui", "forge", "diffusers"}
CLAIMS: dict[tuple[str, str, str], set[str]] = {
    ("sd15", "kohya", "original"): {"comfyui", "forge"},
    ("sd15", "kohya", "diffusers"): {"comfyui", "forge"},
    ("sd15", "diffusers", "-"): {"diffusers"},
    ("sd15", "lycoris", "-"): {"comfyui", "forge"},
    ("sdxl", "kohya", "original"): {"comfyui", "forge"},
    ("sdxl", "kohya", "diffusers"): {"comfyui", "forge"},
    ("sdxl", "diffusers", "-"): {"diffusers"},
    ("sdxl", "lycoris", "-"): {"comfyui", "forge"},
    ("flux", "kohya", "original"): {"comfyui", "forge"},
    ("flux", "kohya", "diffusers"): {"comfyui", "forge"},
    ("flux", "diffusers", "-"): ALL,
    ("flux", "lycoris", "-"): {"comfyui", "forge"},
    ("sd3", "kohya", "original"): {"comfyui", "forge"},
    ("sd3", "kohya", "diffusers"): {"comfyui"},
    ("sd3", "diffusers", "-"): {"comfyui", "diffusers"},
    ("sd3", "lycoris", "-"): {"comfyui"},
}
"""Which loaders read which file (the README's "Load the adapter" table). For diffusers that is the
diffusers-format file: diffusers 0.42 also reads SD1.5/SDXL/FLUX kohya files (test_export_formats)
but its kohya converters lose per-module alphas (SD1.5/SDXL: the alpha_pattern keys it builds
match no module; FLUX: final_layer ignores alpha) and drop FLUX's top-level modules, so with this
matrix's alpha pattern they load modules at the wrong strength. LyCORIS tensors are ComfyUI/Forge
only. Forge maps no SD3 diffusers names, so SD3.5 in Forge = the kohya original-names file."""

TARGETS = {
    "sd15": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1",
             "time_emb_proj"],
    "flux": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
             "to_add_out", "proj_mlp", "norm1.linear", "ff_context.net.2", "x_embedder",
             "norm_out.linear", "proj_out"],
    "sd3": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
            "to_add_out", "ff.net.2", "norm1_context.linear", "context_embedder",
            "norm_out.linear"],
}  # fmt: skip
ALPHA_AT = {"sd15": "attn2.to_v", "sdxl": "attn2.to_v", "flux": "add_v_proj", "sd3": "add_v_proj"}
SWAPPED = ("norm_out.linear", "norm1_context.linear")
"""Modules whose original layout swaps (scale, shift): no DoRA there (see test_dora_*)."""


def _targets(family: str, kind: str) -> list[str]:
    t = TARGETS[family]
    if kind in ("loha", "lokr"):
        t = [m for m in t if m != "conv1"]  # 3×3 convs would need LyCORIS' Tucker form
    if kind == "dora":
        t = [m for m in t if m not in SWAPPED]
    return t


# -- models and trained adapters ----------------------------------------------------------------


def tiny(family: str):
    fam = FAMILIES[family]
    c = fam.build_tiny(0)
    if family == "sdxl":  # SGM names need the real layers_per_block = 2
        from diffusers import UNet2DConditionModel

        from lorakit.models.sdxl import TINY_UNET

        torch.manual_seed(0)
        c.unet = UNet2DConditionModel(**dict(TINY_UNET, layers_per_block=2)).eval()
        c.unet.requires_grad_(False)
    return c


def _module_weights(family: str, comps) -> dict[tuple[str, str], torch.Tensor]:
    """(component, canonical path) → weight of every Linear/Conv2d a loader could patch."""
    fam = FAMILIES[family]
    out = {}
    for target in fam.targets:
        module = getattr(comps, target.component, None)
        if module is None:
            continue
        for name, m in module.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                path = canonical_name(target, name)
                if target.component == fam.denoiser_name or path.endswith(loaders.CLIP_LEAVES):
                    out[(target.component, path)] = m.weight.detach().clone()
    return out


@cache
def fresh(family: str):
    """Untouched tiny components (the base every loader patches) and their loader model."""
    comps = tiny(family)
    fam = FAMILIES[family]
    weights = _module_weights(family, comps)
    config = dict(getattr(comps, fam.denoiser_name).config)
    return comps, loaders.build_model(family, weights, config)


@dataclasses.dataclass
class Trained:
    adapter: object
    delta: dict[tuple[str, str], torch.Tensor]
    """peft's ΔW per module, as trained (for DoRA: the direction update before rescaling)."""
    magnitude: dict[tuple[str, str], torch.Tensor]


@cache
def trained(family: str, kind: str) -> Trained:
    fam = FAMILIES[family]
    comps = tiny(family)
    cfg = LoraConfigSection(
        rank=4, alpha=8.0, target_modules=_targets(family, kind), type="lora" if kind == "dora"
        else kind, use_dora=kind == "dora", rank_pattern={"to_k": 2},
        alpha_pattern={ALPHA_AT[family]: 3.0},
    )  # fmt: skip
    params = inject_lora(getattr(comps, fam.denoiser_name), cfg, 0)
    # lorakit's default text-encoder targets: diffusers 0.42 cannot tell the layout of a kohya
    # SD1.5/SDXL text-encoder LoRA without out_proj ("Could not automatically infer state dict
    # type"), a diffusers limitation outside lorakit's files
    te = dataclasses.replace(cfg, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                             rank_pattern={}, alpha_pattern={})  # fmt: skip
    for i, t in enumerate(clip_targets(fam, comps)):
        params += inject_lora(getattr(comps, t.component), te, 1 + i)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = extract_adapter(fam, comps, {"lorakit.family": family})
    delta, magnitude = {}, {}
    for target in fam.targets:
        module = getattr(comps, target.component, None)
        if module is None:
            continue
        for name, layer in lora_layers(module):
            cp = (target.component, canonical_name(target, name))
            with torch.no_grad():
                delta[cp] = layer.get_delta_weight("default").float()
                if kind == "dora":
                    mag = layer.lora_magnitude_vector["default"].weight  # conv: [1, out, 1, 1]
                    magnitude[cp] = mag.detach().reshape(-1).clone()
    assert delta.keys() == adapter.modules.keys()
    return Trained(adapter, delta, magnitude)


# -- checks -------------------------------------------------------------------------------------


def expected(model: loaders.LoaderModel, t: Trained) -> dict[str, torch.Tensor]:
    """The weights `t` must change, as they must be after loading (ComfyUI/Forge's DoRA rule);
    every other weight must stay as it is."""
    out: dict[str, torch.Tensor] = {}
    for cp, d in t.delta.items():
        target = model.where[cp]
        key = f"{target.key}.weight"
        if key not in out:
            out[key] = model.weights[key].clone()
        base = loaders.read_back(model, cp)
        want = base + d if cp not in t.magnitude else loaders.comfy_dora(base, d, t.magnitude[cp])
        loaders._view(out, target).copy_(loaders._swap(want) if target.swap else want)
    return out


def _strength(model, got: loaders.LoaderModel, t: Trained) -> str:
    """How much of each trained update a loader applied (1.00 = trained strength)."""
    ratios = []
    for cp, d in t.delta.items():
        applied = loaders.read_back(got, cp) - loaders.read_back(model, cp)
        ratios.append(float((applied * d).sum() / (d * d).sum().clamp_min(1e-30)))
    return f"applied/trained per module: min {min(ratios):.2f}, max {max(ratios):.2f}"


def check_loader(loader: str, tensors, t: Trained, model, dtype: str, want=None) -> None:
    res = loaders.load(loader, model, tensors)
    assert not res.rejected, f"{loader} skips the whole file ({len(res.unread)} unmatched keys)"
    n = len(tensors)
    assert not res.unread, (
        f"{loader} consumed {n - len(res.unread)}/{n} keys; not loaded: {res.unread[:4]}"
    )
    assert not res.not_applied, f"{loader} maps keys to missing weights {res.not_applied[:4]}"
    want = expected(model, t) if want is None else want
    changed = {k for k, v in res.model.weights.items() if v is not model.weights[k]}
    for key in sorted(changed | want.keys()):
        base, target = model.weights[key], want.get(key, model.weights[key])
        scale = (target - base).abs().max().item() if not t.magnitude else target.abs().max().item()
        err = (res.model.weights[key] - target).abs().max().item()
        assert err <= TOL[dtype] * max(scale, 1e-12), (
            f"{loader}: {key} off by {err:.3g} (trained change {scale:.3g}); "
            + _strength(model, res.model, t)
        )


def check_not_loaded(loader: str, tensors, model) -> None:
    res = loaders.load(loader, model, tensors)
    assert res.rejected or res.unread, f"{loader} reads every key of a file not listed for it"


def _peft_deltas(pipe, family: str) -> dict[tuple[str, str], torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    fam = FAMILIES[family]
    out = {}
    for target in fam.targets:
        module = getattr(pipe, target.component, None)
        if module is None:
            continue
        for name, m in module.named_modules():
            if isinstance(m, LoraLayer):
                with torch.no_grad():
                    d = sum(m.get_delta_weight(a).float() for a in m.lora_A)
                out[(target.component, canonical_name(target, name))] = d
    return out


def check_diffusers(path, t: Trained, family: str, dtype: str) -> None:
    comps, _ = fresh(family)
    pipe = FAMILIES[family].pipeline(comps)
    pipe.load_lora_weights(str(path))
    try:
        got = _peft_deltas(pipe, family)
    finally:
        pipe.unload_lora_weights()
    missing = sorted(f"{c}.{p}" for c, p in t.delta.keys() - got.keys())
    assert not missing, f"diffusers did not load {len(missing)} modules: {missing[:4]}"
    for cp, d in got.items():
        want = t.delta.get(cp, torch.zeros_like(d))
        scale = max(want.abs().max().item(), 1e-12)
        ratio = float((d * want).sum() / (want * want).sum().clamp_min(1e-30))
        assert (d - want).abs().max().item() <= TOL[dtype] * scale, (
            f"diffusers: {cp} applied/trained {ratio:.2f}"
        )


def _refused(fmt: str, kind: str) -> bool:
    return fmt in ("kohya", "diffusers") and kind != "lora"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,naming", LAYOUTS)
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_export_matrix(tmp_path, family, fmt, naming, kind, dtype):
    t = trained(family, kind)
    path = tmp_path / "a.safetensors"
    kwargs = {"naming": naming} if naming != "-" else {}
    if _refused(fmt, kind):
        with pytest.raises(LorakitError, match="--format lycoris"):
            write_adapter(t.adapter, fmt, path, dtype=dtype, **kwargs)
        assert not path.exists()
        return
    write_adapter(t.adapter, fmt, path, dtype=dtype, **kwargs)
    tensors = load_file(str(path))
    _, model = fresh(family)
    claims = CLAIMS[(family, fmt, naming)]
    for loader in ("comfyui", "forge"):
        if loader in claims:
            check_loader(loader, tensors, t, model, dtype)
        else:
            check_not_loaded(loader, tensors, model)
    if "diffusers" in claims and kind == "lora":
        check_diffusers(path, t, family, dtype)


# -- regressions of issue #17 (each failed on the code before the fix) --------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_format_file_applies_the_trained_strength_in_comfyui(tmp_path, family):
    """Item 2: the FLUX/SD3 diffusers-format file carried no alpha, so ComfyUI applied scale 1.0
    (0.50 of the trained strength at alpha 8, rank 4)."""
    t = trained(family, "lora")
    path = write_adapter(t.adapter, "diffusers", tmp_path / "d.safetensors")
    _, model = fresh(family)
    check_loader("comfyui", load_file(str(path)), t, model, "fp32")
    meta = safe_open(str(path), "pt").metadata()
    assert meta["lorakit.strength"] == "folded"


@pytest.mark.parametrize("fmt,naming", [("kohya", "diffusers"), ("lycoris", "original")])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_split_name_files_are_read_by_comfyui(tmp_path, family, fmt, naming):
    """Item 3: `lora_unet_<diffusers path>` keys for FLUX/SD3 matched nothing in any loader."""
    t = trained(family, "lora")
    path = write_adapter(t.adapter, fmt, tmp_path / "a.safetensors", naming=naming)
    _, model = fresh(family)
    check_loader("comfyui", load_file(str(path)), t, model, "fp32")


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lycoris_kinds_for_transformers_are_read_by_comfyui(tmp_path, family, kind):
    """Item 3: LoHa/LoKr/DoRA files for FLUX and SD3.5 had 0 keys consumed anywhere."""
    t = trained(family, kind)
    path = write_adapter(t.adapter, "lycoris", tmp_path / "a.safetensors")
    _, model = fresh(family)
    check_loader("comfyui", load_file(str(path)), t, model, "fp32")


def test_export_all_writes_every_format_to_its_own_file(tmp_path):
    """Item 4: `--format all` wrote kohya and then LyCORIS to the same OUT/<name>.safetensors."""
    t = trained("sdxl", "lora")
    src = write_adapter(t.adapter, "kohya", tmp_path / "src" / "lorakit.safetensors")
    out = tmp_path / "out"
    cli("export", src, "--format", "all", "--out", out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert files == ["diffusers/pytorch_lora_weights.safetensors", "lorakit.lycoris.safetensors",
                     "lorakit.safetensors"]  # fmt: skip
    kohya, _ = read_adapter(out / "lorakit.safetensors")
    with safe_open(str(out / "lorakit.safetensors"), "pt") as f:
        assert f.metadata()["lorakit.kohya_names"] == "sgm"  # the kohya file, not overwritten
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    for path in (out / "lorakit.lycoris.safetensors", out / "diffusers" / FILENAME):
        back, _ = read_adapter(path)
        assert back.modules.keys() == kohya.modules.keys()
        for k, w in back.modules.items():
            assert torch.allclose(w.delta(), kohya.modules[k].delta(), atol=1e-6), k


def test_export_all_of_a_lycoris_adapter_writes_only_what_holds_it(tmp_path):
    t = trained("sd15", "loha")
    src = write_adapter(t.adapter, "lycoris", tmp_path / "src" / "lorakit.lycoris.safetensors")
    r = cli("export", src, "--format", "all", "--out", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.safetensors")) == [
        "lorakit.lycoris.safetensors"
    ]
    assert "kohya" in r.output and "diffusers" in r.output and "LoHa" in r.output


# -- DoRA: what ComfyUI/Forge apply, documented and measured -----------------------------------


def test_dora_loads_exactly_by_the_loaders_rule_and_the_gap_to_training_is_reported(tmp_path):
    """ComfyUI/Forge normalise DoRA rows by ‖W‖, peft by ‖W + ΔW‖: the file feeds their rule
    exactly (the matrix), and the result differs from the trained weight by a small amount
    that the export message and README state."""
    t = trained("flux", "dora")
    path = write_adapter(t.adapter, "lycoris", tmp_path / "a.safetensors")
    _, model = fresh("flux")
    res = loaders.load("comfyui", model, load_file(str(path)))
    gaps = []
    for cp, d in t.delta.items():
        if cp not in t.magnitude:
            continue
        base = loaders.read_back(model, cp)
        peft = loaders.peft_dora(base, d, t.magnitude[cp])
        gaps.append((loaders.read_back(res.model, cp) - peft).abs().max().item())
    assert 0 < max(gaps) < 0.5, gaps
    r = cli("export", path, "--format", "lycoris", "--out", tmp_path / "o.lycoris.safetensors")
    assert "DoRA" in r.output and "‖W‖" in r.output


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dora_on_a_swapped_adaln_is_refused(tmp_path, family):
    """ComfyUI/Forge swap the update of FLUX/SD3's final adaLN but not its dora_scale, so a DoRA
    there would rescale the wrong rows: refused before writing, naming what to change."""
    fam = FAMILIES[family]
    comps = tiny(family)
    cfg = LoraConfigSection(rank=4, alpha=8.0, target_modules=["norm_out.linear"], use_dora=True)
    inject_lora(comps.transformer, cfg, 0)
    adapter = extract_adapter(fam, comps, {})
    with pytest.raises(LorakitError, match=r"norm_out\.linear.*lora\.target_modules"):
        write_adapter(adapter, "lycoris", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# -- real widths: FLUX.1 / SD3.5-large blocks, ComfyUI and Forge rules --------------------------

FLUX_1 = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
              pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))  # fmt: skip
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=1,
                  attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192)  # fmt: skip
REAL_TARGETS = {
    "flux": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
             "transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.0.attn.to_v",
             "single_transformer_blocks.0.proj_mlp", "norm_out.linear"],
    "sd3": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.norm1_context.linear"],
}  # fmt: skip


@cache
def _real(family: str):
    import diffusers

    cls, config = (
        (diffusers.FluxTransformer2DModel, FLUX_1)
        if family == "flux"
        else (diffusers.SD3Transformer2DModel, SD35_LARGE)
    )
    with torch.device("meta"):
        model = cls(**config)
    shapes = {p: m.weight.shape for p, m in model.named_modules() if hasattr(m, "weight")
              and isinstance(m, torch.nn.Linear)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    modules, delta = {}, {}
    from lorakit.lora import Adapter, LoraWeights

    for i, path in enumerate(REAL_TARGETS[family]):
        out, inp = shapes[path]
        rank = 2 if i % 2 else 4
        w = LoraWeights(torch.randn(rank, inp, generator=g) * 0.02,
                        torch.randn(out, rank, generator=g) * 0.02, [8.0, 3.0][i % 2])  # fmt: skip
        modules[("transformer", path)] = w
        delta[("transformer", path)] = w.delta()
    # the loader model allocates only the weights these modules live in (zeros: ΔW is additive),
    # but knows every weight key of the real architecture
    dmap = loaders._denoiser_map(family, dict(model.config))
    hit = {dmap[p].key for p in REAL_TARGETS[family]}
    weights = {("transformer", p): torch.zeros(s) for p, s in shapes.items()
               if p in dmap and dmap[p].key in hit}  # fmt: skip
    every = {f"{dmap[p].key}.weight" for p in shapes if p in dmap}
    lm = loaders.build_model(family, weights, dict(model.config), every)
    return Adapter(family, modules, {}), Trained(None, delta, {}), lm


SLOW = pytest.mark.slow
REAL_CELLS = [
    ("flux", "kohya", "original"), ("flux", "diffusers", "-"), ("sd3", "kohya", "original"),
    pytest.param("sd3", "diffusers", "-", marks=SLOW),
    pytest.param("flux", "kohya", "diffusers", marks=SLOW),
    pytest.param("sd3", "kohya", "diffusers", marks=SLOW),
    pytest.param("flux", "lycoris", "-", marks=SLOW),
    pytest.param("sd3", "lycoris", "-", marks=SLOW),
]  # fmt: skip


@pytest.mark.parametrize("family,fmt,naming", REAL_CELLS)
def test_real_width_exports_load_at_the_trained_strength(tmp_path, family, fmt, naming):
    """Real FLUX.1 / SD3.5-large widths (hidden 3072 / 2432, MLP 12288 / 9728) at depth 1: the
    slices ComfyUI/Forge cut from fused weights (`depth·64`, FLUX's 4×hidden proj_mlp) must be
    the ones lorakit fuses into / names."""
    adapter, t, model = _real(family)
    kwargs = {"naming": naming} if naming != "-" else {}
    path = write_adapter(adapter, fmt, tmp_path / "a.safetensors", dtype="bf16", **kwargs)
    tensors = load_file(str(path))
    want = expected(model, t)
    for loader in sorted(CLAIMS[(family, fmt, naming)] - {"diffusers"}):
        check_loader(loader, tensors, t, model, "bf16", want)


@pytest.mark.parametrize("family,fmt,naming", [
    ("sd15", "kohya", "original"), ("sdxl", "kohya", "original"),
    pytest.param("sd15", "kohya", "diffusers", marks=SLOW),
    pytest.param("sdxl", "kohya", "diffusers", marks=SLOW),
    pytest.param("sd15", "lycoris", "-", marks=SLOW),
    pytest.param("sdxl", "lycoris", "-", marks=SLOW),
])  # fmt: skip
def test_real_unet_exports_are_consumed_key_for_key(tmp_path, family, fmt, naming):
    """The real SD1.5 / SDXL-base UNet: a rank-1 LoRA on every module lorakit can name; ComfyUI
    and Forge must read every key and place it on a weight of the real model; the attention and
    resnet modules of one block get their exact ΔW."""
    import diffusers

    from lorakit.lora import Adapter, LoraWeights
    from lorakit.models.sd15 import SD15_UNET
    from lorakit.models.sdxl import SDXL_UNET

    config = {k: v for k, v in (SD15_UNET if family == "sd15" else SDXL_UNET).items()
              if not k.startswith("_")}  # fmt: skip
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    fam = FAMILIES[family]
    shapes = {n: m.weight.shape for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and n in fam.known_modules("unet")}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    modules, delta = {}, {}
    for path, shape in shapes.items():
        down = torch.randn(1, *shape[1:], generator=g)
        up = torch.randn(shape[0], 1, *((1, 1) if len(shape) == 4 else ()), generator=g)
        modules[("unet", path)] = w = LoraWeights(down, up, 0.5)
        if path.startswith(("down_blocks.1.attentions.0.", "up_blocks.1.resnets.2.")):
            delta[("unet", path)] = w.delta()
    assert len(delta) > 8
    dmap = loaders._denoiser_map(family, config)
    every = {f"{dmap[p].key}.weight" for p in shapes}
    model = loaders.build_model(family, {cp: torch.zeros(shapes[cp[1]]) for cp in delta},
                                config, every)  # fmt: skip
    kwargs = {"naming": naming} if naming != "-" else {}
    path = write_adapter(Adapter(family, modules, {}), fmt, tmp_path / "a.safetensors", **kwargs)
    tensors = load_file(str(path))
    want = expected(model, Trained(None, delta, {}))
    for loader in ("comfyui", "forge"):
        check_loader(loader, tensors, Trained(None, delta, {}), model, "fp32", want)


def test_legacy_split_name_files_are_read_and_converted(tmp_path):
    """Files written before the fix (`lora_unet_<diffusers path>` for FLUX) are read, so
    `lorakit export` turns them into files the loaders map."""
    t = trained("flux", "lora")
    legacy = {}
    for (comp, path), w in t.adapter.modules.items():
        prefix = "lora_unet_" if comp == "transformer" else "lora_te1_"
        key = prefix + path.replace(".", "_")
        legacy |= {f"{key}.lora_down.weight": w.down, f"{key}.lora_up.weight": w.up,
                   f"{key}.alpha": torch.tensor(w.alpha)}  # fmt: skip
    save_file(legacy, str(tmp_path / "old.safetensors"))
    back, _ = read_adapter(tmp_path / "old.safetensors", family="flux")
    assert back.modules.keys() == t.adapter.modules.keys()


def test_export_messages_name_exactly_the_loaders_checked_here():
    """What `lorakit export` prints ("loads in …") is the CLAIMS table this file verifies."""
    names = {"comfyui": "ComfyUI", "forge": "Forge", "diffusers": "diffusers"}
    for (family, fmt, naming), claims in CLAIMS.items():
        text = loads_in(fmt, family, "original" if naming == "-" else naming)
        assert {k for k, n in names.items() if n in text} == claims, (family, fmt, naming, text)
