"""Every `train.optimizer` choice: built, stepping, and its state surviving a checkpoint exactly."""

from __future__ import annotations

import math
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


MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state
# Around bitsandbytes' thresholds: 8192 and 8255 (a partial last absmax block of 256) elements
# get 8-bit state, 4096 exactly too, 4095 and 128 (tiny-model LoRA tensors) stay fp32. Several
# 8-bit tensors share the optimizer's quantisation maps (qmap1/qmap2): all kinds in one state.
SHAPES = [(64, 128), (65, 127), (64, 64), (63, 65), (4, 32)]


def _params(seed: int, shapes=SHAPES, device=CPU) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _steps(opt, params, n: int, start: int) -> None:
    for i in range(start, start + n):
        opt.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(1000 + i)
        loss = sum(
            ((p - torch.randn(p.shape, generator=g).to(p.device)) ** 2).sum() for p in params
        )
        loss.backward()
        opt.step()


def _config(name: str) -> TrainConfig:
    return TrainConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2,
                       optimizer_fallback=False)  # fmt: skip


def _round_trip(name: str, folder, shapes=SHAPES, device=CPU):
    """3 steps, checkpoint, a fresh optimizer over other values loads it, 3 more steps: the same
    parameters as 6 steps straight, bit for bit. Returns the optimizer state as loaded from the
    checkpoint, and the optimizer whose state was saved."""
    t = _config(name)
    straight = _params(0, shapes, device)
    opt = build_optimizer(straight, t, device)
    _steps(opt, straight, 6, 0)

    first = _params(0, shapes, device)
    opt1 = build_optimizer(first, t, device)
    _steps(opt1, first, 3, 0)
    state = ckpt.TrainState(3, 0, 0, [p.detach() for p in first], opt1.state_dict(), {}, None,
                            {}, {})  # fmt: skip
    ckpt.save_state(folder, state)
    loaded = ckpt.load_state(folder)

    resumed = _params(99, shapes, device)  # different values: everything must come from the file
    with torch.no_grad():
        for p, saved in zip(resumed, loaded.params, strict=True):
            p.copy_(saved)
    opt2 = build_optimizer(resumed, t, device)
    opt2.load_state_dict(loaded.optimizer)
    _steps(opt2, resumed, 3, 3)
    for a, b in zip(straight, resumed, strict=True):
        assert a.detach().cpu().numpy().tobytes() == b.detach().cpu().numpy().tobytes(), name
    assert not torch.equal(straight[0].detach(), _params(0, shapes, device)[0].detach()), "trains"
    return loaded.optimizer, opt1


def _check_8bit(saved: dict, shapes) -> None:
    """8-bit state exactly for tensors of ≥ MIN_8BIT elements, and the quantisation map they
    share comes back from the checkpoint as one tensor."""
    quant = [saved["state"][i]["__bnb_optimizer_quant_state__"] for i in range(len(shapes))]
    big = [i for i, s in enumerate(shapes) if math.prod(s) >= MIN_8BIT]
    for i, s in enumerate(shapes):
        expected = torch.uint8 if i in big else torch.float32
        assert quant[i]["state1"].dtype == expected, (s, quant[i]["state1"].dtype)
    assert len(big) > 1 and len({id(quant[i]["qmap1"]) for i in big}) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_round_trips_through_a_checkpoint_bit_identically(name, tmp_path):
    if name in BNB and PROBLEM is not None:
        pytest.skip(f"bitsandbytes cannot run here: {PROBLEM}")
    saved, _ = _round_trip(name, tmp_path)
    if name in BNB:
        _check_8bit(saved, SHAPES)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_on_cuda_round_trips_bit_identically(name, tmp_path):
    """On CUDA: state tensors are copied to the CPU once per memory (the shared qmaps once), and
    paged_adamw8bit really pages tensors of ≥ 1e5 elements (320 × 320)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if name in BNB and bnb_8bit_problem("cuda") is not None:
        pytest.skip(f"bitsandbytes cannot run on CUDA here: {bnb_8bit_problem('cuda')}")
    shapes = [(320, 320), *SHAPES]
    saved, opt = _round_trip(name, tmp_path, shapes, torch.device("cuda"))
    if name in BNB:
        _check_8bit(saved, shapes)
        paged = getattr(next(iter(opt.state.values()))["state1"], "is_paged", False)
        assert paged == (name == "paged_adamw8bit"), "saved from managed (paged) memory"


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
