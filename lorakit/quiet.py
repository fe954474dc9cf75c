"""Silence import-time noise of the stack (bitsandbytes, transformers, diffusers) for users, and
keep it from fetching code off the Hub (`no_hub_kernels`).

Call `quiet()` before importing torch-heavy libraries. Real errors still surface: only warnings
and informational logs of third-party libraries are lowered.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def no_hub_kernels() -> None:
    """No compiled "hub kernels" (code downloaded from the Hugging Face Hub and loaded), which
    two libraries of the stack reach for by default:
    - transformers (5.x) kernelizes every model it loads (`use_kernels` defaults to on) unless
      `USE_HUB_KERNELS` says no: set to `NO` here unless the user set it;
    - bitsandbytes' CPU backend, on CPUs with AVX512-BF16, calls
      `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` on every import when
      the `kernels` package is installed (transformers installs it): a Hub request per run, hub
      model or not. With hub kernels off, `kernels` is made unimportable in this process
      (unless something imported it already); bitsandbytes then uses its own CPU code, and
      transformers/diffusers see `kernels` as not installed.
    `USE_HUB_KERNELS=YES` in the environment opts back in to both."""
    choice = os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if choice.lower() not in ("true", "1", "y", "yes", "on"):  # transformers' reading of it
        sys.modules.setdefault("kernels", None)  # a None entry: `import kernels` fails


def quiet() -> None:
    no_hub_kernels()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # bitsandbytes logs a warning about an optional CPU kernel package on every import.
    for name in ("bitsandbytes", "accelerate", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*paged optimizers.*")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - missing optional pieces must not break the CLI
        pass
