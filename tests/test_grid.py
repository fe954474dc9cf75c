"""Preview grids on the tiny SD1.5: geometry, labels, determinism, and the LoRA-scale sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cli
from PIL import Image, ImageOps

from lorakit.config import LoraConfigSection, SampleConfig
from lorakit.lora import inject_lora, lora_layers
from lorakit.models import FAMILIES
from lorakit.sampling import (
    CAPTION_H,
    HEAD_H,
    LABEL_W,
    GridSpec,
    grid_layout,
    grid_spec,
    lora_scale,
    render_cells,
    render_grid_result,
)

FAM = FAMILIES["sd15"]


def _spec(**kw) -> GridSpec:
    cfg = SampleConfig(prompts=["a cup", "a bag --d 11 --s 3"], seeds=[0, 1], steps=2, **kw)
    return grid_spec(cfg, "", 64)


@pytest.fixture(scope="module")
def lora_pipe():
    comps = FAM.build_tiny(seed=0)
    inject_lora(comps.unet, LoraConfigSection(rank=4, alpha=8.0), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(comps.unet):  # a visible, non-zero adapter
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return FAM.pipeline(comps)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_geometry_labels_and_individual_images(lora_pipe, tmp_path):
    spec = _spec(scales=[0.0, 1.0])
    res = render_grid_result(
        lora_pipe, spec, "demo - step 500", tmp_path / "g.png", tmp_path / "ind"
    )
    grid = Image.open(res.path).convert("RGB")
    layout = grid_layout(spec)
    assert grid.size == (layout.width, layout.height)
    assert len(res.cells) == 2 * 4 and len(res.individual) == 8
    assert sorted(p.name for p in res.individual)[0] == "r00_c00_seed0_scale0.png"
    g = _arr(grid)
    for cell in res.cells:
        x, y = layout.boxes[(cell.row, cell.col)]
        want = ImageOps.contain(cell.image, (layout.cell_w, layout.cell_h), Image.NEAREST)
        assert np.array_equal(g[y : y + want.height, x : x + want.width], _arr(want))
        strip = g[y + layout.cell_h : y + layout.cell_h + CAPTION_H, x : x + layout.cell_w]
        assert (strip < 128).any(), "each cell has a seed/scale caption"
        assert np.array_equal(
            _arr(Image.open(res.individual[res.cells.index(cell)])), _arr(cell.image)
        )
    assert (g[:HEAD_H, :LABEL_W] < 128).any(), "title"
    for r in range(2):
        _, y = layout.boxes[(r, 0)]
        assert (g[y : y + 30, :LABEL_W] < 128).any(), f"prompt label of row {r}"
    # the row with --d 11 uses seeds 11, 12; the other the config's 0, 1
    assert [c.seed for c in res.cells if c.row == 1] == [11, 11, 12, 12]
    assert [c.seed for c in res.cells if c.row == 0] == [0, 0, 1, 1]


def test_same_seed_same_image_and_sweep_leaves_the_model_unchanged(lora_pipe):
    unet = lora_pipe.unet
    unet.train()  # as during training: the grid must not change the mode it finds
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    scaling = [dict(layer.scaling) for _, layer in lora_layers(unet)]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    unet.eval()
    with torch.no_grad():
        out_before = unet(x, t, ctx).sample
    unet.train()

    seen_modes = []
    hook = unet.register_forward_pre_hook(lambda m, a: seen_modes.append(m.training))
    try:
        plain = render_cells(lora_pipe, _spec())
        swept = render_cells(lora_pipe, _spec(scales=[0.0, 0.5, 1.0]))
        again = render_cells(lora_pipe, _spec(scales=[0.0, 0.5, 1.0]))
    finally:
        hook.remove()
    assert seen_modes and not any(seen_modes), "rendered in eval mode"
    assert unet.training, "train mode restored"
    for a, b in zip(swept, again, strict=True):
        assert np.array_equal(_arr(a.image), _arr(b.image)), "same seed → same image"
    by = {(c.row, c.seed, c.scale): _arr(c.image) for c in swept}
    for c in plain:  # scale 1 in the sweep == the adapter as it is
        assert np.array_equal(by[(c.row, c.seed, 1.0)], _arr(c.image))
        assert not np.array_equal(by[(c.row, c.seed, 0.0)], _arr(c.image)), "LoRA is visible"
        assert not np.array_equal(by[(c.row, c.seed, 0.5)], _arr(c.image))
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [dict(layer.scaling) for _, layer in lora_layers(unet)] == scaling
    unet.eval()
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, out_before), "outputs bit-identical after"
    unet.train()

    # scale 0 is exactly the base model: the same tiny weights without any LoRA
    base = FAM.pipeline(FAM.build_tiny(seed=0))
    for c in render_cells(base, _spec()):
        assert np.array_equal(by[(c.row, c.seed, 0.0)], _arr(c.image))


def test_lora_scale_restores_on_error(lora_pipe):
    unet = lora_pipe.unet
    saved = [dict(layer.scaling) for _, layer in lora_layers(unet)]
    with pytest.raises(RuntimeError), lora_scale([unet], 0.0) as n:
        assert n == len(saved) > 0
        assert all(v == 0 for _, layer in lora_layers(unet) for v in layer.scaling.values())
        raise RuntimeError("boom")
    assert [dict(layer.scaling) for _, layer in lora_layers(unet)] == saved


def test_sample_run_dir_renders_checkpoints_side_by_side(trained_run, tmp_path):
    single = tmp_path / "single.png"
    cli("sample", trained_run / "lorakit.safetensors", "--base", "tiny:sd15", "--steps", 1,
        "--seeds", "0", "--out", single)  # fmt: skip
    both = tmp_path / "run.png"
    r = cli("sample", trained_run, "--steps", 1, "--seeds", "0", "--scales", "0,1", "--out", both)
    assert "sample grid" in r.output
    ckpts = [d for d in (trained_run / "checkpoints").iterdir() if d.name.startswith("step-")]
    w_single, w_both = Image.open(single).width, Image.open(both).width
    cell = grid_layout(_spec()).cell_w
    # (checkpoints + final) panels, each with two scale columns instead of one
    assert w_both >= (len(ckpts) + 1) * (w_single + cell), (w_single, w_both, len(ckpts))
    bad = cli("sample", trained_run, "--scales", "0,x", expect=1)
    assert "--scales" in bad.output


def test_scale_sweep_without_adapter_is_a_clear_error():
    base = FAM.pipeline(FAM.build_tiny(seed=0))
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match=r"sample\.scales"):
        render_cells(base, _spec(scales=[0.0, 1.0]))
