"""A scikit-learn style estimator over pandas or polars DataFrames, built on the CLI's pieces.

    clf = DeepFMClassifier(fields=[{"names": ["C1", "C2"]}, {"name": "I1", "kind": "numeric"}],
                           train={"epochs": 3})
    clf.fit(train_df, eval_set=valid_df)      # label column "label" (or pass y)
    clf.predict_proba(test_df)[:, 1]

``__init__`` only stores parameters; ``fit`` writes the frames to Parquet in a work folder and runs the
same pipeline as ``deepfm train`` (vocabularies fitted on the training frame only); learned state ends in
``_``; ``save``/``load`` use the same model directory as the CLI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import Config, config_from_dict
from deepfm.metrics import auc


def _to_polars(frame: Any) -> pl.DataFrame:
    if isinstance(frame, pl.DataFrame):
        return frame
    return pl.from_pandas(frame)


class DeepFMClassifier:
    def __init__(self, fields: list[dict[str, Any]], *, label: str = "label", model: dict | None = None,
                 train: dict | None = None, data: dict | None = None, output_dir: str | None = None,
                 verbose: bool = False) -> None:
        self.fields = fields
        self.label = label
        self.model = model
        self.train = train
        self.data = data
        self.output_dir = output_dir
        self.verbose = verbose

    def _config(self, work: Path, has_valid: bool) -> Config:
        data = {"format": "parquet", "train": str(work / "train.parquet"), "label": self.label,
                "cache_dir": str(work / "cache"), **(self.data or {})}
        if has_valid:
            data["valid"] = str(work / "valid.parquet")
        train = {"progress": self.verbose, **(self.train or {})}
        fields = [f.model_dump(exclude_none=True) if hasattr(f, "model_dump") else f for f in self.fields]
        return config_from_dict({"data": data, "fields": fields, "model": self.model or {}, "train": train},
                                "DeepFMClassifier")

    def fit(self, X: Any, y: Any = None, *, eval_set: Any = None) -> DeepFMClassifier:
        from deepfm.pipeline import train
        from deepfm.predict import Predictor

        frame = _to_polars(X)
        if y is not None:
            frame = frame.with_columns(pl.Series(self.label, np.asarray(y)))
        valid = _to_polars(eval_set) if eval_set is not None else None
        self._work = tempfile.TemporaryDirectory(prefix="deepfm-fit-")
        work = Path(self._work.name)
        frame.write_parquet(work / "train.parquet")
        if valid is not None:
            valid.write_parquet(work / "valid.parquet")
        cfg = self._config(work, valid is not None)
        out = Path(self.output_dir) if self.output_dir else work / "model"
        log = print if self.verbose else (lambda _msg: None)
        result = train(cfg, out, log=log)
        self.model_dir_ = out
        self.metrics_ = result.metrics
        self.history_ = result.history
        self.predictor_ = Predictor(out)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[N, 2]``: probabilities of class 0 and of class 1 (a click)."""
        p = self.predictor_.predict_proba(_to_polars(X))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: Any, threshold: float = 0.5) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= threshold).astype(np.int64)

    def score(self, X: Any, y: Any = None) -> float:
        """AUC on ``X`` (labels from ``y`` or the label column)."""
        frame = _to_polars(X)
        labels = np.asarray(y) if y is not None else frame[self.label].to_numpy()
        return auc(labels, self.predict_proba(frame)[:, 1])

    def save(self, path: str | Path) -> Path:
        import shutil

        from deepfm.io import atomic_directory

        src = self.model_dir_
        atomic_directory(Path(path), lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DeepFMClassifier:
        from deepfm.predict import Predictor

        pred = Predictor(path)
        cfg = pred.config
        clf = cls(fields=[f.model_dump(exclude_none=True) for f in cfg.fields], label=cfg.data.label,
                  model=cfg.model.model_dump(), train=cfg.train.model_dump())
        clf.model_dir_ = Path(path)
        clf.predictor_ = pred
        clf.metrics_ = pred.loaded.metrics
        return clf
