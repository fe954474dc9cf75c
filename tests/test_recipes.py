"""Recipes (`--recipe style|product`, `presets/recipes/*.toml`): config layers for a kind of
brand LoRA that combine with any family preset, each key explained in its file; what they need
from the user refused in one paragraph; one run through each on the tiny model."""

from __future__ import annotations

import re

import pytest
import tomllib
from conftest import FAST, SAMPLES, cli
from PIL import Image

from lorakit import config as cfg
from lorakit.errors import ConfigError

RECIPES = sorted(cfg.list_recipes())
PRESETS = sorted(cfg.list_presets())
NEEDS = {"data.trigger": "data.trigger='sks mug'", "data.reg_folder": "data.reg_folder='reg'"}


def _layer(name: str) -> dict:
    layer, _ = cfg.recipe_layer(name)
    return {f"{s}.{k}": v for s, keys in layer.items() if isinstance(keys, dict)
            for k, v in keys.items()}  # fmt: skip


def test_the_issue_s_recipes_ship_and_presets_ls_lists_them():
    assert RECIPES == ["product", "style"]
    text = " ".join(cli("presets", "ls").output.split())
    assert "recipes (--recipe NAME" in text and "style" in text and "product" in text
    assert "timestep_bias" in cli("presets", "show", "style").output


@pytest.mark.parametrize("name", RECIPES)
def test_every_key_a_recipe_sets_is_explained_and_documented(name):
    """A comment right above every key it sets (the file explains itself), a description, a
    header with the command, and only keys `lorakit config --keys` documents."""
    path = cfg.list_recipes()[name]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(f'# Recipe "{name}"') and any("lorakit train" in x for x in lines)
    assert tomllib.loads(path.read_text(encoding="utf-8"))["description"]
    section = ""
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m[1]
        elif section not in ("", "requires") and re.match(r"\w+ = ", line):
            assert lines[i - 1].startswith("#"), f"{name}: {section}.{line} has no comment"
    assert set(_layer(name)) <= set(cfg.field_docs()), name


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("preset", PRESETS)
def test_a_recipe_layers_on_any_preset_and_flags_still_win(name, preset):
    _, requires = cfg.recipe_layer(name)
    sets = [NEEDS[k] for k in requires]
    base = cfg.resolve(preset=preset, sets=sets).to_dict()
    c = cfg.resolve(preset=preset, recipe=name, sets=sets).to_dict()
    layer = _layer(name)
    for dotted, value in layer.items():
        section, key = dotted.split(".")
        assert c[section][key] == value, (preset, dotted)
    for section, keys in base.items():  # everything else is the preset's
        for key, value in keys.items():
            if f"{section}.{key}" not in layer:
                assert c[section][key] == value, (preset, f"{section}.{key}")
    dotted = next(iter(layer))
    section, key = dotted.split(".")
    other = cfg.resolve(preset=preset, recipe=name, sets=[*sets, f"{dotted}={_other(layer)}"])
    assert getattr(getattr(other, section), key) != layer[dotted]


def _other(layer: dict) -> str:
    value = next(iter(layer.values()))
    if isinstance(value, str):
        return {"style": "'content'", "heldout": "'fidelity'"}[value]
    return "0.5" if isinstance(value, float) else "false"


def test_what_a_recipe_needs_from_the_user_is_one_paragraph():
    with pytest.raises(ConfigError) as e:
        cfg.resolve(preset="tiny-cpu", recipe="product", sets=["data.trigger=''"])
    msg = str(e.value)
    assert "\n" not in msg and "--recipe product" in msg
    assert "data.trigger" in msg and "data.reg_folder" in msg and "lorakit class-images" in msg
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--recipe", "product", expect=2)
    assert "data.reg_folder" in r.output and "Traceback" not in r.output
    r = cli("config", "--recipe", "stlye", expect=2)
    assert "Did you mean 'style'" in r.output


def test_style_recipe_run_recommends_by_fidelity(tmp_path):
    out = tmp_path / "run"
    cli("train", SAMPLES, *FAST, "--recipe", "style", "--out", out, "--steps", 2,
        "--set", "train.save_every=1", "--set", "sample.every=1")  # fmt: skip
    c = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert c["eval"]["pick"] == "fidelity" and c["train"]["timestep_bias"] == "style"
    html = (out / "report.html").read_text(encoding="utf-8")
    why = html.split("id='why'>")[1].split("</span>")[0]
    assert "decided" in why and ("palette" in why or "Lab EMD" in why or "texture" in why)


def test_product_recipe_run_with_masks_and_class_images(tmp_path):
    data = tmp_path / "shots"
    data.mkdir()
    for i in range(4):  # a product on a transparent background: the alpha is the mask
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        im.paste((200, 40 * i, 90, 255), (16, 16, 48, 48))
        im.save(data / f"mug{i}.png")
        (data / f"mug{i}.txt").write_text("a photo of a mug, studio light")
    reg = tmp_path / "reg"
    cli("class-images", reg, "--prompt", "a photo of a mug", "--count", 4, "--preset",
        "tiny-cpu", "--set", "sample.steps=2")  # fmt: skip
    out = tmp_path / "run"
    cli("train", data, *FAST, "--recipe", "product", "--trigger", "sks mug", "--out", out,
        "--steps", 2, "--set", f"data.reg_folder='{reg}'")  # fmt: skip
    c = tomllib.loads((out / "config.toml").read_text(encoding="utf-8"))
    assert c["train"]["masked_loss"] and c["train"]["prior_weight"] == 1.0
    assert (out / "lorakit.safetensors").is_file()
