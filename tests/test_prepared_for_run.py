"""A set written by `lorakit prepare` is bucketed as the run's family needs, and a set prepared
with other parameters stops the run with one paragraph naming both values (issue #13, 2 and 3)."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, SAMPLES, cli


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The same images prepared at 64 px without a model (buckets for every family) and with the
    tiny SD1.5 preset (8 px steps: 56×72 buckets, which no 2×2-patch transformer can take)."""
    root = tmp_path_factory.mktemp("prepared")
    cli("prepare", SAMPLES, root / "any", "--set", "data.resolution=64")
    cli("prepare", SAMPLES, root / "sd15", "--preset", "tiny-cpu")
    return root


def _buckets(folder):
    return json.loads((folder / "report.json").read_text())["buckets"]


def test_prepare_without_a_model_buckets_for_every_family(prepared):
    assert all(int(side) % 16 == 0 for b in _buckets(prepared / "any") for side in b.split("x"))
    # naming the model buckets for its family, exactly as `train` does (8 px for SD1.5 at 64 px)
    assert "56x72" in _buckets(prepared / "sd15")


def test_flux_trains_on_a_set_prepared_without_a_model(prepared, tmp_path):
    # before the fix: 5 steps, then `RuntimeError: shape '[1, 16, 3, 2, 4, 2]' is invalid`
    cli(
        "train", prepared / "any", *FAST, "--model", "tiny:flux", "--steps", 6,
        "--set", "data.resolution=64", "--out", tmp_path / "r",
    )  # fmt: skip
    assert (tmp_path / "r" / "lorakit.safetensors").is_file()


def test_a_set_bucketed_for_another_family_is_refused_in_one_paragraph(prepared, tmp_path):
    r = cli(
        "train", prepared / "sd15", *FAST, "--model", "tiny:flux", "--steps", 2,
        "--set", "data.resolution=64", "--out", tmp_path / "r", expect=2,
    )  # fmt: skip
    text = " ".join(r.output.split())
    assert "56×72" in text and "multiples of 16 px" in text and "--model" in text
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert not (tmp_path / "r" / "lorakit.safetensors").exists()


def test_a_set_prepared_at_another_resolution_is_refused_naming_both(prepared, tmp_path):
    # before the fix: trained at 64 px and wrote `ss_resolution (128, 128)` into the adapter
    r = cli(
        "train", prepared / "any", *FAST, "--steps", 2, "--set", "data.resolution=128",
        "--out", tmp_path / "r", expect=2,
    )  # fmt: skip
    text = " ".join(r.output.split())
    assert "data.resolution=64" in text and "data.resolution=128" in text
    assert "--set data.resolution=64" in text
    assert not (tmp_path / "r" / "lorakit.safetensors").exists()
