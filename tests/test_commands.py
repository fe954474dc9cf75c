"""sample, export, presets, tiny-model, --version, --help."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, cli
from PIL import Image

from lorakit.export import read_adapter


def test_version():
    from lorakit import __version__

    assert cli("--version").output.strip() == f"lorakit {__version__}"


@pytest.mark.parametrize(
    "cmd", [["train"], ["sample"], ["export"], ["presets", "ls"], ["presets", "show"],
            ["presets", "cp"], ["tiny-model"], ["config"]],
)  # fmt: skip
def test_every_command_has_help_with_an_example(cmd):
    out = cli(*cmd, "--help").output
    assert "Example" in out and "lorakit " in out


def test_presets_ls_show_cp(tmp_path):
    assert "tiny-cpu" in cli("presets", "ls").output
    shown = cli("presets", "show", "tiny-cpu").output
    assert 'name = "tiny:sd15"' in shown
    cli("presets", "cp", "tiny-cpu", tmp_path)
    assert (tmp_path / "tiny-cpu.toml").read_text() == shown
    r = cli("presets", "cp", "tiny-cpu", tmp_path / "tiny-cpu.toml", expect=1)
    assert "already exists" in r.output
    cli("presets", "cp", "tiny-cpu", tmp_path / "tiny-cpu.toml", "--force")


def test_sample_from_run_folder_and_from_file(trained_run, tmp_path):
    r = cli("sample", trained_run, "--steps", 2, "--seeds", "3,4,5", "--out", tmp_path / "g.png")
    assert "sample grid" in r.output
    grid = Image.open(tmp_path / "g.png")
    n_prompts = sum(
        1 for ln in PROMPTS.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    )
    assert grid.width > 3 * 64 and grid.height > n_prompts * 64

    diffusers_file = trained_run / "diffusers" / "pytorch_lora_weights.safetensors"
    cli("sample", diffusers_file, "--base", "tiny:sd15", "--prompts", PROMPTS, "--steps", 2,
        "--out", tmp_path / "d.png")  # fmt: skip
    kohya = trained_run / "lorakit.safetensors"
    cli("sample", kohya, "--prompts", PROMPTS, "--steps", 2, "--out", tmp_path / "k.png")
    # the two formats hold the same adapter: same pictures (below the title, which names the file)
    assert _cells(tmp_path / "d.png") == _cells(tmp_path / "k.png")
    # scale 0 is the base model: other pictures
    cli(
        "sample",
        kohya,
        "--prompts",
        PROMPTS,
        "--steps",
        2,
        "--scale",
        0,
        "--out",
        tmp_path / "z.png",
    )
    assert _cells(tmp_path / "z.png") != _cells(tmp_path / "k.png")


def _cells(path):
    img = Image.open(path)
    return img.crop((0, 40, img.width, img.height)).tobytes()


def test_export_converts_exactly(trained_run, tmp_path):
    cli("export", trained_run, "--format", "all", "--out", tmp_path)
    original, _ = read_adapter(trained_run / "lorakit.safetensors")
    converted = {
        "kohya": tmp_path / "lorakit.safetensors",
        "diffusers": tmp_path / "diffusers" / "pytorch_lora_weights.safetensors",
    }
    for fmt, path in converted.items():
        again, got = read_adapter(path)
        assert got == fmt and again.modules.keys() == original.modules.keys()
        for k, w in original.modules.items():
            assert torch.equal(w.down, again.modules[k].down)
            assert torch.equal(w.up, again.modules[k].up)
            assert w.alpha == again.modules[k].alpha
    # diffusers → kohya gives back the trained kohya tensors bit for bit
    cli("export", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors",
        "--format", "kohya", "--out", tmp_path / "back.safetensors")  # fmt: skip
    from safetensors.torch import load_file

    a, b = load_file(trained_run / "lorakit.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_unknown_and_foreign_files(trained_run, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_not_a_module.lora_up.weight": torch.zeros(2, 2)}, bad)  # fmt: skip
    r = cli("export", bad, "--format", "diffusers", "--out", tmp_path / "x", expect=1)
    assert "lora_unet_not_a_module" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = cli("export", trained_run, "--format", "onnx", expect=1)
    assert "onnx" in r.output
    pt = tmp_path / "a.ckpt"
    pt.write_bytes(b"not really")
    r = cli("export", pt, "--format", "kohya", expect=1)
    assert "safetensors" in r.output
    r = cli(
        "export",
        trained_run / "lorakit.safetensors",
        "--out",
        trained_run / "lorakit.safetensors",
        expect=1,
    )
    assert "Refusing to overwrite" in r.output


def test_tiny_model_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("mine")
    r = cli("tiny-model", "sd15", tmp_path, expect=1)
    assert "not empty" in r.output
    assert (tmp_path / "x").read_text() == "mine"
