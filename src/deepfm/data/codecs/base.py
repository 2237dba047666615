"""What every codec is (``Codec``) and the two single-value slots: ``IdCodec`` (a vocabulary token per row) and
``ValueCodec`` (a float per row). ``Check`` is one column's validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from deepfm.config import FieldConfig


@dataclass(frozen=True)
class Check:
    """A validation of one column: ``bad`` is True on rows whose value is unusable, ``reason`` says why."""

    column: str
    bad: pl.Expr
    reason: str


class Codec:
    """The rules of one field. Subclasses set ``slot`` (see the module docstring) and ``source``: what the
    raw column holds, ``"text"`` (categories, tags) or ``"number"``, so that an engine can parse it typed."""

    slot: ClassVar[str]
    source: ClassVar[str]
    text_form: ClassVar[bool] = False  # a request's text value is a form only the columnar engine parses

    def __init__(self, spec: FieldConfig) -> None:
        self.spec = spec
        self.name = str(spec.name)

    @property
    def vocab_name(self) -> str | None:
        return self.spec.vocab_name if self.spec.uses_vocab else None

    def vocab_settings(self) -> tuple[int, int | None, int | None]:
        """``(min_count, hash_buckets, max_size)`` of the field's vocabulary."""
        return self.spec.min_count, self.spec.hash_buckets, self.spec.max_size

    def checks(self, dtype: pl.DataType) -> list[Check]:
        """Row validations of the raw column (columnar engine)."""
        return []

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        """A JSON value of a request -> ``(normalised value, problem)``; the normalised value is plain
        (see ``plain``) or the text form, which only the columnar engine reads."""
        raise NotImplementedError

    def request_values(self, values: list[Any]) -> list[Any] | None:
        """``request_value`` of a whole request column (None = missing) in one go, for requests of many rows:
        the normalised values when every value is of the field's usual kind and has no problem, else None
        (the caller then checks value by value, for the messages). Default: always value by value."""
        return None

    def plain(self, v: Any) -> bool:
        """Whether a normalised request value can take the per-record engine (else the columnar one): a text
        form (``text_form``: numeric text, the multi-valued text form) cannot."""
        return not (self.text_form and isinstance(v, str))

    def plain_column(self, values: list[Any]) -> bool:
        """``plain`` of every value of a column, by their types."""
        return not self.text_form or not any(issubclass(t, str) for t in set(map(type, values)))

    def request_schema(self) -> dict[str, Any]:
        """The JSON schema of the values ``request_value`` takes (null always means missing)."""
        raise NotImplementedError

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        """Normalised request values of this field -> a raw column for the columnar engine, with
        ``(row, problem)`` for values that cannot be written so."""
        raise NotImplementedError

    def describe(self, vocab_size: int | None) -> dict[str, Any]:
        """The field as ``inspect``, ``/v1/model`` and export show it."""
        out: dict[str, Any] = {"name": self.name, "kind": self.spec.kind}
        out.update(self._describe())
        if self.vocab_name is not None:
            out.update(vocab=self.vocab_name, vocab_size=vocab_size)
        return out

    def _describe(self) -> dict[str, Any]:
        return {}


class IdCodec(Codec):
    """One vocabulary token per row."""

    slot = "id"

    def token_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        """The token (text) of each cell; missing -> ``MISSING``."""
        raise NotImplementedError

    def record_token(self, v: Any) -> str:
        """``token_expr`` for one plain value (None = missing)."""
        raise NotImplementedError

    def record_tokens(self, values: list[Any]) -> list[str]:
        """``record_token`` of each value of a column."""
        return [self.record_token(v) for v in values]

    def record_int_tokens(self, values: list[Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """For a codec whose tokens are integers (``int_token_expr``): ``record_token`` of each plain value of
        a column as ``(int64 tokens, missing mask)``, the token of a missing row being ``MISSING``; None if
        the codec has no integer form."""
        return None

    def int_token_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        """For a codec whose ``source`` is a number: the token as Int64 (null if missing), whose text is
        ``token_expr``'s, so that an engine can count integers instead of strings."""
        raise NotImplementedError


class ValueCodec(Codec):
    """One float per row (the field's embedding times the value); NaN marks a missing value, which uses the
    field's own "missing" row. Statistics fitted on the training split live in a plain dict (its JSON form)."""

    slot = "value"
    source = "number"
    needs_stats: ClassVar[bool] = False  # a streamed engine must fit before it can encode

    def stat_exprs(self, v: pl.Expr) -> list[tuple[str, pl.Expr, str]]:
        """Aggregations over the training values: ``(key, expression, combine)``, combine in sum/min/max."""
        return []

    def fit_stats(self, acc: dict[str, float]) -> dict[str, float] | None:
        """The fitted state from the combined aggregations (None: the codec keeps no state)."""
        return None

    def value_expr(self, col: pl.Expr, dtype: pl.DataType, stats: dict[str, float] | None) -> pl.Expr:
        """Float32 values, NaN where missing."""
        raise NotImplementedError

    def record_value(self, v: float | None, stats: dict[str, float] | None) -> float:
        raise NotImplementedError
