"""Prompt files: kohya-style flags, comments, trigger, TOML, and errors that name the line."""

from __future__ import annotations

import pytest

from lorakit.config import SampleConfig
from lorakit.errors import LorakitError
from lorakit.sampling import (
    PromptRow,
    grid_spec,
    parse_prompt_line,
    pipeline_kwargs,
    read_prompt_rows,
    read_prompts,
)


def test_text_file_with_every_flag_comments_and_trigger(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(
        "# a comment\n"
        "\n"
        "[trigger] style, a cup --n blurry, low quality --w 512 --h 768 --d 5 --l 6.5 --s 30 "
        "--g 3.5\n"
        "   # indented comment\n"
        "a plain {trigger} bag\n",
        encoding="utf-8",
    )
    rows = read_prompt_rows(str(f), "tdwl")
    assert len(rows) == 2
    a, b = rows
    assert a.text == "tdwl style, a cup"
    assert (a.negative, a.width, a.height, a.seed) == ("blurry, low quality", 512, 768, 5)
    assert (a.cfg, a.steps, a.guidance) == (6.5, 30, 3.5)
    assert a.where.endswith("line 3")
    assert b == PromptRow("a plain tdwl bag", where=b.where)
    assert read_prompts(str(f), "tdwl") == ["tdwl style, a cup", "a plain tdwl bag"]


def test_toml_prompt_file_has_the_same_fields(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(
        '[[prompt]]\ntext = "[trigger] style, a cup"\nnegative = "blurry"\nwidth = 512\n'
        "height = 768\nseed = 5\ncfg = 6.5\nsteps = 30\nguidance = 3.5\n\n"
        '[[prompt]]\ntext = "a bag"\n',
        encoding="utf-8",
    )
    txt = tmp_path / "p.txt"
    txt.write_text(
        "[trigger] style, a cup --n blurry --w 512 --h 768 --d 5 --l 6.5 --s 30 --g 3.5\na bag\n"
    )
    strip = lambda rows: [r.__class__(**{**vars(r), "where": ""}) for r in rows]  # noqa: E731
    assert strip(read_prompt_rows(str(f), "tdwl")) == strip(read_prompt_rows(str(txt), "tdwl"))


def test_config_list_entries_take_flags_too():
    rows = read_prompt_rows(["[trigger] a --d 9", "# skipped", "b --s 4"], "tw")
    assert [(r.text, r.seed, r.steps) for r in rows] == [("tw a", 9, None), ("b", None, 4)]
    assert read_prompts([], "tw") == ["tw"]  # default prompt is the trigger word


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("a cup --x 3", "unknown flag '--x'"),
        ("a cup --w abc", "--w needs a width"),
        ("a cup --w 100", "multiple of 8"),
        ("a cup --s 0", "greater than 0"),
        ("a cup --d", "--d needs"),
        ("a cup --l high", "--l needs a CFG"),
    ],
)
def test_bad_flag_names_the_file_and_line(tmp_path, line, needle):
    f = tmp_path / "prompts.txt"
    f.write_text(f"# header\nfine prompt --d 1\n{line}\n", encoding="utf-8")
    with pytest.raises(LorakitError) as e:
        read_prompt_rows(str(f), "")
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and needle in msg, msg


def test_bad_toml_field_names_the_prompt(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[prompt]]\ntext = "a"\n[[prompt]]\ntext = "b"\nsed = 3\n')
    with pytest.raises(LorakitError, match=r"prompt #2: unknown field 'sed'"):
        read_prompt_rows(str(f), "")
    f.write_text('[[prompt]]\ntext = "a"\nwidth = "wide"\n')
    with pytest.raises(LorakitError, match=r"prompt #1: `width` needs a width"):
        read_prompt_rows(str(f), "")
    with pytest.raises(LorakitError, match="does not exist"):
        read_prompt_rows(str(tmp_path / "missing.txt"), "")


def test_prompt_text_keeps_double_dashes_inside_words():
    row = parse_prompt_line("a well--lit cafe --d 3", "x")
    assert (row.text, row.seed) == ("a well--lit cafe", 3)


def test_seed_rule_and_per_row_overrides_in_the_grid_spec():
    cfg = SampleConfig(
        prompts=["a", "b --d 100 --w 128 --s 3"], seeds=[7, 8, 9], steps=5, scales=[0.0, 1.0]
    )
    spec = grid_spec(cfg, "", 64)
    assert spec.columns() == [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    seeds = [[c.seed for c in spec.cells() if c.row == r] for r in (0, 1)]
    assert seeds[0] == [7, 7, 8, 8, 9, 9]  # config seeds
    assert seeds[1] == [100, 100, 101, 101, 102, 102]  # --d D → D + seed column
    assert spec.cell_size() == (128, 96)  # widest row; at least 96 px for labels

    class SD:
        def __call__(self, prompt, negative_prompt, num_inference_steps, guidance_scale, width,
                     height, generator): ...  # fmt: skip

    class Flux:
        def __call__(self, prompt, negative_prompt, num_inference_steps, guidance_scale,
                     true_cfg_scale, width, height, generator): ...  # fmt: skip

    row = spec.prompt_rows()[1]
    kw = pipeline_kwargs(SD(), spec, row)
    assert kw == {"prompt": "b", "negative_prompt": None, "num_inference_steps": 3,
                  "width": 128, "height": 64, "guidance_scale": 7.5}  # fmt: skip
    flux = pipeline_kwargs(Flux(), spec, PromptRow("c", cfg=4.0, guidance=2.5))
    assert (flux["guidance_scale"], flux["true_cfg_scale"]) == (2.5, 4.0)
    flux = pipeline_kwargs(Flux(), spec, PromptRow("c"))
    assert (flux["guidance_scale"], flux["true_cfg_scale"]) == (3.5, 1.0)
