"""Config layering and errors a user sees."""

from __future__ import annotations

import pytest
from conftest import SAMPLES, cli

from lorakit import config as cfg
from lorakit.errors import ConfigError


def _no_traceback(result):
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unknown_key_names_key_and_suggests(tmp_path):
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--set", "train.stpes=3",
            "--out", tmp_path, expect=2)  # fmt: skip
    assert "train.stpes" in r.output and "train.steps" in r.output
    assert "Valid keys in [train]" in r.output.replace("\n", " ")
    _no_traceback(r)
    assert not any(tmp_path.iterdir()), "nothing is written for a bad config"


def test_unknown_section(tmp_path):
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--set", "trian.steps=3", expect=2)
    assert "trian" in r.output and "model, data, lora, train, sample, export" in r.output
    _no_traceback(r)


def test_wrong_type_names_key_and_expected_type():
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--set", "train.steps=abc", expect=2)
    assert "train.steps" in r.output and "an integer" in r.output and "'abc'" in r.output
    _no_traceback(r)


def test_wrong_choice_lists_valid_choices():
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--set", "train.optimizer='sgd'", expect=2)
    assert "train.optimizer" in r.output and "'adamw8bit'" in r.output
    _no_traceback(r)


def test_bad_preset_lists_presets():
    r = cli("train", SAMPLES, "--preset", "tiny-gpu", expect=2)
    assert "tiny-gpu" in r.output and "tiny-cpu" in r.output and "sd15" in r.output
    _no_traceback(r)


def test_bad_config_file_key_names_file(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text("[lora]\nrank = 4\nranks = 8\n")
    r = cli("train", SAMPLES, "--config", f, expect=2)
    assert "lora.ranks" in r.output and "my.toml" in r.output
    _no_traceback(r)
    f.write_text("[lora\nrank = 4\n")
    r = cli("train", SAMPLES, "--config", f, expect=2)
    assert "not valid TOML" in r.output
    _no_traceback(r)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    r = cli("train", tmp_path / "nope", "--preset", "tiny-cpu", "--out", tmp_path / "o", expect=1)
    assert "does not exist" in r.output and str(tmp_path / "nope") in r.output.replace("\n", "")
    _no_traceback(r)


@pytest.mark.parametrize("name", sorted(cfg.list_presets()))
def test_every_shipped_preset_loads_and_validates(name):
    c = cfg.resolve(preset=name)
    assert c.model.name
    assert cfg.preset_description(name)
    # round trip: the saved config.toml resolves to the same tree
    assert cfg.build(cfg.check_layer(cfg.tomllib.loads(c.to_toml()), "x")) == c


def test_layer_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 11\nlr = 0.5\n[lora]\nrank = 3\n")
    c = cfg.resolve(
        preset="tiny-cpu",
        config_file=f,
        sets=["train.lr=0.25", "lora.rank=5", "model.name=org/model"],
        flags={"lora.rank": 6, "train.steps": None},
    )
    assert c.data.resolution == 64  # preset over defaults
    assert c.train.steps == 11  # file over preset; a flag that was not given changes nothing
    assert c.train.lr == 0.25  # --set over file
    assert c.lora.rank == 6  # named flag over --set
    assert c.model.name == "org/model"  # bare text accepted for strings
    assert c.train.batch_size == 2  # preset value kept


def test_config_file_may_name_its_preset(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "tiny-cpu"\n[train]\nsteps = 9\n')
    c = cfg.resolve(config_file=f)
    assert c.model.name == "tiny:sd15" and c.train.steps == 9


def test_range_checks():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        cfg.resolve(preset="tiny-cpu", sets=["train.steps=0"])
    with pytest.raises(ConfigError, match=r"data\.resolution"):
        cfg.resolve(preset="tiny-cpu", sets=["data.resolution=66"])
    with pytest.raises(ConfigError, match=r"export\.formats"):
        cfg.resolve(preset="tiny-cpu", sets=["export.formats=['onnx']"])


def test_documented_keys_exist_with_their_names():
    keys = set(cfg.field_docs())
    required = {
        "model.name", "data.resolution", "train.batch_size", "train.steps", "train.lr",
        "train.seed", "train.gradient_checkpointing", "train.optimizer", "train.save_every",
        "lora.rank", "lora.alpha", "sample.every", "sample.prompts",
    }  # fmt: skip
    assert required <= keys
    assert keys == {f"{s}.{k}" for s in cfg.SECTIONS for k in cfg.section_hints(s)}, (
        "every key documented"
    )


def test_config_command_prints_resolved_toml():
    r = cli("config", "--preset", "tiny-cpu", "--set", "train.steps=5")
    parsed = cfg.tomllib.loads(r.output)
    assert parsed["train"]["steps"] == 5 and parsed["model"]["name"] == "tiny:sd15"
    r = cli("config", "--keys")
    assert "train.save_every" in r.output and "(0 = only the final adapter" in r.output


def test_model_family_is_checked_against_the_registry():
    from lorakit.models import FAMILIES

    for name in ("auto", *FAMILIES):
        assert cfg.resolve(sets=[f"model.family='{name}'"]).model.family == name
    with pytest.raises(ConfigError) as e:
        cfg.resolve(sets=["model.family='sd4'"])
    msg = str(e.value)
    assert "model.family" in msg and "'sd4'" in msg and "--set model.family=" in msg
    assert all(name in msg for name in FAMILIES)
