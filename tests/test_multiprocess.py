"""`lorakit train --num-processes 2` on the CPU (accelerate, gloo backend): same adapter as one
process at the same global batch, disjoint data shards, rank-0-only writes, kill and resume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import FAST, SAMPLES, assert_resumed, cli, finish, kill_and_resume, launch_train
from safetensors.torch import load_file

from lorakit import checkpoint as ckpt

ARGS = [*FAST, "--steps", 10, "--set", "train.save_every=4", "--set", "train.keep_last=0"]


def _launch(out: Path, extra_env: dict, *args) -> subprocess.Popen:
    return launch_train(SAMPLES, *ARGS, "--out", out, "--set", "train.batch_size=1",
                        "--num-processes", "2", *args, env=extra_env)  # fmt: skip


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp")
    (base / "trace").mkdir()
    proc = _launch(base / "run", {"LORAKIT_TRACE_BATCHES": str(base / "trace"),
                                  "LORAKIT_TRACE_WRITES": str(base / "writes.txt")})  # fmt: skip
    text = finish(proc)
    assert proc.returncode == 0, text
    return base, text


def test_two_processes_match_one_process_at_the_same_global_batch(two_proc, tmp_path):
    base, text = two_proc
    assert "2 (1 per device × 2 processes × 1 accumulation)" in " ".join(text.split())
    single = tmp_path / "single"
    cli("train", SAMPLES, *ARGS, "--out", single, "--set", "train.batch_size=2")
    a = load_file(base / "run" / "lorakit.safetensors")
    b = load_file(single / "lorakit.safetensors")
    assert a.keys() == b.keys()
    # Not bit-exact: DDP averages the two ranks' gradients (all-reduce sum / 2) while one process
    # averages inside one loss, so float rounding differs by a few ulps per step.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    moved = max(a[k].abs().max().item() for k in a if k.endswith("lora_up.weight"))
    assert moved > 1e-3, "the adapter trained"


def test_ranks_see_disjoint_shards_covering_the_epoch(two_proc):
    from lorakit import config as cfg
    from lorakit.data.training import epoch_batches, load_training_set

    base, _ = two_proc
    c = cfg.resolve(preset="tiny-cpu")
    records = load_training_set(SAMPLES, c.data, 1).records
    epoch0 = epoch_batches(records, 2, c.train.seed, 0)  # global batches of 1 × 2 ranks
    per_rank = {}
    for rank in (0, 1):
        lines = [ln.split() for ln in (base / "trace" / f"rank{rank}.txt").read_text().splitlines()]
        per_rank[rank] = {int(ln[0]): [int(x) for x in ln[1:]] for ln in lines}
    seen = []
    for step in range(1, len(epoch0) + 1):
        a, b = per_rank[0][step], per_rank[1][step]
        assert a + b == epoch0[step - 1], "rank r trains on slice r of the global batch"
        assert records[a[0]].bucket == records[b[0]].bucket, "one bucket per global batch"
        seen += a + b
    assert sorted(seen) == sorted(i for batch in epoch0 for i in batch)
    assert len(seen) == len(set(seen)), "no rank duplicates a sample in an epoch"


def test_only_rank_zero_writes(two_proc):
    base, _ = two_proc
    writes = (base / "writes.txt").read_text().split("\n")
    writes = [w for w in writes if w]
    assert writes and all(w.startswith("0 ") for w in writes), writes[:5]
    paths = [w.split(" ", 1)[1] for w in writes]
    assert len(paths) == len(set(paths)), "every file is written once"
    run = base / "run"
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [4, 8, 10]
    assert len(list((run / "samples").glob("*.png"))) == 0  # FAST has sample.every = 0
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow  # the default run stops and resumes two processes by a signal (test below)
def test_kill_and_resume_two_processes(two_proc, tmp_path):
    base, _ = two_proc
    out = tmp_path / "run"
    kill_and_resume(lambda *extra: _launch(out, {}, *extra), out, 4, 10)
    a = load_file(base / "run" / "lorakit.safetensors")
    b = load_file(out / "lorakit.safetensors")
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def _traced_steps(trace: Path, rank: int) -> list[int]:
    return [int(line.split()[0]) for line in (trace / f"rank{rank}.txt").read_text().splitlines()]


@pytest.mark.slow  # two processes and a signal, ~30 s; the one-process stop is in the default
def test_a_stop_signal_to_one_rank_stops_both_at_the_same_step_then_resumes_exactly(
    two_proc, tmp_path
):
    """SIGTERM reaches rank 1 only, during step 3: the ranks all-reduce the request, so both
    checkpoint and stop after step 3 (a rank that stopped alone would leave the other in an
    all-reduce); `--resume latest` then ends with the uninterrupted run's adapter, bit for bit."""
    base, _ = two_proc
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    proc = _launch(out, {"LORAKIT_FAULT": "signal-rank1@3", "LORAKIT_TRACE_BATCHES": str(trace)})
    text = finish(proc)
    assert proc.returncode != 0, text
    assert _traced_steps(trace, 0)[-1] == _traced_steps(trace, 1)[-1] == 3, text
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [3], text
    assert "--resume latest" in " ".join(text.split()), text
    assert not (out / "lorakit.safetensors").exists()
    resumed = _launch(out, {}, "--resume", "latest")
    text = finish(resumed)
    assert resumed.returncode == 0, text
    assert_resumed(text, out, 3, 10)
    a = load_file(base / "run" / "lorakit.safetensors")
    b = load_file(out / "lorakit.safetensors")
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_consensus_on_cuda_reads_each_step_one_step_late():
    """The CUDA path (no host wait in the loop) forced on the CPU: stop requests and non-finite
    losses surface one micro-step late, the last one at `flush`; the eager path at once."""
    import torch

    from lorakit.distributed import Consensus

    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    late = Consensus(lambda t, op: t, torch.device("cpu"), lagged=True)
    assert late.check(0, ok, 1) == (0, 0)
    assert late.check(15, ok, 2) == (0, 0)
    assert late.check(0, nan, 3) == (15, 0)  # step 2's stop request
    assert late.check(0, ok, 4) == (0, 3)  # step 3's non-finite loss
    assert late.check(0, torch.tensor(float("inf")), 5) == (0, 0)
    assert late.flush() == (0, 5) and late.flush() == (0, 0)
    eager = Consensus(lambda t, op: t, torch.device("cpu"))
    assert not eager.lagged
    assert eager.check(2, nan, 7) == (2, 7) and eager.check(0, ok, 8) == (0, 0)
