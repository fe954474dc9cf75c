"""Every hint names a flag that exists on the command that printed it (issue #16, item 12):
resize/merge/sample said "pass --allow-pickle" and merge/sample "--set model.allow_pickle",
and those commands had neither; with --allow-pickle, torch's "re-run with weights_only=False"
advice reached the user."""

from __future__ import annotations

import re

import torch
import typer
from conftest import FAST, SAMPLES, cli
from safetensors.torch import load_file

from lorakit.cli import app

COMMANDS = typer.main.get_command(app).commands


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))


def _options(command: str) -> set[str]:
    return {o for p in COMMANDS[command].params for o in getattr(p, "opts", [])}


def test_pickle_hints_name_flags_each_command_has(tmp_path):
    run = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--out", run, "--steps", 1)
    pt = tmp_path / "adapter.pt"
    torch.save(load_file(str(run / "lorakit.safetensors")), pt)
    calls = {
        "inspect": [pt],
        "export": [pt, "--format", "diffusers", "--out", tmp_path / "x"],
        "resize": [pt, "--rank", 2, "--out", tmp_path / "small.safetensors"],
        "merge": [pt, "--base", "tiny:sd15", "--out", tmp_path / "merged"],
        "sample": [pt, "--base", "tiny:sd15", "--steps", 1, "--seeds", 0,
                   "--out", tmp_path / "grid.png"],
    }  # fmt: skip
    for command, args in calls.items():
        r = cli(command, *args, expect=None)
        text = " ".join(r.output.split())
        assert r.exit_code != 0 and "pickle" in text, (command, text)
        hinted = _flags(text)
        assert hinted, (command, text)
        assert hinted <= _options(command), (command, hinted - _options(command))
        # and following the hint works
        r = cli(command, *args, *sorted(hinted), expect=None)
        assert r.exit_code == 0, (command, r.output)


def test_model_loader_hint_names_a_train_flag(tmp_path):
    folder = tmp_path / "model"
    cli("tiny-model", "sd15", folder)
    for f in (folder / "unet").glob("*.safetensors"):  # an old repo: the UNet only as a pickle
        torch.save(load_file(str(f)), folder / "unet" / "diffusion_pytorch_model.bin")
        f.unlink()
    args = ["train", SAMPLES, *FAST, "--model", folder, "--steps", 1]
    r = cli(*args, "--out", tmp_path / "r1", expect=None)
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "pickle" in text.lower(), text
    hinted = _flags(text)
    assert hinted and hinted <= _options("train"), (hinted, text)
    cli(*args, "--out", tmp_path / "r2", *sorted(hinted))


def test_a_pickle_holding_objects_gets_lorakits_advice_not_torchs(tmp_path):
    import fractions

    pt = tmp_path / "odd.pt"
    torch.save({"w": torch.zeros(2), "meta": fractions.Fraction(1, 3)}, pt)
    r = cli("inspect", pt, "--allow-pickle", expect=None)
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "weights_only" not in text and "holds more than tensors" in text
