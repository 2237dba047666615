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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from deepfm.config import DataConfig, FieldConfig
from deepfm.data.records import RecordEncoder
from deepfm.data.loader import make_input
from deepfm.errors import DataError
from deepfm.predict import Predictor
from deepfm.train.trainer import autocast, sigmoid

FLOAT32_MAX = 3.4e38
MAX_ERRORS = 20


@dataclass
class ErrorItem:
    row: int | None
    field: str | None
    message: str

    def text(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def to_json(self) -> dict:
        return {"row": self.row, "field": self.field, "message": self.message}


class RequestError(Exception):
    """A client error: answered with ``status`` and a message naming the row(s) and field(s)."""

    def __init__(self, status: int, errors: list[ErrorItem] | str) -> None:
        self.status = status
        self.errors = [ErrorItem(None, None, errors)] if isinstance(errors, str) else errors
        more = "" if len(self.errors) < MAX_ERRORS else f" (showing the first {MAX_ERRORS} problems)"
        self.detail = "; ".join(e.text() for e in self.errors) + more
        super().__init__(self.detail)

    def to_json(self) -> dict:
        return {"detail": self.detail, "errors": [e.to_json() for e in self.errors]}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def float_token(v: float) -> str:
    """The category text of a JSON number: integral values as their integer text (as ``Encoder`` does with a
    float id column), others as polars writes the float."""
    if math.isfinite(v) and v == int(v) and abs(v) < 2.0 ** 63:
        return str(int(v))
    return str(pl.Series([v], dtype=pl.Float64).cast(pl.Utf8)[0])


class Multi:
    """A validated multi-valued cell given as a list: tags (text) and weights (float)."""

    __slots__ = ("tags", "weights", "weighted")

    def __init__(self, tags: list[str], weights: list[float], weighted: bool) -> None:
        self.tags, self.weights, self.weighted = tags, weights, weighted


def _check_float(v: int | float) -> str | None:
    try:
        f = float(v)
    except OverflowError:
        return "number out of range"
    if not math.isfinite(f):
        return "must be a finite number"
    if abs(f) > FLOAT32_MAX:
        return f"number out of range (|x| > {FLOAT32_MAX:g})"
    return None


def _tag_text(t: Any) -> str | None:
    if isinstance(t, str):
        return t
    if isinstance(t, int) and not isinstance(t, bool):
        try:
            return str(t)
        except ValueError:
            return None
    return None


def _validate_multi(v: Any, sep: str) -> tuple[Any, str | None]:
    if isinstance(v, str):
        return v, None
    if not isinstance(v, list):
        return None, (f"a multi-valued field takes a list of tags, a list of [tag, weight] pairs or the text "
                      f"form 'a:1.0{sep}b', got {_type_name(v)}")
    tags: list[str] = []
    weights: list[float] = []
    weighted = False
    for j, item in enumerate(v):
        if isinstance(item, list):
            if len(item) != 2:
                return None, f"item {j}: a [tag, weight] pair needs exactly 2 elements, got {len(item)}"
            tag, w = _tag_text(item[0]), item[1]
            if tag is None:
                return None, f"item {j}: the tag must be a string, got {_type_name(item[0])}"
            if not _is_number(w):
                return None, f"item {j}: the weight of tag {tag!r} must be a number, got {_type_name(w)}"
            problem = _check_float(w)
            if problem:
                return None, f"item {j}: the weight of tag {tag!r}: {problem}"
            tags.append(tag)
            weights.append(float(w))
            weighted = True
        else:
            tag = _tag_text(item)
            if tag is None:
                return None, f"item {j}: a tag must be a string (or a [tag, weight] pair), got {_type_name(item)}"
            tags.append(tag)
            weights.append(1.0)
    return Multi(tags, weights, weighted), None


def validate_rows(rows: list[dict[str, Any]], fields: dict[str, FieldConfig], label: str,
                  multi_sep: str) -> list[dict[str, Any]]:
    """Check and normalise every row's features; raise ``RequestError`` (422) listing the problems."""
    errors: list[ErrorItem] = []
    out: list[dict[str, Any]] = []
    for i, feats in enumerate(rows):
        norm: dict[str, Any] = {}
        for name, v in feats.items():
            f = fields.get(name)
            if f is None:
                hint = " (it is the label column, not a feature)" if name == label else \
                    "; the model's fields are " + ", ".join(fields)[:300]
                errors.append(ErrorItem(i, name, f"unknown field{hint}"))
            elif v is None:
                continue  # missing, like an empty cell
            elif f.kind == "categorical":
                if isinstance(v, str):
                    norm[name] = v
                elif _is_number(v):
                    problem = _check_float(v) if isinstance(v, float) else None
                    if problem:
                        errors.append(ErrorItem(i, name, problem))
                    else:
                        try:
                            norm[name] = str(v) if isinstance(v, int) else float_token(v)
                        except ValueError:
                            errors.append(ErrorItem(i, name, "integer too long"))
                else:
                    errors.append(ErrorItem(i, name, f"a categorical field takes a string (or a number), "
                                                     f"got {_type_name(v)}"))
            elif f.kind == "numeric":
                if isinstance(v, str):
                    norm[name] = v  # parsed (and checked) by the encoder, as in a CSV file
                elif _is_number(v):
                    problem = _check_float(v)
                    if problem:
                        errors.append(ErrorItem(i, name, problem))
                    else:
                        norm[name] = float(v)
                else:
                    errors.append(ErrorItem(i, name, f"a numeric field takes a number or a numeric string, "
                                                     f"got {_type_name(v)}"))
            else:
                value, problem = _validate_multi(v, multi_sep)
                if problem:
                    errors.append(ErrorItem(i, name, problem))
                else:
                    norm[name] = value
            if len(errors) >= MAX_ERRORS:
                raise RequestError(422, errors)
        out.append(norm)
    if errors:
        raise RequestError(422, errors)
    return out


# ------------------------------------------------------------------------------------- the batch path
def _multi_column(name: str, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[ErrorItem]]:
    errors: list[ErrorItem] = []
    if any(isinstance(v, str) for v in values):  # text form somewhere: write list cells as text too
        cells: list[str | None] = []
        for i, v in enumerate(values):
            if isinstance(v, Multi):
                bad = [t for t in v.tags if sep in t]
                if bad:
                    errors.append(ErrorItem(i, name, f"tag {bad[0]!r} contains the separator {sep!r}: when "
                                                     "other rows use the text form, send tags without it"))
                cells.append(sep.join(f"{t}{wsep}{w!r}" for t, w in zip(v.tags, v.weights)))
            else:
                cells.append(v)
        return pl.Series(name, cells, dtype=pl.Utf8), errors
    if any(isinstance(v, Multi) and v.weighted for v in values):
        dtype = pl.List(pl.Struct({"tag": pl.Utf8, "weight": pl.Float64}))
        return pl.Series(name, [None if v is None else [{"tag": t, "weight": w} for t, w in zip(v.tags, v.weights)]
                                for v in values], dtype=dtype), errors
    return pl.Series(name, [None if v is None else v.tags for v in values], dtype=pl.List(pl.Utf8)), errors


def build_frame(rows: list[dict[str, Any]], fields: list[FieldConfig], sep: str, wsep: str) -> pl.DataFrame:
    """One column per training field from validated rows; a field a row leaves out is null (missing)."""
    cols: list[pl.Series] = []
    errors: list[ErrorItem] = []
    for f in fields:
        name = str(f.name)
        values = [r.get(name) for r in rows]
        if f.kind == "categorical":
            cols.append(pl.Series(name, values, dtype=pl.Utf8))
        elif f.kind == "numeric":
            if any(isinstance(v, str) for v in values):  # numeric text: parsed by the encoder, like a CSV
                cols.append(pl.Series(name, [v if v is None or isinstance(v, str) else repr(v) for v in values],
                                      dtype=pl.Utf8))
            else:
                cols.append(pl.Series(name, values, dtype=pl.Float64))
        else:
            col, errs = _multi_column(name, values, sep, wsep)
            cols.append(col)
            errors += errs
    if errors:
        raise RequestError(422, errors[:MAX_ERRORS])
    return pl.DataFrame(cols)


def _check_numeric_text(frame: pl.DataFrame, fields: list[FieldConfig]) -> None:
    """Numeric text the encoder accepts but that is not finite (e.g. 'inf'): a client error here."""
    errors = []
    for f in fields:
        col = frame[str(f.name)]
        if f.kind == "numeric" and col.dtype == pl.Utf8:
            parsed = col.str.strip_chars().replace("", None).cast(pl.Float64, strict=False)
            bad = (parsed.is_infinite() | (parsed.abs() > FLOAT32_MAX)).fill_null(False).to_numpy()
            for i in np.nonzero(bad)[0][:MAX_ERRORS]:
                errors.append(ErrorItem(int(i), str(f.name), f"value {col[int(i)]!r} is out of range"))
    if errors:
        raise RequestError(422, errors[:MAX_ERRORS])


def request_fields(fields: list[FieldConfig], data: DataConfig) -> list[FieldConfig]:
    """The columns a request carries: the training fields, except that a field computed by ``data.derive`` is
    replaced by its source column (text), as in the training files."""
    derived = {d.name for d in data.derive}
    sources = list(dict.fromkeys(d.source for d in data.derive))
    out = [f for f in fields if str(f.name) not in derived and str(f.name) not in sources]
    return out + [FieldConfig(name=s, kind="categorical") for s in sources]


def frame_probs(predictor: Predictor, rows: list[dict[str, Any]]) -> np.ndarray:
    """Probabilities of validated rows through ``Predictor.predict_proba`` (the ``deepfm predict`` path)."""
    cfg = predictor.config
    fields = request_fields(cfg.fields, cfg.data)
    frame = build_frame(rows, fields, cfg.data.multi_value_separator, cfg.data.weight_separator)
    _check_numeric_text(frame, fields)
    try:
        return predictor.predict_proba(frame)
    except DataError as err:
        row = None if err.line is None else err.line - 1
        raise RequestError(422, [ErrorItem(row, err.field, err.reason)]) from None


# ------------------------------------------------------------------------------------- the fast path
class FastEncoder:
    """A few rows of plain values -> probabilities through ``RecordEncoder`` (no polars per-call overhead)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.records = RecordEncoder(predictor.loaded.encoder)
        enc = predictor.loaded.encoder
        self.numeric_names = {str(f.name) for f in enc.fields if f.kind == "numeric"}
        self.multi_names = {str(f.name) for f in enc.multi_fields}
        # derived columns (data.derive) are computed by the batch encoder only
        self.enabled = not predictor.config.data.derive

    def eligible(self, rows: list[dict[str, Any]]) -> bool:
        """Numbers for numeric fields and lists for multi-valued ones; text forms take the batch path."""
        if not self.enabled:
            return False
        for r in rows:
            for name, v in r.items():
                if name in self.numeric_names and isinstance(v, str):
                    return False
                if name in self.multi_names and isinstance(v, str):
                    return False
        return True

    def encode(self, rows: list[dict[str, Any]]):
        plain = [{k: ((v.tags, v.weights) if isinstance(v, Multi) else v) for k, v in r.items()} for r in rows]
        return self.records.encode(plain)

    @torch.no_grad()
    def probs(self, rows: list[dict[str, Any]]) -> np.ndarray:
        p = self.predictor
        cat, num, multi = self.encode(rows)
        inp = make_input(cat, num, multi).to(p.device)
        with autocast(p.device, p.precision):
            logits = p.loaded.model(*inp.tensors()).float()
        return sigmoid(logits.double().cpu().numpy())
