"""Numeric fields: log-bucketed into tokens (``log_bucket``) or a value that scales the field's embedding
(``scale``, ``standardize``, ``minmax``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import NumericField
from deepfm.data.codecs.base import Check, IdCodec, ValueCodec
from deepfm.data.codecs.values import (MISSING, NUMBER_SCHEMA, NUMERIC_TEXT, NUMERIC_TEXT_PATTERN, bad_number_expr,
                                       float_expr, is_number, number_problem, numbers_ok, type_name)


class _Numeric:
    """What every numeric transform shares: parsing, validation and ``log1p``."""

    spec: NumericField
    name: str
    text_form = True  # numeric text, parsed as in a CSV file

    def number_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        v = float_expr(col, dtype)
        return (v.clip(lower_bound=0.0) + 1.0).log() if self.spec.log1p else v

    def record_number(self, v: float) -> float:
        return math.log(max(v, 0.0) + 1.0) if self.spec.log1p else v

    def checks(self, dtype: pl.DataType) -> list[Check]:
        return [Check(self.name, bad_number_expr(pl.col(self.name), dtype), "is not a finite number")]

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):  # numeric text: parsed by the columnar engine, as in a CSV file
            if NUMERIC_TEXT_PATTERN.fullmatch(v) is None:
                return None, (f"numeric text {v[:40]!r} is not a decimal number within float32 (like '17', "
                              "'-0.5' or '2.5e-3': at most 29 digits before the point, exponent at most 9); "
                              "send larger values as JSON numbers")
            return v, None
        if is_number(v):
            problem = number_problem(v)
            return (None, problem) if problem else (float(v), None)
        return None, f"a numeric field takes a number or a numeric string, got {type_name(v)}"

    def request_values(self, values: list[Any]) -> list[Any] | None:
        if not numbers_ok(values):
            return None
        return values if int not in set(map(type, values)) else [v if v is None else float(v) for v in values]

    def request_schema(self) -> dict[str, Any]:
        return {"anyOf": [NUMBER_SCHEMA, {"type": "string", "pattern": NUMERIC_TEXT,
                                          "description": "numeric text, as in a CSV file ('' is missing)"},
                          {"type": "null"}]}

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        if any(isinstance(v, str) for v in values):  # numeric text somewhere: the column is text, like a CSV
            return pl.Series(self.name, [v if v is None or isinstance(v, str) else repr(v) for v in values],
                             dtype=pl.Utf8), []
        return pl.Series(self.name, values, dtype=pl.Float64), []

    def _describe(self) -> dict[str, Any]:
        return {"numeric": self.spec.numeric, "log1p": self.spec.log1p}


class LogBucketCodec(_Numeric, IdCodec):
    """``floor(ln(x)^2)`` for ``x > 2``, else ``int(x)``, as a token: the Criteo winners' / BARS bucketing."""

    source = "number"

    def int_token_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        values = self.number_expr(col, dtype)
        return pl.when(values > 2).then((values.log() ** 2).floor()).otherwise(values).cast(pl.Int64, strict=False)

    def token_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        return self.int_token_expr(col, dtype).cast(pl.Utf8).fill_null(MISSING)

    def record_token(self, v: Any) -> str:
        if v is None:
            return MISSING
        x = self.record_number(float(v))
        b = math.floor(math.log(x) ** 2) if x > 2 else x
        if not math.isfinite(b) or not (-(2.0 ** 63) <= b < 2.0 ** 63):
            return MISSING
        return str(int(b))

    def record_int_tokens(self, values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``record_token`` over a column in numpy. numpy's ``log`` may differ from libm's (``math.log``,
        polars) in the last bit, which moves ``floor`` only where ``ln(x)^2`` is within rounding of an integer:
        there (|distance| < 1e-6, far above any rounding) the value takes ``record_token`` itself."""
        x = np.array(values, dtype=np.float64)  # None (missing) -> NaN; ints as float() converts them
        missing = np.isnan(x)
        if self.spec.log1p:  # log1p's own rounding decides ``x > 2``: per value, exactly as record_number
            x = np.array([math.nan if m else self.record_number(v) for v, m in zip(x.tolist(), missing.tolist())])
        b = x.copy()
        big = np.flatnonzero(x > 2)
        z = np.log(x[big]) ** 2
        b[big] = np.floor(z)
        near = np.abs(z - np.rint(z)) < 1e-6
        for i in big[near].tolist():
            b[i] = float(self.record_token(values[i]))
        valid = ~missing & (b >= -(2.0 ** 63)) & (b < 2.0 ** 63)
        tokens = np.zeros(len(b), dtype=np.int64)
        tokens[valid] = b[valid].astype(np.int64)  # truncates toward zero, as int() and polars' cast
        return tokens, ~valid


class ScaleCodec(_Numeric, ValueCodec):
    """The paper's numeric field: its embedding (and first-order weight) times the value."""

    def value_expr(self, col: pl.Expr, dtype: pl.DataType, stats: dict[str, float] | None) -> pl.Expr:
        return self._finish(self.number_expr(col, dtype), stats)

    def record_value(self, v: float | None, stats: dict[str, float] | None) -> float:
        return math.nan if v is None else self._apply(self.record_number(float(v)), stats)

    def _finish(self, v: pl.Expr, stats: dict[str, float] | None) -> pl.Expr:
        return self._transform_expr(v, stats).cast(pl.Float32).fill_null(float("nan"))

    def _transform_expr(self, v: pl.Expr, stats: dict[str, float] | None) -> pl.Expr:
        return v

    def _apply(self, x: float, stats: dict[str, float] | None) -> float:
        return x


class StandardizeCodec(ScaleCodec):
    """``(x - mean) / std`` with mean and std of the training split (std 1 when constant), then scaled."""

    needs_stats = True

    def stat_exprs(self, v: pl.Expr) -> list[tuple[str, pl.Expr, str]]:
        return [("s", v.sum(), "sum"), ("ss", (v * v).sum(), "sum"), ("n", v.count(), "sum")]

    def fit_stats(self, acc: dict[str, float]) -> dict[str, float]:
        s, ss, n = acc.get("s", 0.0), acc.get("ss", 0.0), acc.get("n", 0)
        mean = s / n if n else 0.0
        var = max(ss / n - mean * mean, 0.0) if n else 1.0
        return {"mean": mean, "std": math.sqrt(var) if var > 0 else 1.0}

    def _transform_expr(self, v: pl.Expr, stats: dict[str, float] | None) -> pl.Expr:
        assert stats is not None
        return (v - stats["mean"]) / stats["std"]

    def _apply(self, x: float, stats: dict[str, float] | None) -> float:
        assert stats is not None
        return (x - stats["mean"]) / stats["std"]


class MinMaxCodec(ScaleCodec):
    """``(x - min) / (max - min)`` with min and max of the training split, clipped to [0, 1] (values outside
    the training range are held at its ends), then scaled; a constant field maps to 0."""

    needs_stats = True

    def stat_exprs(self, v: pl.Expr) -> list[tuple[str, pl.Expr, str]]:
        return [("min", v.min(), "min"), ("max", v.max(), "max")]

    def fit_stats(self, acc: dict[str, float]) -> dict[str, float]:
        lo, hi = acc.get("min"), acc.get("max")
        if lo is None or hi is None:  # no value in training: every value maps to 0
            return {"min": 0.0, "max": 0.0}
        return {"min": float(lo), "max": float(hi)}

    def _transform_expr(self, v: pl.Expr, stats: dict[str, float] | None) -> pl.Expr:
        assert stats is not None
        span = stats["max"] - stats["min"]
        if span <= 0:
            return pl.when(v.is_null()).then(None).otherwise(pl.lit(0.0))
        return ((v - stats["min"]) / span).clip(0.0, 1.0)

    def _apply(self, x: float, stats: dict[str, float] | None) -> float:
        assert stats is not None
        span = stats["max"] - stats["min"]
        return 0.0 if span <= 0 else min(max((x - stats["min"]) / span, 0.0), 1.0)
