"""The main path at real LoRA sizes: train → checkpoint → kill → resume bit-identically → export,
for every `train.optimizer`.

The tiny model's LoRA at its usual rank 4 stays below every library threshold that changes how
optimizer state looks, so a test at that size can pass while every real run fails (issue #17:
8-bit AdamW crashed at the first checkpoint of any real run). Rank 127 on the tiny model gives
down/up tensors of 127 × 64 = 8128 and 127 × 32 = 4064 elements, which crosses them:

- bitsandbytes (adamw8bit, paged_adamw8bit, lion8bit): `min_8bit_size` = 4096 — a tensor of at
  least 4096 elements gets uint8 `state1`/`state2` with `absmax` per block of 256 and the
  optimizer-wide `qmap1`/`qmap2` tensors, one object shared by every such parameter; below it
  the state is fp32. 8128 = 31.75 blocks, so the last absmax block is partial; the 4064-element
  tensors keep fp32 state in the same state dict. (Paging starts at 1e5 elements and only on
  CUDA; on a CPU paged_adamw8bit runs as adamw8bit.)
- transformers' Adafactor factors the second moment of every ≥ 2-D tensor into row and column
  vectors (no minimum dimension; implementations that have one, e.g. 128 in big_vision/timm,
  are crossed too: every LoRA tensor here has a side ≥ 127).
- Prodigy: `slice_p` (default 1, lorakit does not change it) is its only size-dependent
  setting; it keeps a 0-d `p0` for a parameter that is all zeros at its first step (every
  lora_up). torch AdamW has no size-dependent behaviour.
"""

from __future__ import annotations

import math
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST, SAMPLES, assert_resumed, cli, finish, kill_and_resume, launch_train
from safetensors.torch import load_file

from lorakit import checkpoint as ckpt
from lorakit.optim import OPTIMIZERS, bnb_8bit_problem

RANK = 127
MIN_8BIT = 4096  # bitsandbytes' default min_8bit_size, which lorakit keeps
BLOCK = 256  # bitsandbytes' blockwise quantisation block
BNB = {"adamw8bit", "paged_adamw8bit", "lion8bit"}
PROBLEM = bnb_8bit_problem("cpu")
STEPS, SAVE = 6, 2
ADAPTERS = ("lorakit.safetensors", "diffusers/pytorch_lora_weights.safetensors")


def _args(optimizer: str) -> list:
    return [*FAST, "--rank", RANK, "--steps", STEPS, "--set", f"train.save_every={SAVE}",
            "--set", "train.keep_last=0", "--set", f"train.optimizer='{optimizer}'",
            "--set", "train.optimizer_fallback=false", "--set", "lora.dropout=0.1"]  # fmt: skip


def _skip_without_bnb(optimizer: str) -> None:
    if optimizer in BNB and PROBLEM is not None:
        pytest.skip(f"bitsandbytes cannot run here: {PROBLEM}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """optimizer → (run folder, {adapter file: its tensors}) of an uninterrupted run, made once."""
    runs: dict[str, tuple[Path, dict]] = {}

    def get(optimizer: str):
        if optimizer not in runs:
            out = tmp_path_factory.mktemp(f"straight-{optimizer}") / "run"
            cli("train", SAMPLES, *_args(optimizer), "--out", out)
            runs[optimizer] = out, {name: load_file(out / name) for name in ADAPTERS}
        return runs[optimizer]

    return get


def _same_adapters(reference: dict, out: Path) -> None:
    """Every tensor of both exported files equal, bit for bit."""
    for name, expected in reference.items():
        got = load_file(out / name)
        assert got.keys() == expected.keys(), name
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (name, k)


def _check_real_size_state(optimizer: str, state: ckpt.TrainState) -> None:
    """The checkpoint's optimizer state has the real-size form (so this test cannot silently
    fall below a threshold): 8-bit where bitsandbytes quantises, factored for Adafactor."""
    sizes = [p.numel() for p in state.params]
    assert {min(sizes), max(sizes)} == {RANK * 32, RANK * 64}, "LoRA tensors at the chosen rank"
    states = state.optimizer["state"]
    assert sorted(states) == list(range(len(sizes))), "every LoRA tensor has optimizer state"
    if optimizer in BNB:
        quant = [states[i]["__bnb_optimizer_quant_state__"] for i in range(len(sizes))]
        big = [i for i, n in enumerate(sizes) if n >= MIN_8BIT]
        assert big and len(big) < len(sizes), "both 8-bit and 32-bit state in one checkpoint"
        for i, n in enumerate(sizes):
            q = quant[i]
            if n >= MIN_8BIT:
                assert q["state1"].dtype == torch.uint8 and q["state1"].numel() == n
                assert q["absmax1"].numel() == math.ceil(n / BLOCK) and n % BLOCK, "partial block"
            else:
                assert q["state1"].dtype == torch.float32 and "qmap1" not in q
        # the quantisation map every 8-bit parameter shares comes back as ONE tensor
        maps = {id(quant[i]["qmap1"]) for i in big}
        assert len(maps) == 1, "qmap1 re-linked on load"
        assert quant[big[0]]["qmap1"].dtype == torch.float32
    elif optimizer == "adafactor":
        for i, p in enumerate(state.params):
            st = states[i]
            assert "exp_avg_sq" not in st, "factored second moment"
            assert st["exp_avg_sq_row"].shape == p.shape[:1]
            assert st["exp_avg_sq_col"].shape == p.shape[1:]
    elif optimizer == "prodigy":
        assert all(states[i]["s"].numel() == n for i, n in enumerate(sizes)), "slice_p = 1"
        # p0 copies a parameter at its first step, or is a 0-d zero if it was all zeros then
        # (every lora_up): both forms are in the checkpoint
        p0 = [states[i]["p0"].numel() for i in range(len(sizes))]
        assert set(p0) == {1, RANK * 32, RANK * 64}, set(p0)
    else:
        assert all(states[i]["exp_avg"].shape == p.shape for i, p in enumerate(state.params))


def _check_straight(optimizer: str, out: Path, reference: dict) -> None:
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4, 6]
    assert not list((out / "checkpoints").glob(".*partial"))
    _check_real_size_state(optimizer, ckpt.load_state(ckpt.step_dir(out, SAVE)))
    down = [v for k, v in reference["lorakit.safetensors"].items() if k.endswith("down.weight")]
    assert down and all(v.shape[0] == RANK for v in down), "exported at the trained rank"


# Default tier: the 8-bit states real size exists for (adamw8bit, lion8bit) and plain adamw; the
# rest, and the SIGKILL variant below (12 s; tests/test_resume.py stops a run by a signal in the
# default tier), are slow, to keep the default run under 8 minutes. paged_adamw8bit is adamw8bit
# on a CPU.
_IN_PROCESS = [
    o if o in ("adamw", "adamw8bit", "lion8bit") else pytest.param(o, marks=pytest.mark.slow)
    for o in OPTIMIZERS
]


@pytest.mark.parametrize("optimizer", _IN_PROCESS)
def test_real_size_checkpoint_resumes_bit_identically(optimizer, straight):
    """The first checkpoint of an uninterrupted run, resumed in this process with a fresh model
    and optimizer, ends with that run's adapters (both formats), bit for bit."""
    _skip_without_bnb(optimizer)
    out, reference = straight(optimizer)
    _check_straight(optimizer, out, reference)
    # (the reference tensors are in memory: the resumed run rewrites the same folder)
    r = cli("train", SAMPLES, *_args(optimizer), "--out", out, "--resume", ckpt.step_dir(out, SAVE))
    assert_resumed(r.output, out, SAVE, STEPS)
    _same_adapters(reference, out)


@pytest.mark.parametrize(
    "optimizer",
    [pytest.param(o, marks=pytest.mark.slow) for o in OPTIMIZERS],
)
def test_real_size_sigkill_then_resume_is_bit_identical(optimizer, straight, tmp_path):
    """A run SIGKILLed while writing its second checkpoint resumes (`--resume latest`, a new
    model and optimizer from the first checkpoint alone) to the uninterrupted run's adapters.
    adamw8bit (every GPU preset's optimizer) runs by default, the others with -m slow."""
    _skip_without_bnb(optimizer)
    done, reference = straight(optimizer)
    _check_straight(optimizer, done, reference)
    out = tmp_path / "run"
    proc = launch_train(SAMPLES, *_args(optimizer), "--out", out,
                        env={"LORAKIT_FAULT": f"kill-during-save@{2 * SAVE}"})  # fmt: skip
    text = finish(proc)
    assert proc.returncode == -signal.SIGKILL, text
    assert ckpt.partial_dir(out, 2 * SAVE).is_dir(), "killed in the middle of the write"
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [SAVE]
    assert not (out / "lorakit.safetensors").exists()
    r = cli("train", SAMPLES, *_args(optimizer), "--out", out, "--resume", "latest")
    assert_resumed(r.output, out, SAVE, STEPS)
    _same_adapters(reference, out)


def _launch_ddp(out: Path, *extra) -> subprocess.Popen:
    return launch_train(SAMPLES, *_args("adamw8bit"), "--out", out, "--set", "train.batch_size=1",
                        "--num-processes", "2", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    _skip_without_bnb("adamw8bit")
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _launch_ddp(out)
    text = finish(proc)
    assert proc.returncode == 0, text
    return out, text


@pytest.mark.slow  # one 2-process launch, ~21 s on 2 cores
def test_real_size_ddp_writes_8bit_checkpoints(ddp_run):
    """2 processes (gloo), adamw8bit at real size: every checkpoint is written, holds the whole
    8-bit state, and the adapters are exported."""
    out, text = ddp_run
    assert "2 (1 per device × 2 processes × 1 accumulation)" in " ".join(text.split())
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 4, 6]
    assert not list((out / "checkpoints").glob(".*partial"))
    for step, folder in ckpt.complete_checkpoints(out):
        state = ckpt.load_state(folder)
        assert state.step == step
        _check_real_size_state("adamw8bit", state)
    assert all((out / name).is_file() for name in ADAPTERS)


@pytest.mark.slow  # two more 2-process launches, ~35 s on 2 cores
def test_real_size_ddp_kill_and_resume(ddp_run, tmp_path):
    reference = {name: load_file(ddp_run[0] / name) for name in ADAPTERS}
    out = tmp_path / "run"
    kill_and_resume(lambda *extra: _launch_ddp(out, *extra), out, SAVE, STEPS)
    _same_adapters(reference, out)


@pytest.mark.slow  # three 2-process launches; needs `deepspeed` (not in the default CI)
def test_real_size_deepspeed_zero2_kill_and_resume(tmp_path):
    """ZeRO-2 (torch AdamW: lorakit refuses the other optimizers under DeepSpeed before launching)
    at real size: the ZeRO partitions of the flat LoRA buffer are gathered into the checkpoint and
    re-sliced on resume, bit-identically."""
    pytest.importorskip("deepspeed")
    from test_sharded import _cpu_config

    config = _cpu_config(tmp_path, "deepspeed-zero2.yaml")

    def launch(out: Path, *extra) -> subprocess.Popen:
        zero2 = ["--accelerate-config", config, "--num-processes", "2"]
        return launch_train(SAMPLES, *_args("adamw"), "--out", out, "--set", "train.batch_size=1",
                            *zero2, *extra)  # fmt: skip

    proc = launch(tmp_path / "straight")
    text = finish(proc)
    assert proc.returncode == 0 and "DeepSpeed ZeRO-2 on the CPU" in " ".join(text.split()), text
    _check_real_size_state("adamw", ckpt.load_state(ckpt.step_dir(tmp_path / "straight", SAVE)))
    reference = {name: load_file(tmp_path / "straight" / name) for name in ADAPTERS}
    out = tmp_path / "run"
    kill_and_resume(lambda *extra: launch(out, *extra), out, SAVE, STEPS)
    _same_adapters(reference, out)
