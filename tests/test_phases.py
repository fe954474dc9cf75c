"""Where a run's time goes (issue #19, "phase times"): run.json and the report record data,
model, cache, scoring, steps, previews, checkpoints and export; the console prints the time to
the first step."""

from __future__ import annotations

import json

import torch
from conftest import FAST, SAMPLES, cli


def test_run_json_and_report_record_the_phases(trained_run):
    run = json.loads((trained_run / "run.json").read_text())
    phases = run["phases"]
    assert {
        "data",
        "model",
        "cache",
        "steps",
        "previews",
        "scoring",
        "export",
        "checkpoints",
    } <= set(phases), phases
    assert all(v >= 0 for v in phases.values())
    assert 0 < run["seconds_to_first_step"] < run["seconds_total"]
    assert run["seconds"] <= run["seconds_total"]  # `seconds`: from the first step on
    # timed pieces do not overlap, so together they fit in the run's wall time
    assert sum(phases.values()) <= run["seconds_total"] + 0.1
    assert "to the first step" in (trained_run / "report.html").read_text(encoding="utf-8")


def test_the_console_says_when_the_first_step_is_done(tmp_path):
    r = cli("train", SAMPLES, *FAST, "--out", tmp_path / "run", "--steps", 1)
    text = " ".join(r.output.split())
    assert "first step done" in text and "s into the run (data" in text, text


def test_the_baseline_score_is_computed_once_per_content(tmp_path, monkeypatch):
    """Issue #19 "fixed cost": the step-0 held-out score is a pure function of the base model,
    the data and the eval settings; a second run over the same data reads it back."""
    import lorakit.evaluate as evaluate

    calls = []
    real = evaluate.heldout_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "heldout_loss", counting)
    cache = tmp_path / "cache"
    args = [*FAST, "--steps", 2, "--set", f"data.cache_dir='{cache}'"]
    cli("train", SAMPLES, *args, "--out", tmp_path / "a")
    assert len(calls) == 2  # the baseline and the final adapter
    cli("train", SAMPLES, *args, "--out", tmp_path / "b")
    assert len(calls) == 3, "the second run scored the base model again"
    base = [json.loads(p.read_text()) for p in (cache / "scores").glob("*.json")]
    assert len(base) == 1
    # another eval seed is another baseline
    cli("train", SAMPLES, *args, "--out", tmp_path / "c", "--set", "eval.seed=7")
    assert len(calls) == 5 and len(list((cache / "scores").glob("*.json"))) == 2


def test_the_cli_imports_no_heavy_library_until_a_command_needs_it():
    """`lorakit --help` stays fast (issue #19: imports stay lazy): importing the CLI module loads
    none of torch, diffusers, transformers, peft, accelerate, safetensors or numpy."""
    import subprocess
    import sys

    code = (
        "import sys, lorakit.cli; print(','.join(m for m in ('torch', 'diffusers', "
        "'transformers', 'peft', 'accelerate', 'safetensors', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"


def test_nested_phases_are_counted_once():
    import time

    from lorakit.progress import Phases

    p = Phases()
    with p("checkpoints"):
        time.sleep(0.05)
        with p("scoring"):
            time.sleep(0.1)
    assert 0.09 < p.seconds["scoring"] < 0.2
    assert 0.04 < p.seconds["checkpoints"] < 0.09  # its own time, not the score's


def test_a_run_without_previews_frees_the_encoders_after_caching(tmp_path):
    """Issue #19 "resident memory": once latents and captions are cached, a run that renders no
    preview never calls the VAE or the text encoders again, so they leave host memory (meta
    tensors); with previews the VAE and encoders stay. The adapter is the same either way."""
    from lorakit import config as cfg
    from lorakit.train import train

    def run(out, *sets):
        sets = ["train.steps=2", "train.save_every=0", f"train.out='{out}'", *sets]
        return train(cfg.resolve(preset="tiny-cpu", sets=sets), SAMPLES)

    plain = run(tmp_path / "a", "sample.every=0")
    frozen = plain.family.frozen_modules(plain.components)
    assert frozen and all(p.is_meta for m in frozen.values() for p in m.parameters())
    shown = run(tmp_path / "b", "sample.every=2", "sample.steps=1")
    frozen = shown.family.frozen_modules(shown.components)
    assert not any(p.is_meta for m in frozen.values() for p in m.parameters())
    from safetensors.torch import load_file

    a, b = (load_file(str(r.adapters["kohya"])) for r in (plain, shown))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
