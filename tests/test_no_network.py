"""No network unless the user names a hub model. A training run on a local model resolves no
host name; and no code from the Hub that nobody asked for: bitsandbytes' CPU backend fetches a
compiled kernel (`kernels.get_kernel("kernels-community/...")`) on every import when the
`kernels` package is installed (transformers installs it) and the CPU has AVX512-BF16.
`lorakit.quiet`, which the CLI runs first, makes `kernels` unimportable, so that fetch never
starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parent.parent

# Loaded by every Python process started with it on PYTHONPATH: records each host name resolved
# and each internet connection tried, and refuses them.
SITECUSTOMIZE = """
import os, socket
_log = os.environ["NET_LOG"]
def _record(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError("network blocked by lorakit's test")
_gai, _connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        _record("resolve " + repr(host))
    return _gai(host, *args, **kwargs)
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
        _record("connect " + repr(address))
    return _connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


def test_a_local_training_run_touches_no_network(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.txt"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env.update(NET_LOG=str(log), PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", ROOT / "samples" / "brand",
         "--preset", "tiny-cpu", "--out", tmp_path / "run", "--steps", "2",
         "--set", "sample.every=0", "--set", "train.optimizer='adamw8bit'"],  # (bitsandbytes)
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "run" / "lorakit.safetensors").is_file()
    assert log.read_text() == ""


# A stand-in `kernels` package: records every fetch instead of reaching the Hub.
FAKE = """
import os
def get_kernel(repo_id, *args, **kwargs):
    with open(os.environ["FETCH_LOG"], "a") as f:
        f.write(repo_id + "\\n")
    raise RuntimeError("stand-in: no download")
"""


def _run(tmp_path, code: str) -> tuple[str, str]:
    pkg = tmp_path / "fake" / "kernels"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(FAKE)
    log = tmp_path / "fetches.txt"
    log.write_text("")
    env = dict(os.environ, FETCH_LOG=str(log), PYTHONPATH=str(tmp_path / "fake"))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return log.read_text(), out.stdout


def test_bitsandbytes_fetches_no_hub_kernel_after_quiet(tmp_path):
    fetched, out = _run(
        tmp_path,
        """
        from lorakit.quiet import quiet
        quiet()
        import bitsandbytes
        try:
            import kernels
            print("importable")
        except ImportError:
            print("blocked")
        """,
    )
    assert fetched == "" and out.strip() == "blocked"


def test_without_quiet_bitsandbytes_does_fetch(tmp_path):
    """What the test above guards against, where this CPU shows it (AVX512-BF16)."""
    fetched, _ = _run(tmp_path, "import bitsandbytes")
    if not fetched:
        pytest.skip("bitsandbytes asks for no hub kernel on this CPU (no AVX512-BF16)")
    assert fetched.split() == ["kernels-community/quantization-bitsandbytes"]


KERNELIZED = """
import sys
{setup}
from transformers import CLIPTextConfig, CLIPTextModel
cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                     num_hidden_layers=1, vocab_size=99)
CLIPTextModel(cfg).save_pretrained(sys.argv[1])
print(CLIPTextModel.from_pretrained(sys.argv[1]).use_kernels)
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_transformers_loads_without_hub_kernels(tmp_path, guarded):
    """transformers 5.x kernelizes every model it loads unless `USE_HUB_KERNELS` says no;
    after `quiet()` it does not (unguarded: the control, where this transformers does)."""
    setup = "from lorakit.quiet import quiet; quiet()" if guarded else ""
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    out = subprocess.run(
        [sys.executable, "-c", KERNELIZED.format(setup=setup), str(tmp_path / "clip")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    if guarded:
        assert out.stdout.split()[-1] == "False"
    elif out.stdout.split()[-1] != "True":
        pytest.skip("this transformers does not kernelize by default")
