"""FSDP2 (presets/accelerate/fsdp.yaml) and DeepSpeed through `lorakit train --accelerate-config`
on the CPU with the gloo backend and 2 processes.

accelerate ignores FSDP on a CPU; lorakit turns it on itself (distributed.cpu_fsdp) so the sharded
code paths (gathered adapter export, gathered checkpoints, re-sharded resume, sampling on every
rank) run here exactly as they would on GPUs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, SAMPLES, cli, kill_and_resume, launch_train
from safetensors.torch import load_file

from lorakit import checkpoint as ckpt

ARGS = [*FAST, "--steps", 8, "--set", "train.save_every=4", "--set", "train.keep_last=0"]


def _cpu_config(tmp: Path, name: str, nested: dict | None = None) -> Path:
    """The shipped accelerate config, adapted to this CPU-only machine; `nested` updates a
    section, e.g. {"fsdp_config": {"fsdp_version": 1}}."""
    doc = yaml.safe_load((ROOT / "presets" / "accelerate" / name).read_text())
    doc.update(use_cpu=True, mixed_precision="no")
    for section, values in (nested or {}).items():
        doc[section].update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _launch(out: Path, config: Path, extra_env: dict, *args) -> subprocess.Popen:
    return launch_train(SAMPLES, *ARGS, "--out", out, "--set", "train.batch_size=1",
                        "--accelerate-config", config, "--num-processes", "2", *args,
                        env=extra_env)  # fmt: skip


def _matches_one_process(run: Path, tmp_path: Path) -> Path:
    """The 2-process adapter in `run` equals a 1-process run at the same global batch (whole
    tensors, not one rank's shard); returns the 1-process run's folder."""
    single = tmp_path / "single"
    cli("train", SAMPLES, *ARGS, "--out", single, "--set", "train.batch_size=2")
    a = load_file(run / "lorakit.safetensors")
    b = load_file(single / "lorakit.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a), "whole tensors, not one rank's shard"
    # Not bit-exact: FSDP and ZeRO-2 reduce-scatter the two ranks' gradients (sum, then / 2)
    # while one process averages inside one loss, so float rounding differs by a few ulps per
    # step (measured 1e-7 to 2e-7 after 8 steps).
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    moved = max(a[k].abs().max().item() for k in a if k.endswith("lora_up.weight"))
    assert moved > 1e-3, "the adapter trained"
    return single


def _rank_zero_wrote_each_file_once(base: Path) -> None:
    writes = [w for w in (base / "writes.txt").read_text().split("\n") if w]
    assert writes and all(w.startswith("0 ") for w in writes), writes[:5]
    paths = [w.split(" ", 1)[1] for w in writes]
    assert len(paths) == len(set(paths)), "every file is written once"
    assert [s for s, _ in ckpt.complete_checkpoints(base / "run")] == [4, 8]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    config = _cpu_config(base, "fsdp.yaml")
    proc = _launch(base / "run", config, {"LORAKIT_TRACE_WRITES": str(base / "writes.txt")},
                   "--set", "sample.every=6")  # fmt: skip
    text, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, text
    return base, config, " ".join(text.split())


@pytest.mark.slow  # ~130 s for the three on 2 cores
def test_fsdp_two_processes_match_one_process(fsdp_run, tmp_path):
    base, _, text = fsdp_run
    assert "FSDP2: the denoiser's weights" in text, "the run really was sharded"
    assert "2 (1 per device × 2 processes × 1 accumulation)" in text
    single = _matches_one_process(base / "run", tmp_path)
    # the checkpoint holds the whole LoRA and whole optimizer state, not rank 0's shards
    state = ckpt.load_state(ckpt.step_dir(base / "run", 4))
    one = ckpt.load_state(ckpt.step_dir(single, 4))
    assert [p.shape for p in state.params] == [p.shape for p in one.params]
    for i, st in one.optimizer["state"].items():
        assert state.optimizer["state"][i]["exp_avg"].shape == st["exp_avg"].shape


@pytest.mark.slow  # ~130 s for the three on 2 cores
def test_fsdp_only_rank_zero_writes(fsdp_run):
    base, _, _ = fsdp_run
    _rank_zero_wrote_each_file_once(base)
    run = base / "run"
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step-000000.png", "step-000006.png", "step-000008.png"]
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow  # ~130 s for the three on 2 cores
def test_fsdp_kill_and_resume(fsdp_run, tmp_path):
    base, config, _ = fsdp_run
    out = tmp_path / "run"
    kill_and_resume(lambda *extra: _launch(out, config, {}, "--set", "sample.every=6", *extra),
                    out, 4, 8)  # fmt: skip
    a = load_file(base / "run" / "lorakit.safetensors")
    b = load_file(out / "lorakit.safetensors")
    # Resume re-shards the saved whole tensors; the optimizer state round-trips exactly.
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_fsdp_refuses_unsupported_settings_before_launching(tmp_path):
    config = _cpu_config(tmp_path, "fsdp.yaml")
    r = cli("train", SAMPLES, *ARGS, "--out", tmp_path / "run", "--accelerate-config", config,
            "--set", "train.optimizer='adamw8bit'", "--set", "lora.train_text_encoder=true",
            "--num-processes", 2, expect=None)  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "launching" not in text
    assert "train.optimizer = 'adamw8bit'" in text and "lora.train_text_encoder" in text
    assert "Traceback" not in text and not (tmp_path / "run").exists()


def test_fsdp_version_1_is_refused(tmp_path):
    config = _cpu_config(tmp_path, "fsdp.yaml", {"fsdp_config": {"fsdp_version": 1}})
    r = cli("train", SAMPLES, *ARGS, "--out", tmp_path / "run", "--accelerate-config", config,
            expect=None)  # fmt: skip
    assert r.exit_code != 0 and "fsdp_version: 2" in " ".join(r.output.split()), r.output


@pytest.mark.slow  # 2 processes, ~25 s; the FSDP config checks stay in the default
def test_fsdp_short_run_matches_one_process(tmp_path):
    """Default-run smoke test of the sharded path: 2 steps, final export gathered from shards."""
    config = _cpu_config(tmp_path, "fsdp.yaml")
    args = ["--steps", 2, "--set", "train.save_every=0"]
    proc = _launch(tmp_path / "run", config, {}, *args)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "FSDP2: the denoiser's weights" in " ".join(text.split())
    cli("train", SAMPLES, *ARGS, *args, "--out", tmp_path / "one", "--set", "train.batch_size=2")
    a = load_file(tmp_path / "run" / "lorakit.safetensors")
    b = load_file(tmp_path / "one" / "lorakit.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_deepspeed_refuses_zero3_and_mismatched_accumulation(tmp_path):
    config = _cpu_config(tmp_path, "deepspeed-zero2.yaml", {"deepspeed_config": {"zero_stage": 3}})
    r = cli("train", SAMPLES, *ARGS, "--out", tmp_path / "run", "--accelerate-config", config,
            "--set", "train.grad_accum=2", expect=None)  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code != 0 and "launching" not in text, text
    assert "zero_stage = 3" in text and "gradient_accumulation_steps = 1" in text
    assert "Traceback" not in text and not (tmp_path / "run").exists()


# DeepSpeed ZeRO-2 for real on the CPU (lorakit names gloo; see distributed.device_kwargs). The
# default CI has no deepspeed; run these with a Python that has it (DS_BUILD_OPS=0 pip install
# deepspeed).


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("zero2")
    config = _cpu_config(base, "deepspeed-zero2.yaml")
    proc = _launch(base / "run", config, {"LORAKIT_TRACE_WRITES": str(base / "writes.txt")})
    text, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, text
    return base, config, " ".join(text.split())


def test_deepspeed_zero2_two_processes_match_one_process(zero2_run, tmp_path):
    base, _, text = zero2_run
    assert "DeepSpeed ZeRO-2 on the CPU (gloo)" in text, "the run really was DeepSpeed"
    assert "partitioned over 2 processes" in text
    assert "2 (1 per device × 2 processes × 1 accumulation)" in text
    single = _matches_one_process(base / "run", tmp_path)
    # The checkpoint holds the whole optimizer state gathered from both ranks' ZeRO partitions,
    # in the layout of a plain torch AdamW state_dict: the same values as the 1-process run's.
    state = ckpt.load_state(ckpt.step_dir(base / "run", 4))
    one = ckpt.load_state(ckpt.step_dir(single, 4))
    assert state.optimizer["state"].keys() == one.optimizer["state"].keys()
    for i, st in one.optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state.optimizer["state"][i][key].shape == st[key].shape
            assert (state.optimizer["state"][i][key] - st[key]).abs().max() < 1e-6
        assert float(state.optimizer["state"][i]["step"]) == float(st["step"]) == 4


def test_deepspeed_zero2_only_rank_zero_writes(zero2_run):
    base, _, _ = zero2_run
    _rank_zero_wrote_each_file_once(base)


def test_deepspeed_zero2_kill_and_resume(zero2_run, tmp_path):
    base, config, _ = zero2_run
    out = tmp_path / "run"
    kill_and_resume(lambda *extra: _launch(out, config, {}, *extra), out, 4, 8)
    a = load_file(base / "run" / "lorakit.safetensors")
    b = load_file(out / "lorakit.safetensors")
    # Each rank re-slices its ZeRO partition of the saved whole state and refreshes its fp32
    # master copy from the restored LoRA: the resumed run continues bit for bit.
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
