"""deepfm: DeepFM for click-through-rate prediction, from raw click logs to a served model."""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
import sys as _sys

# How long torch's idle OpenMP workers spin before they sleep, set before torch first loads (it reads them
# once; a value the user set wins). libgomp's default spins ~300,000 rounds, ~10 ms on CPUs whose PAUSE takes
# ~140 cycles: longer than most of a training step's single-threaded work (Python, the gather, the native
# kernels), which then runs beside a spinning core: on a 2-vCPU VM at half speed, and on a machine shared
# with other work the spinning takes the other jobs' time and waits on preempted workers. Measured on such a
# machine: no change to a quiet fp32 step, 1.4x the training rate beside one busy process (bench/THREADS.md).
# LLVM's and Intel's runtimes (macOS, some builds) read KMP_BLOCKTIME (ms) instead.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "5000")
    _os.environ.setdefault("KMP_BLOCKTIME", "1")

from deepfm.config import Config, load_config  # noqa: E402
from deepfm.errors import ArtifactError, ConfigError, DataError, DeepFMError  # noqa: E402

__all__ = ["DeepFMClassifier", "Config", "load_config", "DeepFMError", "ConfigError", "DataError",
           "ArtifactError", "__version__"]


def __getattr__(name: str):
    """``deepfm.DeepFMClassifier`` is imported on first use: the command line never pays for scikit-learn."""
    if name == "DeepFMClassifier":
        from deepfm.api import DeepFMClassifier

        return DeepFMClassifier
    raise AttributeError(f"module 'deepfm' has no attribute {name!r}")
