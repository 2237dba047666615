"""Codecs: one per field kind, the only code that knows what a kind of field means.

A codec owns, for its kind: which raw values are valid (and the message when one is not), the rule that turns a
value into a vocabulary token or a number, the state fitted on the training split and its JSON form, and how
the field is described (``inspect``, ``/v1/model``, export). The engines drive the codecs and never ask a
field's kind:

- the columnar engine (``deepfm.data.encoder.Encoder``: train, evaluate, predict, and the fast CSV/TSV
  preparation in ``deepfm.data.fastpath``) asks each codec for polars expressions over a chunk's columns;
- the per-record engine (``deepfm.data.records.RecordEncoder``: the server at small batches) asks each codec
  for the same rule applied to one plain Python value.

Where the two engines must agree, both executions of a rule sit next to each other in the codec (e.g.
``LogBucketCodec.token_expr`` and ``LogBucketCodec.record_token``); the tests hold them equal on random values.

A codec feeds one *slot* of the model input: ``id`` (one vocabulary id per row: categorical fields and
log-bucketed numbers), ``value`` (one float per row, scaling the field's embedding: numeric ``scale``,
``standardize``, ``minmax``) or ``bag`` (weighted tags: multi-valued fields). The slot, not the kind, decides
where the engines put a codec's output.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from deepfm.config import CategoricalField, FieldConfig, MultiField, NumericField
from deepfm.errors import DataError

MISSING = ""  # the token of a missing cell: a token like any other (it gets an id when frequent enough)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest number a numeric cell may hold


# --------------------------------------------------------------------------------------------- plain values
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


def number_problem(v: int | float) -> str | None:
    """Why a JSON number cannot be a numeric value (None: it can). The rule of ``_bad_number_expr``."""
    try:
        f = float(v)
    except OverflowError:
        return "number out of range"
    if not math.isfinite(f):
        return "must be a finite number"
    if abs(f) > FLOAT32_MAX:
        return f"number out of range (|x| > {FLOAT32_MAX:.9g}, the float32 maximum)"
    return None


# The JSON schemas of request values say exactly what ``request_value`` accepts (the per-model OpenAPI
# document is built from them): numbers within float32, and numeric text of a form that cannot leave it
# (at most 29 digits before the point and a positive exponent of one digit: under 1e38).
NUMBER_SCHEMA = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
NUMERIC_TEXT = r"^ *([+-]?([0-9]{1,29}(\.[0-9]*)?|\.[0-9]+)([eE](\+?[0-9]|-[0-9]+))?)? *$"
_NUMERIC_TEXT = re.compile(NUMERIC_TEXT)


def float_token(v: float) -> str:
    """The category text of a float: integral values as their integer text (as a Parquet float id column is
    read), others as polars writes the float."""
    if math.isfinite(v) and v == int(v) and abs(v) < 2.0 ** 63:
        return str(int(v))
    return str(pl.Series([v], dtype=pl.Float64).cast(pl.Utf8)[0])


def _float_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Numbers (Float64) from a text or numeric column; an empty cell is missing (null)."""
    if dtype == pl.Utf8:
        return col.str.strip_chars().replace("", None).cast(pl.Float64, strict=False)
    return col.cast(pl.Float64, strict=False)


def _bad_number_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where a value was given but is not a finite number that fits a float32 (NaN and inf included)."""
    parsed = _float_expr(col, dtype)
    given = (col.str.strip_chars().fill_null("") != "") if dtype == pl.Utf8 else col.is_not_null()
    return given & (parsed.is_null() | ~(parsed.abs() <= FLOAT32_MAX).fill_null(False))


def label_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The label as Float64 (0/1 when valid)."""
    return _float_expr(col, dtype)


def bad_label_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    return ~_float_expr(col, dtype).is_in([0.0, 1.0]).fill_null(False)


def weight_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A sample weight (``data.weight_column``) as Float64."""
    return _float_expr(col, dtype)


def bad_weight_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where a sample weight is missing or not a finite number in [0, the float32 maximum]: a weight is
    stored as float32, and one negative, NaN or infinite weight would make every loss and metric it enters
    meaningless."""
    w = _float_expr(col, dtype)
    return ~((w >= 0.0) & (w <= FLOAT32_MAX) & ~w.is_nan()).fill_null(False)


BAD_WEIGHT = "is not a sample weight (data.weight_column: a finite number >= 0)"


@dataclass(frozen=True)
class Check:
    """A validation of one column: ``bad`` is True on rows whose value is unusable, ``reason`` says why."""

    column: str
    bad: pl.Expr
    reason: str


# --------------------------------------------------------------------------------------------- base classes
class Codec:
    """The rules of one field. Subclasses set ``slot`` (see the module docstring) and ``source``: what the
    raw column holds, ``"text"`` (categories, tags) or ``"number"``, so that an engine can parse it typed."""

    slot: ClassVar[str]
    source: ClassVar[str]

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

    def plain(self, v: Any) -> bool:
        """Whether a normalised request value can take the per-record engine (else the columnar one)."""
        return True

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


# --------------------------------------------------------------------------------------------- categorical
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

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):
            return v, None
        if _is_number(v):
            problem = number_problem(v)
            if problem:
                return None, problem
            try:
                return (str(v) if isinstance(v, int) else float_token(v)), None
            except ValueError:
                return None, "integer too long"
        return None, f"a categorical field takes a string (or a number), got {_type_name(v)}"

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        return pl.Series(self.name, values, dtype=pl.Utf8), []

    def request_schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, NUMBER_SCHEMA, {"type": "null"}],
                "description": "a category: text, or a number (an integral one is its integer text)"}


# --------------------------------------------------------------------------------------------- numeric
class _Numeric:
    """What every numeric transform shares: parsing, validation and ``log1p``."""

    spec: NumericField
    name: str

    def number_expr(self, col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
        v = _float_expr(col, dtype)
        return (v.clip(lower_bound=0.0) + 1.0).log() if self.spec.log1p else v

    def record_number(self, v: float) -> float:
        return math.log(max(v, 0.0) + 1.0) if self.spec.log1p else v

    def checks(self, dtype: pl.DataType) -> list[Check]:
        return [Check(self.name, _bad_number_expr(pl.col(self.name), dtype), "is not a finite number")]

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):  # numeric text: parsed by the columnar engine, as in a CSV file
            if _NUMERIC_TEXT.fullmatch(v) is None:
                return None, (f"numeric text {v[:40]!r} is not a decimal number within float32 (like '17', "
                              "'-0.5' or '2.5e-3': at most 29 digits before the point, exponent at most 9); "
                              "send larger values as JSON numbers")
            return v, None
        if _is_number(v):
            problem = number_problem(v)
            return (None, problem) if problem else (float(v), None)
        return None, f"a numeric field takes a number or a numeric string, got {_type_name(v)}"

    def plain(self, v: Any) -> bool:
        return not isinstance(v, str)

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


# --------------------------------------------------------------------------------------------- multi-valued
class Multi:
    """A validated multi-valued request cell given as a list: tags (text) and weights (float)."""

    __slots__ = ("tags", "weights", "weighted")

    def __init__(self, tags: list[str], weights: list[float], weighted: bool) -> None:
        self.tags, self.weights, self.weighted = tags, weights, weighted


def _tag_text(t: Any) -> str | None:
    if isinstance(t, str):
        return t
    if isinstance(t, int) and not isinstance(t, bool):
        try:
            return str(t)
        except ValueError:
            return None
    return None


class MultiCodec(Codec):
    """Tags with weights, pooled by the combiner (the model's job): ``a:1.0^b:0.5`` as text (weights default
    to 1), or a list column of tags or of (tag, weight) structs. ``max_len`` keeps the first tags of a cell."""

    slot = "bag"
    source = "text"
    spec: MultiField

    def long_form(self, col: pl.Series, sep: str, wsep: str, path: str, lines: np.ndarray
                  ) -> tuple[np.ndarray, pl.Series, np.ndarray]:
        """The cells of ``col`` as (row index int64 [nnz], tags, weights float64 [nnz]); a weight that is not a
        number is a ``DataError`` naming ``path`` and the line."""
        if col.dtype == pl.Null:  # a column of missing cells only (e.g. all-null Parquet): no tags
            col = col.cast(pl.Utf8)
        frame = pl.DataFrame({"cell": col, "row": np.arange(len(col), dtype=np.int64)})
        if col.dtype == pl.Utf8:
            long = (frame.with_columns(pl.col("cell").fill_null("").str.split(sep)).explode("cell")
                    .filter(pl.col("cell").is_not_null() & (pl.col("cell") != "")))
            # "tag:w" splits at the last weight separator; a piece without one has weight 1
            cell = pl.col("cell")
            if (long.select(cell.str.count_matches(wsep, literal=True).max()).item() or 0) <= 1:
                parts = cell.str.split_exact(wsep, 1)  # at most one separator: no regex needed
                tag, wtxt = parts.struct.field("field_0"), parts.struct.field("field_1").fill_null("1")
            else:
                pattern = f"(?s)^(.*){re.escape(wsep)}([^{re.escape(wsep)}]*)$"  # (?s): a tag may hold a newline
                has_w = cell.str.contains(wsep, literal=True)
                tag = pl.when(has_w).then(cell.str.extract(pattern, 1)).otherwise(cell)
                wtxt = pl.when(has_w).then(cell.str.extract(pattern, 2)).otherwise(pl.lit("1"))
            long = long.select("row", tag.alias("tag"), wtxt.alias("wtxt"))
            long = long.with_columns(pl.col("wtxt").cast(pl.Float64, strict=False).alias("w"))
            bad = long.filter(pl.col("w").is_null() | pl.col("w").is_nan())
            if bad.height:
                r = bad.row(0, named=True)
                raise DataError(f"weight '{r['wtxt']}' of tag '{r['tag']}' is not a number",
                                path=path, line=int(lines[r["row"]]), field=self.name)
        elif isinstance(col.dtype, pl.List):
            long = frame.explode("cell").filter(pl.col("cell").is_not_null())
            inner = col.dtype.inner
            if isinstance(inner, pl.Struct):
                names = [fld.name for fld in inner.fields]
                if len(names) != 2:
                    raise DataError("a list-of-struct multi-valued column needs two fields (tag, weight)",
                                    path=path, field=self.name)
                long = long.select("row", pl.col("cell").struct.field(names[0]).cast(pl.Utf8).alias("tag"),
                                   pl.col("cell").struct.field(names[1]).cast(pl.Float64).alias("w"))
            else:
                long = long.select("row", pl.col("cell").cast(pl.Utf8).alias("tag"), pl.lit(1.0).alias("w"))
        else:
            raise DataError(f"a multi-valued field needs a text or list column, found {col.dtype}",
                            path=path, field=self.name)
        rows = long["row"].to_numpy().astype(np.int64)
        tags, weights = long["tag"].fill_null(MISSING), long["w"].to_numpy().astype(np.float64)
        if self.spec.max_len is not None and len(rows):
            # rows ascend: a tag's rank within its cell is its position minus the cell's first position
            first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
            rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
            keep = rank < self.spec.max_len
            rows, tags, weights = rows[keep], tags.filter(pl.Series(keep)), weights[keep]
        return rows, tags, weights

    def record_bag(self, cell: Multi | None) -> tuple[list[str], list[float]]:
        """``long_form`` of one list cell: its first ``max_len`` tags and their weights."""
        if cell is None:
            return [], []
        k = len(cell.tags) if self.spec.max_len is None else min(len(cell.tags), self.spec.max_len)
        return list(cell.tags[:k]), list(cell.weights[:k])

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):
            return v, None
        if not isinstance(v, list):
            return None, ("a multi-valued field takes a list of tags, a list of [tag, weight] pairs or the "
                          f"text form 'a:1.0^b', got {_type_name(v)}")
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
                problem = number_problem(w)
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

    def plain(self, v: Any) -> bool:
        return not isinstance(v, str)

    def request_schema(self) -> dict[str, Any]:
        tag = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
        pair = {"type": "array", "prefixItems": [tag, NUMBER_SCHEMA], "minItems": 2, "maxItems": 2}
        return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [*tag["anyOf"], pair]}},
                          {"type": "null"}],
                "description": "tags: a list of tags or [tag, weight] pairs, or the text form 'a:1.0^b'"}

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        problems: list[tuple[int, str]] = []
        if any(isinstance(v, str) for v in values):  # text form somewhere: write list cells as text too
            cells: list[str | None] = []
            for i, v in enumerate(values):
                if isinstance(v, Multi):
                    bad = [t for t in v.tags if sep in t]
                    if bad:
                        problems.append((i, f"tag {bad[0]!r} contains the separator {sep!r}: when other rows "
                                            "use the text form, send tags without it"))
                    cells.append(sep.join(f"{t}{wsep}{w!r}" for t, w in zip(v.tags, v.weights)))
                else:
                    cells.append(v)
            return pl.Series(self.name, cells, dtype=pl.Utf8), problems
        if any(isinstance(v, Multi) and v.weighted for v in values):
            dtype = pl.List(pl.Struct({"tag": pl.Utf8, "weight": pl.Float64}))
            return pl.Series(self.name, [None if v is None else [{"tag": t, "weight": w}
                                                                 for t, w in zip(v.tags, v.weights)]
                                         for v in values], dtype=dtype), problems
        return pl.Series(self.name, [None if v is None else v.tags for v in values], dtype=pl.List(pl.Utf8)), problems

    def _describe(self) -> dict[str, Any]:
        return {"combiner": self.spec.combiner, "max_len": self.spec.max_len}


# --------------------------------------------------------------------------------------------- registry
NUMERIC_CODECS: dict[str, type[Codec]] = {
    "log_bucket": LogBucketCodec, "scale": ScaleCodec, "standardize": StandardizeCodec, "minmax": MinMaxCodec}


def codec_for(spec: FieldConfig) -> Codec:
    """The codec of one (expanded) field config."""
    if isinstance(spec, NumericField):
        return NUMERIC_CODECS[spec.numeric](spec)
    if isinstance(spec, MultiField):
        return MultiCodec(spec)
    assert isinstance(spec, CategoricalField), spec
    return CategoricalCodec(spec)
