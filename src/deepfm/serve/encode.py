"""JSON rows -> probabilities, through the same encoder as ``deepfm predict``.

1. ``validate_rows`` checks every value against its field's kind (the model's config) and normalises it:
   categorical -> text, numeric -> float or numeric text, multi-valued -> list of (tag, weight) or text.
   Values that are wrong for their field raise ``RequestError`` naming the row and the field. A large
   request is checked column by column and kept so (``RequestRows``).
2. ``frame_probs`` builds a polars DataFrame with one column per training field (absent / null -> missing,
   like an empty cell) and runs ``Predictor.predict_proba``: the batch-predict code path.
3. ``FastEncoder`` encodes rows of plain values (numbers for numeric fields, lists for multi-valued ones)
   with ``deepfm.data.records.RecordEncoder``, the encoder's per-record path, without polars' fixed costs;
   it reproduces ``Encoder.transform`` exactly (the tests compare the arrays) and falls back to (2) for
   anything else (numeric text, multi-valued text form).

A value's encoding never depends on the other rows of the request.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
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

__all__ = ["ErrorItem", "RequestError", "RequestRows", "validate_rows", "build_frame", "frame_probs", "FastEncoder"]


class RequestRows:
    """Validated rows of a request (or of a coalesced batch): one normalised value per row and field (None or
    left out: missing). A large request is held column by column (field -> values; a field no row gives is
    left out), transposed once when it is validated, since the encoders read columns; a small one keeps its
    row dicts (``dicts``), which cost nothing to gather into a coalesced batch."""

    __slots__ = ("n", "dicts", "_columns")

    def __init__(self, n: int, columns: dict[str, list[Any]] | None = None,
                 dicts: list[dict[str, Any]] | None = None) -> None:
        self.n, self.dicts, self._columns = n, dicts, columns

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> RequestRows:
        return cls(len(rows), dicts=rows)

    @classmethod
    def concat(cls, parts: list[RequestRows]) -> RequestRows:
        if len(parts) == 1:
            return parts[0]
        n = sum(p.n for p in parts)
        if all(p.dicts is not None for p in parts):
            return cls(n, dicts=[r for p in parts for r in p.dicts])
        names = dict.fromkeys(k for p in parts for k in p.columns)
        return cls(n, {k: list(chain.from_iterable(p.column(k) for p in parts)) for k in names})

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> RequestRows:
        if self.dicts is not None:
            return RequestRows.from_rows(self.dicts[rows])
        return RequestRows(len(range(self.n)[rows]), {k: v[rows] for k, v in self.columns.items()})

    @property
    def columns(self) -> dict[str, list[Any]]:
        if self._columns is None:
            assert self.dicts is not None
            names = dict.fromkeys(k for r in self.dicts for k in r)
            self._columns = {k: [r.get(k) for r in self.dicts] for k in names}
        return self._columns

    def column(self, name: str) -> list[Any]:
        values = self.columns.get(name)
        return [None] * self.n if values is None else values


_COLUMNS_MIN_ROWS = 32  # from this many rows a request is checked column by column (one call per field)


def validate_rows(rows: list[dict[str, Any]], codecs: dict[str, Codec], label: str) -> RequestRows:
    """Check and normalise every row's features with its field's codec; raise ``RequestError`` (422) listing
    the problems. A large request is checked column by column (``Codec.request_values``); a request with a
    problem anywhere is checked again value by value, which finds and words the problems."""
    if len(rows) >= _COLUMNS_MIN_ROWS:
        columns = _checked_columns(rows, codecs)
        if columns is not None:
            return RequestRows(len(rows), columns)
    return RequestRows.from_rows(_checked_values(rows, codecs, label))


def _checked_columns(rows: list[dict[str, Any]], codecs: dict[str, Codec]) -> dict[str, list[Any]] | None:
    """The normalised columns of ``rows``, or None if some field is unknown or some value has a problem."""
    given = set().union(*rows)
    if not given <= codecs.keys():
        return None
    columns: dict[str, list[Any]] = {}
    for name in (n for n in codecs if n in given):
        c, values = codecs[name], [r.get(name) for r in rows]
        normalised = c.request_values(values)
        if normalised is None:  # something unusual in the column: value by value
            checked = [(None, None) if v is None else c.request_value(v) for v in values]
            if any(problem for _, problem in checked):
                return None
            normalised = [v for v, _ in checked]
        columns[name] = normalised
    return columns


def _checked_values(rows: list[dict[str, Any]], codecs: dict[str, Codec], label: str) -> list[dict[str, Any]]:
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
def build_frame(rows: RequestRows, codecs: list[Codec], sep: str, wsep: str) -> pl.DataFrame:
    """One column per request field from validated rows; a field a row leaves out is null (missing)."""
    cols: list[pl.Series] = []
    problems = Problems(422)
    for c in codecs:
        col, found = c.request_column(rows.column(c.name), sep, wsep)
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


def frame_probs(predictor: Predictor, rows: RequestRows) -> np.ndarray:
    """Probabilities of validated rows through ``Predictor.predict_proba`` (the ``deepfm predict`` path)."""
    return _on_frame(predictor, rows, predictor.predict_proba)


def frame_attributions(predictor: Predictor, rows: RequestRows) -> dict[str, list[float]]:
    """Per-row attributions of validated rows (``attr_bias``, ``attr_<field>``): the encoder and
    ``deepfm.explain.explain_rows`` that ``deepfm predict --explain`` uses."""
    from deepfm.explain import explain_rows

    return _on_frame(predictor, rows, lambda frame: explain_rows(predictor, frame).to_dict(as_series=False))


def _on_frame(predictor: Predictor, rows: RequestRows, score: Callable[[pl.DataFrame], Any]) -> Any:
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

    def eligible(self, rows: RequestRows) -> bool:
        """Plain values only (numbers for numeric fields, lists for multi-valued ones): text forms are parsed
        by the columnar engine."""
        if not self.enabled:
            return False
        return self.records.plain(rows.dicts) if rows.dicts is not None else self.records.plain_columns(rows.columns)

    def encode(self, rows: RequestRows):
        if rows.dicts is not None:
            return self.records.encode(rows.dicts)
        return self.records.encode_columns(rows.n, rows.columns)

    @torch.no_grad()
    def probs(self, rows: RequestRows) -> np.ndarray:
        p = self.predictor
        cat, num, multi = self.encode(rows)
        return p.runtime.probabilities(make_input(cat, num, multi))
