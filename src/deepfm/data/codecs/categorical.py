"""Categorical fields: any text (or integer) value is a token."""

from __future__ import annotations

from typing import Any

import polars as pl

from deepfm.data.codecs.base import IdCodec
from deepfm.data.codecs.values import MISSING, NUMBER_SCHEMA, float_token, is_number, number_problem, type_name

_TEXT_TYPES = frozenset({str, type(None)})


class CategoricalCodec(IdCodec):
    source = "text"

    def token_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        if dtype == pl.Utf8:
            return col.fill_null(MISSING)
        if dtype.is_float():
            # a float id column (Parquet): an integral value keeps its integer text, cell by cell (float_token)
            integral = col.cast(pl.Int64, strict=False).cast(pl.Utf8)
            return pl.when(col == col.floor()).then(integral).otherwise(col.cast(pl.Utf8)).fill_null(MISSING)
        return col.cast(pl.Utf8).fill_null(MISSING)

    def record_token(self, v: Any) -> str:
        return MISSING if v is None else v

    def record_tokens(self, values: list[Any]) -> list[str]:
        return [MISSING if v is None else v for v in values] if None in values else values

    def request_values(self, values: list[Any]) -> list[Any] | None:
        return values if set(map(type, values)) <= _TEXT_TYPES else None

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):
            return v, None
        if is_number(v):
            problem = number_problem(v)
            if problem:
                return None, problem
            try:
                return (str(v) if isinstance(v, int) else float_token(v)), None
            except ValueError:
                return None, "integer too long"
        return None, f"a categorical field takes a string (or a number), got {type_name(v)}"

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        return pl.Series(self.name, values, dtype=pl.Utf8), []

    def request_schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, NUMBER_SCHEMA, {"type": "null"}],
                "description": "a category: text, or a number (an integral one is its integer text)"}
