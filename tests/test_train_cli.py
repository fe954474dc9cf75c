"""The README's main job through the real CLI: files, keys, metadata."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from lorakit.config import tomllib
from lorakit.export.kohya import key_table
from lorakit.fileio import tensor_data_sha256
from lorakit.models import FAMILIES


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_train_writes_adapters_config_and_grids(trained_run):
    out = trained_run
    assert (out / "lorakit.safetensors").is_file()
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    grids = sorted((out / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000003.png", "step-000006.png"]
    ckpt = out / "checkpoints" / "step-000003"
    assert (ckpt / "lorakit.safetensors").is_file()
    assert (ckpt / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["model"]["name"] == "tiny:sd15"
    assert cfg["train"]["steps"] == 6 and cfg["train"]["lr"] == 5e-3
    assert cfg["lora"] == {**cfg["lora"], "rank": 4, "alpha": 8.0}
    run = json.loads((out / "run.json").read_text())
    assert set(run["adapters"]) == {"kohya", "diffusers"}
    assert not list(out.rglob("*.tmp")), "temp files left behind"


def test_intermediate_checkpoint_differs_from_final(trained_run):
    a, _ = _read(trained_run / "checkpoints" / "step-000003" / "lorakit.safetensors")
    b, _ = _read(trained_run / "lorakit.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))


def test_kohya_file_keys_alpha_and_metadata(trained_run):
    tensors, meta = _read(trained_run / "lorakit.safetensors")
    table = key_table(FAMILIES["sd15"])
    modules = {
        k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors
    }
    assert modules and modules <= set(table), "every key must name a real SD1.5 module"
    for m in modules:
        down, up = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"]
        assert m.startswith("lora_unet_")
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert float(tensors[f"{m}.alpha"]) == 8.0
    # attention projections of both attention kinds are covered by default
    assert any(m.endswith("attn1_to_q") for m in modules)
    assert any(m.endswith("attn2_to_out_0") for m in modules)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "lorakit"
    assert meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"])["brand"]["tdwl style"] == 20
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "tdwl"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["sshs_model_hash"] == tensor_data_sha256(tensors)
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def test_diffusers_file_keys_and_peft_metadata(trained_run):
    tensors, meta = _read(trained_run / "diffusers" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    peft_meta = json.loads(meta["lora_adapter_metadata"])
    assert peft_meta["unet.r"] == 4 and peft_meta["unet.lora_alpha"] == 8.0
    assert len(peft_meta["unet.target_modules"]) * 2 == len(tensors)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    kohya, _ = _read(trained_run / "lorakit.safetensors")
    assert len(kohya) == len(tensors) // 2 * 3  # down, up, alpha per module


def test_plain_progress_lines_when_not_a_tty(tmp_path):
    from conftest import FAST, SAMPLES, cli

    result = cli("train", SAMPLES, *FAST, "--out", tmp_path / "r", "--steps", 2)
    assert "step 1/2" in result.output and "step 2/2" in result.output
    assert "it/s" in result.output and "eta" in result.output
    assert "adapter (kohya)" in result.output


def test_existing_run_or_foreign_folder_is_not_overwritten(trained_run, tmp_path):
    from conftest import FAST, SAMPLES, cli

    before = (trained_run / "lorakit.safetensors").read_bytes()
    r = cli("train", SAMPLES, *FAST, "--out", trained_run, "--steps", 1, expect=2)
    assert "already holds a lorakit run" in r.output and "--overwrite" in r.output
    assert (trained_run / "lorakit.safetensors").read_bytes() == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = cli("train", SAMPLES, *FAST, "--out", mine, "--steps", 1, expect=2)
    assert "not a lorakit run" in r.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    run = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--out", run, "--steps", 2, "--set", "train.save_every=1")
    assert (run / "checkpoints" / "step-000001").is_dir()
    cli("train", SAMPLES, *FAST, "--out", run, "--steps", 1, "--overwrite")
    assert not (run / "checkpoints").exists(), "the replaced run's checkpoints are gone"
    assert (run / "lorakit.safetensors").is_file()


def test_report_html_names_the_recommended_checkpoint_and_embeds_every_grid(trained_run):
    import base64
    from html.parser import HTMLParser

    html = (trained_run / "report.html").read_text(encoding="utf-8")

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs).get("src", ""))

    parser = Collect()
    parser.feed(html)
    parser.close()
    assert "html" in parser.tags and "script" not in parser.tags, "self-contained, no JS"
    embedded = {src for src in parser.images if src.startswith("data:image/png;base64,")}
    for grid in sorted((trained_run / "samples").glob("step-*.png")):
        b64 = base64.b64encode(grid.read_bytes()).decode()
        assert f"data:image/png;base64,{b64}" in embedded, grid.name
    assert "recommended" in html.lower()
    assert "lorakit.safetensors" in html
    from lorakit.tracking import tensorboard_available

    # TensorBoard is an optional extra (`.[tensorboard]`): logs by default when it is installed,
    # none (and no error) when it is not
    assert (trained_run / "logs").is_dir() == tensorboard_available()


def test_samples_every_epoch(tmp_path):
    from conftest import FAST, SAMPLES, cli

    out = tmp_path / "r"
    r = cli("train", SAMPLES, *FAST, "--out", out, "--steps", 10, "--set", "sample.every_epochs=1")
    per_epoch = int(" ".join(r.output.split()).split(" steps per epoch")[0].rsplit(" ", 1)[1])
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert f"step-{per_epoch:06d}.png" in grids and "step-000000.png" in grids
