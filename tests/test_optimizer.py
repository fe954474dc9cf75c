"""8-bit AdamW from bitsandbytes, exercised for real where it runs on this CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, SAMPLES, cli

from lorakit import optim
from lorakit.config import TrainConfig

PROBLEM = optim.bnb_8bit_problem("cpu")


@pytest.mark.skipif(
    PROBLEM is not None, reason=f"bitsandbytes 8-bit AdamW cannot run here: {PROBLEM}"
)
def test_adamw8bit_keeps_8bit_state_and_trains(tmp_path):
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = optim.build_optimizer(
        [p], TrainConfig(optimizer="adamw8bit", lr=1e-2), torch.device("cpu")
    )
    assert isinstance(opt, bnb.optim.AdamW8bit)
    before = p.detach().clone()
    (p**2).sum().backward()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert (p.detach() - before).abs().max() > 1e-3
    # and through the CLI: a run with the 8-bit optimizer and no fallback allowed
    out = tmp_path / "r"
    cli("train", SAMPLES, *FAST, "--out", out, "--steps", 3, "--set", "train.optimizer='adamw8bit'",
        "--set", "train.optimizer_fallback=false")  # fmt: skip
    assert (out / "lorakit.safetensors").is_file()
    from safetensors.torch import load_file

    ups = [
        v for k, v in load_file(out / "lorakit.safetensors").items() if k.endswith("lora_up.weight")
    ]
    assert any(u.abs().max() > 0 for u in ups), (
        "lora_up starts at zero; the 8-bit optimizer moved it"
    )


def test_unusable_8bit_optimizer_stops_unless_fallback_allowed(monkeypatch, tmp_path):
    # Simulate a machine where the bitsandbytes self-test fails.
    monkeypatch.setitem(optim._BNB_PROBLEM, "cpu", "RuntimeError: no kernel for this CPU")
    args = [*FAST, "--out", tmp_path / "a", "--steps", 1, "--set", "train.optimizer='adamw8bit'"]
    r = cli("train", SAMPLES, *args, "--set", "train.optimizer_fallback=false", expect=1)
    assert (
        "adamw8bit" in r.output and "optimizer_fallback" in r.output and "Traceback" not in r.output
    )
    r = cli("train", SAMPLES, *args, "--set", "train.optimizer_fallback=true")
    assert "using torch AdamW" in r.output
