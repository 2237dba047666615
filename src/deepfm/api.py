"""A scikit-learn style estimator over pandas or polars DataFrames, built on the CLI's pieces.

    clf = DeepFMClassifier(fields=[{"names": ["C1", "C2"]}, {"name": "I1", "kind": "numeric"}],
                           train={"epochs": 3})
    clf.fit(train_df, eval_set=valid_df)      # label column "label" (or pass y)
    clf.predict_proba(test_df)[:, 1]

It is a scikit-learn estimator (``get_params`` / ``set_params``, ``clone``, ``Pipeline``, ``GridSearchCV``):
``__init__`` only stores parameters; ``fit`` writes the frames to Parquet in a work folder and runs the
same pipeline as ``deepfm train`` (vocabularies fitted on the training frame only); learned state ends in
``_``; ``save``/``load`` use the same model directory as the CLI.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import Config, config_from_dict
from deepfm.errors import DataError, DeepFMError
from deepfm.metrics import auc


def _to_polars(frame: Any) -> pl.DataFrame:
    """pandas / polars frames keep their column names; a 2-D array's columns are named ``x0``, ``x1``, ..."""
    if isinstance(frame, pl.DataFrame):
        return frame
    if hasattr(frame, "columns") and hasattr(frame, "dtypes"):
        frame = pl.from_pandas(frame)
        return frame.rename({c: str(c) for c in frame.columns})
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise InputError(f"X must be a DataFrame or a 2-D array, got an array of shape {arr.shape}. Reshape your "
                         "data: one row per example, one column per feature")
    # NaN is a missing value, as an empty cell in a training file
    return pl.DataFrame([pl.Series(f"x{i}", arr[:, i], nan_to_null=arr.dtype.kind == "f")
                         for i in range(arr.shape[1])])


def infer_fields(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """One field per column when ``fields`` is not given: numbers -> numeric (log buckets), lists -> multi,
    anything else -> categorical."""
    fields: list[dict[str, Any]] = []
    for name, dtype in frame.schema.items():
        if dtype.is_numeric() and dtype != pl.Boolean:
            fields.append({"name": name, "kind": "numeric"})
        elif isinstance(dtype, pl.List):
            fields.append({"name": name, "kind": "multi"})
        else:
            fields.append({"name": name})
    return fields


class InputError(DataError, ValueError):
    """Bad ``X`` / ``y`` given to the estimator: a DataError for deepfm, a ValueError for scikit-learn."""


SAMPLE_WEIGHT = "__sample_weight__"  # the column fit writes sample_weight to (data.weight_column)


def _sample_weight(sample_weight: Any, rows: int) -> np.ndarray | None:
    """``sample_weight`` as float64 ``[rows]``, checked as ``data.weight_column`` checks a file's cells."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim != 1 or len(w) != rows:
        raise InputError(f"sample_weight must be 1-D with one weight per row of X ({rows} rows), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InputError("sample_weight must be finite and >= 0")
    return w


def binary_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, 0/1 labels)``: the two classes in sorted order, the second one is the positive class."""
    try:
        from sklearn.utils.multiclass import type_of_target

        kind = type_of_target(y)
        if kind not in ("binary", "multiclass"):
            raise InputError(f"Unknown label type: {kind}. DeepFMClassifier takes two classes (0/1)")
    except ImportError:
        pass
    classes = np.unique(y)
    if len(classes) != 2:
        raise InputError(f"DeepFMClassifier is a binary classifier: y holds {len(classes)} class(es) "
                         f"{classes[:5].tolist()}, it needs exactly 2")
    return classes, (y == classes[1]).astype(np.int64)


try:  # a real scikit-learn estimator where scikit-learn is installed (clone, Pipeline, GridSearchCV)
    from sklearn.base import BaseEstimator, ClassifierMixin

    _BASES: tuple[type, ...] = (ClassifierMixin, BaseEstimator)
except ImportError:  # the same parameter protocol without it
    class _Params:
        _estimator_type = "classifier"

        def get_params(self, deep: bool = True) -> dict[str, Any]:
            names = [n for n, p in inspect.signature(type(self).__init__).parameters.items()
                     if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            return {n: getattr(self, n) for n in names}

        def set_params(self, **params: Any) -> Any:
            valid = self.get_params()
            for key, value in params.items():
                if key not in valid:
                    raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}; valid: {sorted(valid)}")
                setattr(self, key, value)
            return self

    _BASES = (_Params,)


class DeepFMClassifier(*_BASES):  # type: ignore[misc]
    """DeepFM as a scikit-learn classifier on DataFrames (binary labels 0/1; ``score`` is the AUC).

    ``fields`` as in the config's ``fields`` section (default: one field per column, typed by dtype);
    ``model`` / ``train`` / ``data``: overrides of those config sections. ``verbose`` (opt-in): a line per
    epoch on stderr, and progress bars when stderr is a terminal."""

    def __init__(self, fields: list[dict[str, Any]] | None = None, *, label: str = "label",
                 model: dict | None = None, train: dict | None = None, data: dict | None = None,
                 output_dir: str | None = None, verbose: bool | int = False) -> None:
        self.fields = fields
        self.label = label
        self.model = model
        self.train = train
        self.data = data
        self.output_dir = output_dir
        self.verbose = verbose

    def _config(self, work: Path, fields: list[Any], has_valid: bool, weighted: bool = False) -> Config:
        data = {"format": "parquet", "train": str(work / "train.parquet"), "label": self.label,
                "cache_dir": str(work / "cache"), **({"weight_column": SAMPLE_WEIGHT} if weighted else {}),
                **(self.data or {})}
        if has_valid:
            data["valid"] = str(work / "valid.parquet")
        train = {"progress": bool(self.verbose), **(self.train or {})}
        fields = [f.model_dump(exclude_none=True) if hasattr(f, "model_dump") else f for f in fields]
        return config_from_dict({"data": data, "fields": fields, "model": self.model or {}, "train": train},
                                "DeepFMClassifier")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # binary: a click or not
        tags.input_tags.allow_nan = True  # a missing value is a value of its own, as in the training files
        tags.target_tags.required = True  # y, or a label column in X
        return tags

    def _with_label(self, X: Any, y: Any) -> tuple[pl.DataFrame, np.ndarray]:
        """X as a frame without the label column, and the labels (from ``y`` or that column)."""
        frame = _to_polars(X)
        if y is None:
            if self.label not in frame.columns:
                raise InputError(f"{type(self).__name__} requires y to be passed, but the target y is None "
                                 f"and X has no label column '{self.label}'")
            return frame.drop(self.label), frame[self.label].to_numpy()
        labels = np.asarray(y)
        if labels.ndim == 2 and labels.shape[1] == 1:
            try:
                from sklearn.exceptions import DataConversionWarning
            except ImportError:
                DataConversionWarning = UserWarning  # noqa: N806
            warnings.warn("A column-vector y was passed when a 1d array was expected: using its one column",
                          DataConversionWarning, stacklevel=3)
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != frame.height:
            raise InputError(f"y must be 1-D with one label per row of X ({frame.height} rows), got shape "
                             f"{labels.shape}")
        return frame.drop(self.label, strict=False), labels

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None, *, eval_set: Any = None) -> DeepFMClassifier:
        """Train on ``X`` (labels from ``y`` or the label column); ``sample_weight`` (one finite weight >= 0 a
        row) weights the training loss as ``data.weight_column`` does; ``eval_set`` (a frame with labels)
        drives early stopping. Refitting starts afresh."""
        from deepfm.pipeline import train
        from deepfm.predict import Predictor

        features, y_raw = self._with_label(X, y)
        if features.height == 0:
            raise InputError("X has no rows")
        floats = [c for c, t in features.schema.items() if t.is_float()]
        infinite = [c for c in floats if features[c].is_infinite().any()]
        if infinite:
            raise InputError(f"Input contains infinity in column(s) {infinite}: a numeric value must be finite "
                             "(NaN or null is a missing value)")
        classes, labels = binary_labels(y_raw)
        frame = features.with_columns(pl.Series(self.label, labels))
        weights = _sample_weight(sample_weight, frame.height)
        if weights is not None:
            if SAMPLE_WEIGHT in features.columns:
                raise InputError(f"X has a column named '{SAMPLE_WEIGHT}', the name fit gives sample_weight")
            frame = frame.with_columns(pl.Series(SAMPLE_WEIGHT, weights))
        valid = None
        if eval_set is not None:
            v_features, v_raw = self._with_label(eval_set, None)
            valid = v_features.with_columns(pl.Series(self.label, (v_raw == classes[1]).astype(np.int64)))
        fields = self.fields if self.fields is not None else infer_fields(features)
        self._work = tempfile.TemporaryDirectory(prefix="deepfm-fit-")
        work = Path(self._work.name)
        frame.write_parquet(work / "train.parquet")
        if valid is not None:
            valid.write_parquet(work / "valid.parquet")
        cfg = self._config(work, fields, valid is not None, weighted=weights is not None)
        out = Path(self.output_dir) if self.output_dir else work / "model"
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if self.verbose else (lambda _msg: None)
        result = train(cfg, out, log=log)
        assert result is not None
        result.data.close()  # the model directory is written: the prepared splits' descriptors are not needed
        self.fields_ = [f.model_dump(exclude_none=True) for f in cfg.fields]
        self.classes_ = classes
        self.n_features_in_ = features.width
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.array(features.columns, dtype=object)
        self.model_dir_ = out
        self.metrics_ = result.metrics
        self.history_ = result.history
        self.predictor_ = Predictor(out)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "predictor_"):
            try:
                from sklearn.exceptions import NotFittedError
            except ImportError:
                NotFittedError = DeepFMError  # noqa: N806
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def predict_proba(self, X: Any) -> np.ndarray:
        """``[N, 2]``: probabilities of class 0 and of class 1 (a click)."""
        self._check_fitted()
        frame = _to_polars(X)
        names = getattr(self, "feature_names_in_", None)
        if names is None and hasattr(self, "n_features_in_") and frame.width != self.n_features_in_:
            raise InputError(f"X has {frame.width} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input")
        p = self.predictor_.predict_proba(frame)
        return np.stack([1.0 - p, p], axis=1)

    def explain(self, X: Any) -> Any:
        """Per-row attributions (``deepfm.explain.explain_rows``): ``attr_bias`` and ``attr_<field>`` per field,
        summing to each row's logit (``decision_function``); a pandas DataFrame for pandas ``X``, else polars."""
        from deepfm.explain import explain_rows

        self._check_fitted()
        out = explain_rows(self.predictor_, _to_polars(X))
        return out if isinstance(X, pl.DataFrame) or not hasattr(X, "dtypes") else out.to_pandas()

    def decision_function(self, X: Any) -> np.ndarray:
        """The logit of a click (what ``roc_auc`` scoring uses)."""
        p = np.clip(self.predict_proba(X)[:, 1], 1e-15, 1 - 1e-15)
        return np.log(p) - np.log1p(-p)

    def predict(self, X: Any, threshold: float = 0.5) -> np.ndarray:
        """The class of each row: the positive one (``classes_[1]``) where its probability reaches ``threshold``."""
        self._check_fitted()
        return self.classes_[(self.predict_proba(X)[:, 1] >= threshold).astype(np.int64)]

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """AUC on ``X`` (labels from ``y`` or the label column), weighted by ``sample_weight`` when given: the
        model-selection score of GridSearchCV."""
        self._check_fitted()
        frame, labels = self._with_label(X, y)
        return auc((labels == self.classes_[1]).astype(np.int64), self.predict_proba(frame)[:, 1],
                   _sample_weight(sample_weight, frame.height))

    def save(self, path: str | Path) -> Path:
        import shutil

        from deepfm.io import atomic_directory

        self._check_fitted()
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
        clf.fields_ = clf.fields
        clf.classes_ = np.array([0, 1])  # the model directory stores 0/1 labels
        clf.model_dir_ = Path(path)
        clf.predictor_ = pred
        clf.metrics_ = pred.loaded.metrics
        return clf
