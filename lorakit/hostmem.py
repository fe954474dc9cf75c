"""Host memory of a training process: what glibc's allocator keeps, and when it gives it back.

Two settings, both on Linux with glibc (elsewhere they do nothing and say so by returning False):

- `keep_freed_memory()`: every training step frees and allocates the same large buffers again
  (oneDNN's weight reorders, activations, gradients). glibc serves blocks over its mmap threshold
  (at most 32 MiB) with fresh `mmap`s and unmaps them on `free`, so each step touched every page
  of them anew: on this project's CPU machine, real SD1.5 at 128 px took 0.9 million page faults
  per step (about 3.5 GB of fresh pages, 2.3 s per step). With mmap allocations off and the heap
  kept (`mallopt(M_MMAP_MAX, 0)`, a 1 GiB trim threshold) the second step on reuses the same
  pages: under 100 faults and 1.65 s per step, peak RSS +0.07 GiB (benchmarks/reference_script.py
  measures it side by side). This is what the allocator advice in PyTorch's CPU performance guide
  (jemalloc / tcmalloc) buys, without a preloaded library. `train` sets it when the device is the
  CPU: a GPU run's step allocations are the CUDA caching allocator's.
- `release_host_memory()`: `malloc_trim(0)` gives freed heap pages back to the OS (the heap keeps
  them otherwise, and RSS with it): `train` calls it after freeing the VAE and text encoders.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl and others lack them)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse (see module doc). True
    when set (this process, from now on)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def release_host_memory() -> bool:
    """Give the heap's free pages back to the OS (`malloc_trim(0)`). True when called."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
