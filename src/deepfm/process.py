"""Process-wide tuning, opt-in: what the ``deepfm`` command applies to its own process, and a library user may.

Importing deepfm, or constructing any of its objects, changes nothing outside them. Two settings help a
training or serving process but change the whole process, so only the command-line entry point applies them
(``deepfm.cli.main``, which every subcommand, ``deepfm serve`` and ``torchrun``'s workers go through), and a
program that embeds deepfm decides for itself::

    import deepfm.process
    deepfm.process.tune_process()   # before ``import torch``, for the OpenMP part to take effect
    import torch

- OpenMP spin (``tune_openmp``): how long torch's idle OpenMP workers spin before they sleep. libgomp's
  default is longer than most of a training step's single-threaded work (Python, the gather, the native
  kernels), which then runs beside a spinning core; on a machine shared with other work the spinning takes
  the other jobs' time and waits on preempted workers (bench/THREADS.md). The runtime reads these variables
  once, when torch loads it, so they are set only while torch is not yet imported, and a value the user set
  wins. LLVM's and Intel's runtimes read ``KMP_BLOCKTIME`` instead of ``GOMP_SPINCOUNT``.
- Freed memory kept for reuse (``reuse_freed_memory``, glibc only): a training step allocates and frees
  buffers larger than glibc's adaptive mmap threshold many times; by default glibc unmaps them and returns the
  heap's top to the OS, so the next step page-faults them back in (bench/FIGURES.md). The cost: resident
  memory stays near its peak instead of shrinking after it. ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_`` (or preloading jemalloc/tcmalloc) do the same from outside.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPENMP_SPIN = {"GOMP_SPINCOUNT": "5000", "KMP_BLOCKTIME": "1"}  # rounds (libgomp); milliseconds (LLVM, Intel)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: buffers up to 32 MB come from the reusable heap
TRIM_THRESHOLD = 512 << 20  # freed memory at the heap's top kept up to this much before returning it


def tune_openmp() -> bool:
    """Shorten OpenMP's idle spin (``OPENMP_SPIN``, where the user set nothing) if torch is not loaded yet;
    True if applied. Once torch is loaded its runtime has read the settings, so nothing is changed."""
    if "torch" in sys.modules:
        return False
    for name, value in OPENMP_SPIN.items():
        os.environ.setdefault(name, value)
    return True


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed buffers for reuse; True if applied (Linux with glibc), else False."""
    if os.name != "posix" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def tune_process(*, openmp: bool = True, malloc: bool = True) -> dict[str, bool]:
    """Both settings (each can be left out); what was applied, by name."""
    return {"openmp": openmp and tune_openmp(), "malloc": malloc and reuse_freed_memory()}
