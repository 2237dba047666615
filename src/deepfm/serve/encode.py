"""JSON rows -> probabilities, through the same encoder as ``deepfm predict``.

1. ``validate_rows`` checks every value against its field's kind (the model's config) and normalises it:
   categorical -> text, numeric -> float or numeric text, multi-valued -> list of (tag, weight) or text.
   Values that are wrong for their field raise ``RequestError`` naming the row and the field.
2. ``frame_probs`` builds a polars DataFrame with one column per training field (absent / null -> missing,
   like an empty cell) and runs ``Predictor.predict_proba``: the batch-predict code path.
3. ``FastEncoder`` encodes a few rows of plain values (numbers for numeric fields, lists for multi-valued
   ones) with ``deepfm.data.records.RecordEncoder``, the encoder's per-record path, for latency at batch 1;
   it reproduces ``Encoder.transform`` exactly (the tests compare the arrays) and falls back to (2) for
   anything else (numeric text, multi-valued text form).

A value's encoding never depends on the other rows of the request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import torch

from deepfm.config import CategoricalField, DataConfig
from deepfm.data.batch import make_input
from deepfm.data.codecs import CategoricalCodec, Codec
from deepfm.data.records import RecordEncoder
from deepfm.errors import DataError
from deepfm.predict import Predictor
from deepfm.serve.errors import ErrorItem, Problems, RequestError

__all__ = ["ErrorItem", "RequestError", "validate_rows", "build_frame", "frame_probs", "FastEncoder"]


def validate_rows(rows: list[dict[str, Any]], codecs: dict[str, Codec], label: str) -> list[dict[str, Any]]:
    """Check and normalise every row's features with its field's codec; raise ``RequestError`` (422) listing
    the problems."""
    problems = Problems(422)
    out: list[dict[str, Any]] = []
    for i, feats in enumerate(rows):
        norm: dict[str, Any] = {}
        for name, v in feats.items():
            c = codecs.get(name)
            if c is None:
                hint = " (it is the label column, not a feature)" if name == label else \
                    "; the model's fields are " + ", ".join(codecs)[:300]
                problems.add(i, name, f"unknown field{hint}")
            elif v is not None:  # None: missing, like an empty cell
                value, problem = c.request_value(v)
                if problem:
                    problems.add(i, name, problem)
                else:
                    norm[name] = value
        out.append(norm)
    problems.raise_any()
    return out


# ------------------------------------------------------------------------------------- the batch path
def build_frame(rows: list[dict[str, Any]], codecs: list[Codec], sep: str, wsep: str) -> pl.DataFrame:
    """One column per request field from validated rows; a field a row leaves out is null (missing)."""
    cols: list[pl.Series] = []
    problems = Problems(422)
    for c in codecs:
        col, found = c.request_column([r.get(c.name) for r in rows], sep, wsep)
        cols.append(col)
        for i, message in found:
            problems.add(i, c.name, message)
    problems.raise_any()
    return pl.DataFrame(cols)


def request_codecs(codecs: list[Codec], data: DataConfig) -> list[Codec]:
    """The columns a request carries, as codecs: the training fields', except that a field computed by
    ``data.derive`` is replaced by its source column (text, read as a category), as in the training files."""
    derived = {d.name for d in data.derive}
    sources = list(dict.fromkeys(d.source for d in data.derive))
    out = [c for c in codecs if c.name not in derived and c.name not in sources]
    return out + [CategoricalCodec(CategoricalField(name=s)) for s in sources]


def frame_probs(predictor: Predictor, rows: list[dict[str, Any]]) -> np.ndarray:
    """Probabilities of validated rows through ``Predictor.predict_proba`` (the ``deepfm predict`` path)."""
    return _on_frame(predictor, rows, predictor.predict_proba)


def frame_attributions(predictor: Predictor, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-row attributions of validated rows (``attr_bias``, ``attr_<field>``): the encoder and
    ``deepfm.explain.explain_rows`` that ``deepfm predict --explain`` uses."""
    from deepfm.explain import explain_rows

    return _on_frame(predictor, rows, lambda frame: explain_rows(predictor, frame).to_dict(as_series=False))


def _on_frame(predictor: Predictor, rows: list[dict[str, Any]], score: Callable[[pl.DataFrame], Any]) -> Any:
    """``score`` of the request frame of validated rows; an encoder error becomes a 422 naming row and field."""
    cfg = predictor.config
    codecs = request_codecs(predictor.loaded.encoder.codecs, cfg.data)
    frame = build_frame(rows, codecs, cfg.data.multi_value_separator, cfg.data.weight_separator)
    try:
        return score(frame)
    except DataError as err:
        row = None if err.line is None else err.line - 1
        raise RequestError(422, [ErrorItem(row, err.field, err.reason)]) from None


# ------------------------------------------------------------------------------------- the fast path
class FastEncoder:
    """A few rows of plain values -> probabilities through ``RecordEncoder`` (no polars per-call overhead)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.records = RecordEncoder(predictor.loaded.encoder)
        # derived columns (data.derive) are computed by the columnar engine only
        self.enabled = not predictor.config.data.derive

    def eligible(self, rows: list[dict[str, Any]]) -> bool:
        """Plain values only (numbers for numeric fields, lists for multi-valued ones): text forms are parsed
        by the columnar engine."""
        return self.enabled and self.records.plain(rows)

    def encode(self, rows: list[dict[str, Any]]):
        return self.records.encode(rows)

    @torch.no_grad()
    def probs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        p = self.predictor
        cat, num, multi = self.encode(rows)
        return p.runtime.probabilities(make_input(cat, num, multi))
