"""Real-architecture key coverage of the kohya export (original naming), without any download.

Approach (no original checkpoint is available offline, and diffusers has no diffusers→original
converter for these models, so the original names are checked through diffusers' own
original→diffusers single-file converters):

1. Build the REAL backbone (SD1.5 / SDXL base UNet, SD3.5-medium / FLUX.1-dev transformer) on the
   meta device from the real configs: no memory. Its state dict gives every diffusers parameter
   name and shape.
2. Make an `Adapter` with a rank-2 LoRA for every module of the family's fixed table that the real
   model has (shapes from the meta modules; CPU tensors) and export it as kohya, original naming.
3. Every exported key must name an original module: strip the kohya prefix, look the module up
   in the original-name table, and build a synthetic ORIGINAL-format state dict with one weight
   (and bias) per exported module, of the shape the LoRA implies (lora_up rows × lora_down cols
   × kernel). Each weight is "tagged": float64, value = module id · 10⁶ + row index, with every
   input dim of size 1 (the converters copy with `torch.cat`, which would materialise full-size
   weights: 20+ GB for FLUX); the full shape is checked against the real meta model instead.
4. Run diffusers' converter (`convert_ldm_unet_checkpoint`, `convert_sd3_transformer_…`,
   `convert_flux_transformer_…`) on it. Keys the converter needs that are not LoRA modules
   (norms, positional embeddings) are filled with placeholders when it asks for them.
5. Then for every exported module and each diffusers part it stands for, the converted tensor
   must (a) exist, (b) have exactly the real meta model's shape and (c) carry the tags of the
   right rows of the original tensor (q/k/v/mlp order, SD3/FLUX adaLN (shift, scale) swap).
   A wrong original name is never read by the converter (fails (a)); a wrong fused layout or
   shape fails (b)/(c). SD1.5's kohya names are the diffusers ones (what kohya writes); they are
   mapped to LDM names with `sd15.names.ldm_module_name` for the same check.

Text encoders are not covered here (their kohya names are the transformers names).
"""

from __future__ import annotations

import re

import pytest
import torch

from lorakit.export import kohya
from lorakit.lora import Adapter, LoraWeights
from lorakit.models import FAMILIES
from lorakit.models.sd15 import SD15_UNET
from lorakit.models.sd15 import names as sd15_names
from lorakit.models.sdxl import SDXL_UNET

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
"""stabilityai/stable-diffusion-3.5-medium transformer/config.json."""
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""black-forest-labs/FLUX.1-dev transformer/config.json."""
RANK = 2


def _meta_model(family: str):
    import diffusers

    if family in ("sd15", "sdxl"):
        cfg = {k: v for k, v in (SD15_UNET if family == "sd15" else SDXL_UNET).items()}
        cfg.pop("_class_name", None)
        cls, config = diffusers.UNet2DConditionModel, cfg
    elif family == "sd3":
        cls, config = diffusers.SD3Transformer2DModel, SD35_MEDIUM
    else:
        cls, config = diffusers.FluxTransformer2DModel, FLUX_DEV
    with torch.device("meta"):
        model = cls(**config)
    return model, dict(model.config)


def _adapter(family, model) -> Adapter:
    """Rank-2 LoRA on every module of the fixed table that exists in the real model."""
    comp = family.denoiser_name
    known = family.known_modules(comp)
    mods = dict(model.named_modules())
    real = {n for n, m in mods.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    # The table and the real model agree (SD3: the table is the large ∪ medium union).
    assert real <= known, sorted(real - known)[:5]
    g = torch.Generator().manual_seed(0)
    modules = {}
    for path in sorted(real):
        w = mods[path].weight
        out, rest = w.shape[0], tuple(w.shape[1:])
        down = torch.randn(RANK, *rest, generator=g)
        up = torch.randn(out, RANK, *((1, 1) if len(rest) == 3 else ()), generator=g)
        modules[(comp, path)] = LoraWeights(down, up, float(RANK))
    return Adapter(family.name, modules, {})


def _tag(i: int, shape: tuple[int, ...]) -> torch.Tensor:
    rows = torch.arange(shape[0], dtype=torch.float64) + i * 1e6
    return rows.reshape(-1, *([1] * (len(shape) - 1)))


def _convert(family: str, original: dict, config: dict) -> dict:
    from diffusers.loaders import single_file_utils as sfu

    filled = []
    for _ in range(200):
        ckpt = dict(original)
        try:
            if family in ("sd15", "sdxl"):
                ckpt = {f"model.diffusion_model.{k}": v for k, v in ckpt.items()}
                return sfu.convert_ldm_unet_checkpoint(ckpt, config), filled
            if family == "sd3":
                return sfu.convert_sd3_transformer_checkpoint_to_diffusers(ckpt), filled
            return sfu.convert_flux_transformer_checkpoint_to_diffusers(ckpt), filled
        except KeyError as e:  # a non-LoRA parameter (norm, pos embed): give it a placeholder
            key = str(e.args[0]).removeprefix("model.diffusion_model.")
            assert key not in original, f"converter failed on {key}"
            original[key] = torch.zeros(1)
            filled.append(key)
    raise AssertionError("converter kept asking for keys")


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_kohya_keys_are_real_original_parameters(name):
    family = FAMILIES[name]
    model, config = _meta_model(name)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    adapter = _adapter(family, model)
    tensors = kohya.to_state_dict(adapter, family, "original")
    prefix = next(t.kohya_prefix for t in family.targets if t.component == family.denoiser_name)

    # kohya key (without suffix) → original dotted path, from the original-name table
    if name == "sd15":
        by_key = {prefix + p.replace(".", "_"): p for _, p in adapter.modules}
        to_orig = {k: sd15_names.ldm_module_name(p) for k, p in by_key.items()}
    else:
        to_orig = {
            prefix + orig.replace(".", "_"): orig
            for (comp, orig) in kohya._original_table(family)
            if comp == family.denoiser_name
        }
    table = kohya.key_table(family, "original")
    groups = kohya.group(tensors)
    unmapped = sorted(b for b in groups if b not in to_orig)
    assert not unmapped, f"{len(unmapped)} unmapped: {unmapped[:5]}"
    assert len(kohya.unmapped_keys(list(tensors), family)) == 0

    original, expect = {}, {}
    for i, (base, parts) in enumerate(sorted(groups.items())):
        assert set(parts) == set(kohya.SUFFIXES), base
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        assert down.shape[0] == up.shape[1] and parts[".alpha"].dim() == 0
        shape = (up.shape[0], *down.shape[1:])
        orig = to_orig[base]
        original[f"{orig}.weight"] = _tag(i, shape)
        original[f"{orig}.bias"] = _tag(i, shape[:1])
        entry = table[base]
        expect[orig] = (i, shape, entry)

    converted, filled = _convert(name, dict(original), config)
    assert not any(re.search(r"\.(weight|bias)$", k) and k.rsplit(".", 1)[0] in expect
                   for k in filled)  # fmt: skip
    for orig, (i, shape, entry) in expect.items():
        base = shape[0] // sum(entry.mults)
        row = 0
        for part, mult in zip(entry.parts, entry.mults, strict=True):
            width = mult * base if entry.fused else shape[0]
            key = f"{part}.weight"
            assert key in converted, f"{orig} did not become {key}"
            got = converted[key]
            assert got.shape[0] == width and ref[key] == (width, *shape[1:]), (orig, key)
            want = torch.arange(row, row + width, dtype=torch.float64) + i * 1e6
            swap = entry.swap is True or (entry.swap == "if_two_chunks" and width == 2 * shape[1])
            if swap:
                want = torch.cat(want.chunk(2)[::-1])
            flat = got.reshape(width, -1)[:, 0]
            assert torch.equal(flat, want), f"{orig} rows do not land in {key} in order"
            row += width
    # every LoRA module of the real model was exported under an original name
    covered = {p for _, _, e in expect.values() for p in e.parts}
    assert covered == {p for _, p in adapter.modules}
