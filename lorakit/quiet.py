"""Silence import-time noise of the stack (bitsandbytes, transformers, diffusers) for users.

Call `quiet()` before importing torch-heavy libraries. Real errors still surface: only warnings
and informational logs of third-party libraries are lowered.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet() -> None:
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
