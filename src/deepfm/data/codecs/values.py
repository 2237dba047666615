"""The rules for plain values every codec shares: what a missing cell is, which numbers a numeric cell may hold
(float32), how a float becomes a category token, and the label and sample-weight columns' rules."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import polars as pl


MISSING = ""  # the token of a missing cell: a token like any other (it gets an id when frequent enough)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest number a numeric cell may hold


def type_name(v: Any) -> str:
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


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number_problem(v: int | float) -> str | None:
    """Why a JSON number cannot be a numeric value (None: it can). The rule of ``bad_number_expr``."""
    try:
        f = float(v)
    except OverflowError:
        return "number out of range"
    if not math.isfinite(f):
        return "must be a finite number"
    if abs(f) > FLOAT32_MAX:
        return f"number out of range (|x| > {FLOAT32_MAX:.9g}, the float32 maximum)"
    return None


_NUMBER_TYPES = frozenset({int, float, type(None)})


def numbers_ok(values: list[Any]) -> bool:
    """``number_problem`` over a whole request column at once: True when every value is None (missing) or a
    JSON number that has no problem; False when some value is anything else, which a caller then checks value
    by value (for its message). ``np.array`` converts an int as ``float()`` does and None to NaN."""
    types = set(map(type, values))
    if not types <= _NUMBER_TYPES:
        return False
    try:
        a = np.array(values, dtype=np.float64)
    except (OverflowError, TypeError, ValueError):
        return False
    ok = np.abs(a) <= FLOAT32_MAX  # False on NaN and the infinities
    if ok.all():
        return True
    return type(None) in types and all(values[i] is None for i in np.flatnonzero(~ok).tolist())


# The JSON schemas of request values say exactly what ``request_value`` accepts (the per-model OpenAPI
# document is built from them): numbers within float32, and numeric text of a form that cannot leave it
# (at most 29 digits before the point and a positive exponent of one digit: under 1e38).
NUMBER_SCHEMA = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
NUMERIC_TEXT = r"^ *([+-]?([0-9]{1,29}(\.[0-9]*)?|\.[0-9]+)([eE](\+?[0-9]|-[0-9]+))?)? *$"
NUMERIC_TEXT_PATTERN = re.compile(NUMERIC_TEXT)


def float_token(v: float) -> str:
    """The category text of a float: integral values as their integer text (as a Parquet float id column is
    read), others as polars writes the float."""
    if math.isfinite(v) and v == int(v) and abs(v) < 2.0 ** 63:
        return str(int(v))
    return str(pl.Series([v], dtype=pl.Float64).cast(pl.Utf8)[0])


def float_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Numbers (Float64) from a text or numeric column; an empty cell is missing (null)."""
    if dtype == pl.Utf8:
        return col.str.strip_chars().replace("", None).cast(pl.Float64, strict=False)
    return col.cast(pl.Float64, strict=False)


def bad_number_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where a value was given but is not a finite number that fits a float32 (NaN and inf included)."""
    parsed = float_expr(col, dtype)
    given = (col.str.strip_chars().fill_null("") != "") if dtype == pl.Utf8 else col.is_not_null()
    return given & (parsed.is_null() | ~(parsed.abs() <= FLOAT32_MAX).fill_null(False))


def label_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The label as Float64 (0/1 when valid)."""
    return float_expr(col, dtype)


def bad_label_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    return ~float_expr(col, dtype).is_in([0.0, 1.0]).fill_null(False)


def weight_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A sample weight (``data.weight_column``) as Float64."""
    return float_expr(col, dtype)


def bad_weight_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where a sample weight is missing or not a finite number in [0, the float32 maximum]: a weight is
    stored as float32, and one negative, NaN or infinite weight would make every loss and metric it enters
    meaningless."""
    w = float_expr(col, dtype)
    return ~((w >= 0.0) & (w <= FLOAT32_MAX) & ~w.is_nan()).fill_null(False)


BAD_WEIGHT = "is not a sample weight (data.weight_column: a finite number >= 0)"
