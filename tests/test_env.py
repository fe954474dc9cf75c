"""`lorakit env`: versions, GPUs and the bitsandbytes self-tests actually run (not imports)."""

from __future__ import annotations

import json

from tests.conftest import cli


def test_env_json_runs_the_bitsandbytes_self_tests():
    rep = json.loads(cli("env", "--json").output)
    assert rep["versions"]["torch"] and rep["versions"]["python"]
    checks = {c["name"]: c for c in rep["checks"]}
    device = "cuda" if rep["gpus"] else "cpu"
    eight = checks[f"8-bit AdamW on {device}"]
    # bitsandbytes 0.50 steps 8-bit AdamW on the CPU (notes/stack.md): the check must pass here
    assert eight["ok"], eight
    assert "8-bit state" in eight["detail"] and " ms)" in eight["detail"]
    assert f"4-bit NF4 quantization on {device}" in checks
    for c in rep["checks"]:
        assert c["ok"] or c["fix"], c  # every failure comes with the fix to try


def test_env_table_names_each_check():
    text = cli("env").output
    assert "torch" in text and "8-bit AdamW" in text and "NF4" in text
