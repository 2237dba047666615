"""deepfm: DeepFM for click-through-rate prediction, from raw click logs to a served model."""

from __future__ import annotations

__version__ = "0.1.0"

from deepfm.config import Config, load_config
from deepfm.errors import ArtifactError, ConfigError, DataError, DeepFMError

__all__ = ["DeepFMClassifier", "Config", "load_config", "DeepFMError", "ConfigError", "DataError",
           "ArtifactError", "__version__"]


def __getattr__(name: str):
    """``deepfm.DeepFMClassifier`` is imported on first use: the command line never pays for scikit-learn."""
    if name == "DeepFMClassifier":
        from deepfm.api import DeepFMClassifier

        return DeepFMClassifier
    raise AttributeError(f"module 'deepfm' has no attribute {name!r}")
