"""No code from the Hub that nobody asked for: bitsandbytes' CPU backend fetches a compiled
kernel (`kernels.get_kernel("kernels-community/...")`) on every import when the `kernels`
package is installed (transformers installs it) and the CPU has AVX512-BF16. `lorakit.quiet`,
which the CLI runs first, makes `kernels` unimportable, so that fetch never starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

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
