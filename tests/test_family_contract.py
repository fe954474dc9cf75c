"""The path every registered family must walk, through the real CLI, on its tiny model.

Parametrized over `FAMILIES`: registering a family puts it under this test. Per family, at the
smallest shapes: `prepare` (no model named) then `train` on that set at a resolution whose
buckets are not all square, 2 steps with text-encoder LoRA and a preview grid; every export
format written and read back; `inspect` of each file. Slow tier: `plan` and `merge` (and
`--single-file` where the family has one).
"""

from __future__ import annotations

import json

import pytest
from conftest import FAST, SAMPLES, cli

from lorakit.export import read_adapter
from lorakit.models import FAMILIES


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "set"
    cli("prepare", SAMPLES, out, "--set", "data.resolution=64")
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_walks_the_whole_path(family, prepared, tmp_path):
    buckets = json.loads((prepared / "report.json").read_text())["buckets"]
    assert any(w != h for w, h in (b.split("x") for b in buckets)), "needs non-square buckets"
    run = tmp_path / "run"
    cli(
        "train", prepared, *FAST, "--model", f"tiny:{family}", "--steps", 2, "--out", run,
        "--set", "data.resolution=64", "--set", "lora.train_text_encoder=true",
        "--set", "sample.every=2", "--set", "train.batch_size=1",
    )  # fmt: skip
    assert sorted(p.name for p in (run / "samples").glob("*.png")), "preview grids"
    cli("export", run, "--format", "all", "--out", tmp_path / "x")
    files = sorted((tmp_path / "x").rglob("*.safetensors"))
    assert len(files) == 3, files  # kohya, lycoris, diffusers: a LoRA fits every format
    for f in files:
        adapter, _ = read_adapter(f)
        assert adapter.family == family, f
        assert any(comp != FAMILIES[family].denoiser_name for comp, _ in adapter.modules), (
            f"{f.name}: the text-encoder LoRA is missing"
        )
        r = cli("inspect", f)
        assert f"family:      {family}" in r.output, r.output


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_plans_and_merges(family, tmp_path):
    """`plan` (it traces the family's REAL architecture, ~10 s) and `merge` into the base
    model (with `--single-file` where the family has one)."""
    cli("plan", "--preset", "tiny-cpu", "--set", f"model.name='tiny:{family}'")
    run = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--model", f"tiny:{family}", "--steps", 1, "--out", run)
    single = FAMILIES[family].single_file_configs() is not None
    merged = tmp_path / "merged"
    cli(
        "merge", run / "lorakit.safetensors", "--base", f"tiny:{family}", "--out", merged,
        *(["--single-file"] if single else []),
    )  # fmt: skip
    assert (merged / "model_index.json").is_file()
    assert not single or (tmp_path / "merged.safetensors").is_file()
