"""`train.lr = inf` was accepted (NaN was refused): every float key must be a finite number."""

from __future__ import annotations

import pytest
from conftest import SAMPLES, cli

from lorakit import config as cfg
from lorakit.errors import ConfigError

FLOAT_KEYS = [
    f"{section}.{key}"
    for section, keys in cfg.Config().to_dict().items()
    for key, value in keys.items()
    if isinstance(value, float)
]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_refuses_non_finite_values(value):
    assert len(FLOAT_KEYS) > 10
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
            cfg.resolve(preset="tiny-cpu", sets=[f"{key}={value}"])


def test_train_lr_inf_stops_before_training(tmp_path):
    r = cli("train", SAMPLES, "--preset", "tiny-cpu", "--set", "train.lr=inf",
            "--out", tmp_path / "run", expect=2)  # fmt: skip
    assert "'train.lr' must be a finite number, got inf" in r.output
    assert not (tmp_path / "run").exists()
