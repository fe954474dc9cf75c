"""Every `train.optimizer` choice: built, stepping, and its state surviving a checkpoint exactly."""

from __future__ import annotations

import sys

import pytest
import torch

from lorakit import checkpoint as ckpt
from lorakit.config import TrainConfig
from lorakit.errors import LorakitError
from lorakit.optim import OPTIMIZERS, bnb_8bit_problem, build_optimizer

BNB = {"adamw8bit", "paged_adamw8bit", "lion8bit"}
PROBLEM = bnb_8bit_problem("cpu")
CPU = torch.device("cpu")


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # 64×128 = 8192 elements ≥ bitsandbytes' min_8bit_size (4096): real 8-bit state;
    # 4×32 stays 32-bit (tiny-model LoRA tensors) — both kinds in one state dict
    return [torch.nn.Parameter(torch.randn(64, 128, generator=g)),
            torch.nn.Parameter(torch.randn(4, 32, generator=g))]  # fmt: skip


def _steps(opt, params, n: int, start: int) -> None:
    for i in range(start, start + n):
        opt.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(1000 + i)
        loss = sum(((p - torch.randn(p.shape, generator=g)) ** 2).sum() for p in params)
        loss.backward()
        opt.step()


def _config(name: str) -> TrainConfig:
    return TrainConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2,
                       optimizer_fallback=False)  # fmt: skip


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_round_trips_through_a_checkpoint_bit_identically(name, tmp_path):
    if name in BNB and PROBLEM is not None:
        pytest.skip(f"bitsandbytes cannot run here: {PROBLEM}")
    t = _config(name)
    straight = _params(0)
    opt = build_optimizer(straight, t, CPU)
    _steps(opt, straight, 6, 0)

    first = _params(0)
    opt1 = build_optimizer(first, t, CPU)
    _steps(opt1, first, 3, 0)
    if name in BNB:
        assert opt1.state[first[0]]["state1"].dtype == torch.uint8, "8-bit state expected"
    state = ckpt.TrainState(3, 0, 0, [p.detach() for p in first], opt1.state_dict(), {}, None,
                            {}, {})  # fmt: skip
    ckpt.save_state(tmp_path, state)
    loaded = ckpt.load_state(tmp_path)

    resumed = _params(99)  # different values: everything must come from the checkpoint
    with torch.no_grad():
        for p, saved in zip(resumed, loaded.params, strict=True):
            p.copy_(saved)
    opt2 = build_optimizer(resumed, t, CPU)
    opt2.load_state_dict(loaded.optimizer)
    _steps(opt2, resumed, 3, 3)
    for a, b in zip(straight, resumed, strict=True):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes(), name
    assert not torch.equal(straight[0].detach(), _params(0)[0].detach()), "it must train"


def test_paged_adamw8bit_warns_and_runs_unpaged_on_cpu(capsys):
    if PROBLEM is not None:
        pytest.skip(f"bitsandbytes cannot run here: {PROBLEM}")
    import bitsandbytes as bnb

    opt = build_optimizer(_params(0), _config("paged_adamw8bit"), CPU)
    assert type(opt) is bnb.optim.AdamW8bit
    assert "paged optimizers need CUDA" in capsys.readouterr().out


def test_adafactor_uses_the_fixed_learning_rate():
    from transformers.optimization import Adafactor

    opt = build_optimizer(_params(0), TrainConfig(optimizer="adafactor"), CPU, lr=3e-4)
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4 and not group["relative_step"] and not group["scale_parameter"]


def test_prodigy_missing_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import now raises ImportError
    with pytest.raises(LorakitError, match="pip install prodigyopt"):
        build_optimizer(_params(0), TrainConfig(optimizer="prodigy"), CPU)


def test_config_accepts_every_optimizer_and_rejects_others():
    from lorakit.config import resolve
    from lorakit.errors import ConfigError

    for name in OPTIMIZERS:
        assert resolve(sets=[f"train.optimizer='{name}'"]).train.optimizer == name
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        resolve(sets=["train.optimizer='sgd'"])
