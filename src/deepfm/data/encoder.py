"""The encoder: raw columns -> typed model inputs. One piece of code for preparation, predict and serve.

``Encoder.fit`` streams the training split once to fit vocabularies (with min count) and numeric
statistics; ``Encoder.transform`` turns a chunk of raw rows into an ``EncodedChunk`` of numpy arrays:

    labels      float32 [N]          0/1 (None when the data has no label column)
    cat_ids     int64   [N, Fc]      local ids of categorical (and log-bucketed numeric) fields (int32 from
                                     the fast path of preparation)
    num_values  float32 [N, Fn]      scaled numeric fields; NaN marks a missing value
    multi       per multi-valued field: ids int64 [nnz], weights float32 [nnz], lengths int64 [N]

Everything is vectorised over the chunk with polars; a bad value raises ``DataError`` naming the file, the
line and the field, or, under ``skip_bad_rows``, drops the row and reports it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl

from deepfm.config import DataConfig, FieldConfig
from deepfm.data.readers import BadRows, RawChunk
from deepfm.data.vocab import Vocabulary, VocabularyCounter
from deepfm.errors import DataError
from deepfm.layout import TableLayout

MISSING = ""


@dataclass
class MultiValues:
    ids: np.ndarray  # int64 [nnz]
    weights: np.ndarray  # float32 [nnz]
    lengths: np.ndarray  # int64 [N]


@dataclass
class EncodedChunk:
    labels: np.ndarray | None
    cat_ids: np.ndarray
    num_values: np.ndarray
    multi: list[MultiValues]
    kept: np.ndarray  # bool [N_raw]: rows of the raw chunk that were encoded (all True unless skipping)

    def __len__(self) -> int:
        return int(self.cat_ids.shape[0])


@dataclass
class NumericStats:
    mean: float
    std: float


def _as_float(col: pl.Series) -> pl.Series:
    return pl.DataFrame({"v": col}).select(_float_expr(pl.col("v"), col.dtype))["v"]


def _float_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Numbers from a text or numeric column; an empty cell is missing (null)."""
    if dtype == pl.Utf8:
        return col.str.strip_chars().replace("", None).cast(pl.Float64, strict=False)
    return col.cast(pl.Float64, strict=False)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bad_number_expr(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where a value was given but is not a finite number that fits a float32 (NaN and inf included)."""
    parsed = _float_expr(col, dtype)
    given = (col.str.strip_chars().fill_null("") != "") if dtype == pl.Utf8 else col.is_not_null()
    return given & (parsed.is_null() | ~(parsed.abs() <= FLOAT32_MAX).fill_null(False))


def bucket_int_expr(values: pl.Expr) -> pl.Expr:
    """The Criteo winners' / BARS numeric bucketing: floor(ln(x)^2) for x > 2, else int(x) (Int64; null if missing)."""
    return pl.when(values > 2).then((values.log() ** 2).floor()).otherwise(values).cast(pl.Int64, strict=False)


def _bucket_expr(values: pl.Expr) -> pl.Expr:
    """The bucket's vocabulary token: its integer as text; missing -> ''."""
    return bucket_int_expr(values).cast(pl.Utf8).fill_null(MISSING)


def _bucket(values: pl.Series) -> pl.Series:
    return pl.DataFrame({"v": values}).select(_bucket_expr(pl.col("v")))["v"]


def _derive_exprs(source: pl.Expr, dtype: pl.DataType) -> tuple[pl.Expr, dict[str, pl.Expr]]:
    """From a YYMMDDHH column: (bad-value flag, {fn: token expression}); a missing cell gives ''."""
    text = (source if dtype == pl.Utf8 else source.cast(pl.Utf8)).fill_null("")
    day = pl.concat_str([pl.lit("20"), text.str.slice(0, 6)]).str.strptime(pl.Date, "%Y%m%d", strict=False)
    hour = text.str.slice(6, 2).cast(pl.Int64, strict=False)
    ok = text.str.contains(r"^\d{8}$") & day.is_not_null() & hour.is_between(0, 23)
    weekday = day.dt.weekday() % 7  # polars: Monday 1 .. Sunday 7 -> %w: Sunday 0 .. Saturday 6
    tokens = {"hour_of_day": hour.cast(pl.Utf8), "weekday": weekday.cast(pl.Utf8),
              "weekend": pl.when(weekday.is_in([0, 6])).then(pl.lit("1")).otherwise(pl.lit("0"))}
    return (text != "") & ~ok.fill_null(False), {k: pl.when(ok).then(v).otherwise(pl.lit(MISSING))
                                                 for k, v in tokens.items()}


class Encoder:
    """Fitted state (vocabularies, numeric statistics) plus the code that applies it."""

    def __init__(self, fields: list[FieldConfig], data: DataConfig,
                 vocabularies: dict[str, Vocabulary] | None = None,
                 numeric: dict[str, NumericStats] | None = None) -> None:
        self.fields = fields
        self.data = data
        self.cat_fields = [f for f in fields if f.kind == "categorical"
                           or (f.kind == "numeric" and f.numeric == "log_bucket")]
        self.num_fields = [f for f in fields if f.is_scaled_numeric]
        self.multi_fields = [f for f in fields if f.kind == "multi"]
        self.vocabularies_ = vocabularies
        self.numeric_ = numeric

    # ---------------------------------------------------------------- fitting
    @property
    def input_columns(self) -> list[str]:
        return [str(f.name) for f in self.fields]

    def fit(self, chunks: Iterable[RawChunk], bad: BadRows | None = None) -> Encoder:
        counters = self.counters()
        sums = {str(f.name): [0.0, 0.0, 0] for f in self.num_fields if f.numeric == "standardize"}
        rows = 0
        for chunk in chunks:
            chunk, _ = self._drop_bad(chunk, bad)
            rows += len(chunk)
            tokens = self._token_frame(chunk, self.cat_fields)
            for f in self.cat_fields:
                counters[f.vocab_name].update(tokens[str(f.name)])
            for f in self.multi_fields:
                _, tags, _ = self._multi_long(chunk, f)
                counters[f.vocab_name].update(tags)
            self.accumulate_moments(chunk, sums)
        if rows == 0:
            raise DataError("the training split has no rows to fit vocabularies on")
        self.vocabularies_ = {name: c.build() for name, c in counters.items()}
        self.fit_numeric(sums)
        return self

    def counters(self) -> dict[str, VocabularyCounter]:
        """One empty counter per vocabulary (fields sharing a vocabulary share its counter)."""
        counters: dict[str, VocabularyCounter] = {}
        for f in self.cat_fields + self.multi_fields:
            counters.setdefault(f.vocab_name, VocabularyCounter(f.vocab_name, f.min_count, f.hash_buckets))
        return counters

    def _moment_exprs(self, chunk: RawChunk, f: FieldConfig) -> list[pl.Expr]:
        v = self._number_expr(chunk, f)
        name = str(f.name)
        return [v.sum().alias(f"{name}__s"), (v * v).sum().alias(f"{name}__ss"), v.count().alias(f"{name}__n")]

    # ---------------------------------------------------------------- layout
    def layout(self) -> TableLayout:
        vocabs = self._fitted()[0]
        blocks: dict[str, tuple[int, int]] = {}
        row = 0
        for f in self.cat_fields + self.multi_fields:
            if f.vocab_name not in blocks:
                blocks[f.vocab_name] = (row, vocabs[f.vocab_name].size)
                row += vocabs[f.vocab_name].size
        num_offsets = []
        for _ in self.num_fields:
            num_offsets.append(row)
            row += 2
        return TableLayout(
            num_rows=row,
            cat_fields=tuple(str(f.name) for f in self.cat_fields),
            cat_offsets=tuple(blocks[f.vocab_name][0] for f in self.cat_fields),
            num_fields=tuple(str(f.name) for f in self.num_fields),
            num_offsets=tuple(num_offsets),
            multi_fields=tuple(str(f.name) for f in self.multi_fields),
            multi_offsets=tuple(blocks[f.vocab_name][0] for f in self.multi_fields),
            multi_combiners=tuple(f.combiner for f in self.multi_fields),
            vocab_blocks=blocks,
        )

    # ---------------------------------------------------------------- transform
    def transform(self, chunk: RawChunk, *, labels: bool = True, bad: BadRows | None = None) -> EncodedChunk:
        """Encode a raw chunk. ``labels=False`` for data without a label column (predict, serve)."""
        vocabs, stats = self._fitted()
        chunk, kept = self._drop_bad(chunk, bad, check_label=labels)
        n = len(chunk)
        label_arr = self._labels(chunk) if labels else None
        # one select for every field: polars evaluates the columns in parallel
        cat = np.empty((n, len(self.cat_fields)), dtype=np.int64)
        looked_up = [(j, f) for j, f in enumerate(self.cat_fields) if not vocabs[f.vocab_name].hash_buckets]
        hashed = [(j, f) for j, f in enumerate(self.cat_fields) if vocabs[f.vocab_name].hash_buckets]
        exprs = [vocabs[f.vocab_name].lookup_expr(self._token_expr(chunk, f)).alias(f"c{j}") for j, f in looked_up]
        exprs += self.numeric_exprs(chunk)
        encoded = chunk.frame.select(exprs) if exprs else pl.DataFrame()
        for j, _ in looked_up:
            cat[:, j] = encoded[f"c{j}"].to_numpy()
        if hashed:
            tokens = self._token_frame(chunk, [f for _, f in hashed])
            for j, f in hashed:
                cat[:, j] = vocabs[f.vocab_name].encode(tokens[str(f.name)])
        num = np.empty((n, len(self.num_fields)), dtype=np.float32)
        for j in range(len(self.num_fields)):
            num[:, j] = encoded[f"n{j}"].to_numpy()
        multi = []
        for f in self.multi_fields:
            rows, tags, weights = self._multi_long(chunk, f)
            ids = vocabs[f.vocab_name].encode(tags)
            lengths = np.bincount(rows, minlength=n).astype(np.int64) if len(rows) else np.zeros(n, np.int64)
            multi.append(MultiValues(ids.astype(np.int64), weights.astype(np.float32), lengths))
        return EncodedChunk(label_arr, cat, num, multi, kept)

    def numeric_exprs(self, chunk: RawChunk, stats: dict[str, NumericStats] | None = None) -> list[pl.Expr]:
        """Expressions ``n0, n1, ...``: the values of the scaled numeric fields (float32, NaN if missing).
        ``stats`` defaults to the fitted ones (only ``standardize`` fields read them)."""
        stats = self._fitted()[1] if stats is None else stats
        exprs = []
        for j, f in enumerate(self.num_fields):
            v = self._number_expr(chunk, f)
            if f.numeric == "standardize":
                st = stats[str(f.name)]
                v = (v - st.mean) / st.std
            exprs.append(v.cast(pl.Float32).fill_null(float("nan")).alias(f"n{j}"))
        return exprs

    def fit_numeric(self, sums: dict[str, list]) -> None:
        """Numeric statistics from accumulated ``[sum, sum of squares, count]`` per standardized field."""
        self.numeric_ = {}
        for name, (s, ss, n) in sums.items():
            mean = s / n if n else 0.0
            var = max(ss / n - mean * mean, 0.0) if n else 1.0
            self.numeric_[name] = NumericStats(mean, math.sqrt(var) if var > 0 else 1.0)

    def accumulate_moments(self, chunk: RawChunk, sums: dict[str, list]) -> None:
        standardized = [f for f in self.num_fields if f.numeric == "standardize"]
        if not standardized:
            return
        stats = chunk.frame.select(e for f in standardized for e in self._moment_exprs(chunk, f)).row(0)
        for k, f in enumerate(standardized):
            acc = sums.setdefault(str(f.name), [0.0, 0.0, 0])
            acc[0] += stats[3 * k] or 0.0
            acc[1] += stats[3 * k + 1] or 0.0
            acc[2] += stats[3 * k + 2] or 0

    # ---------------------------------------------------------------- helpers
    def fitted_state(self) -> tuple[dict[str, Vocabulary], dict[str, NumericStats]]:
        """The fitted vocabularies (by vocabulary name) and numeric statistics (by field name)."""
        return self._fitted()

    def _fitted(self) -> tuple[dict[str, Vocabulary], dict[str, NumericStats]]:
        if self.vocabularies_ is None or self.numeric_ is None:
            raise RuntimeError("Encoder is not fitted: call fit() or load one with Encoder.load()")
        return self.vocabularies_, self.numeric_

    def _column(self, chunk: RawChunk, name: str) -> pl.Series:
        if name not in chunk.frame.columns:
            if self.data.format in ("libffm", "libsvm"):
                return pl.Series(name, [None] * len(chunk), dtype=pl.Utf8)
            raise DataError(f"column '{name}' is missing; columns are {chunk.frame.columns}",
                            path=chunk.path, field=name)
        return chunk.frame[name]

    def _dtype(self, chunk: RawChunk, name: str) -> pl.DataType:
        self._column(chunk, name)  # a clear error for a missing column
        return chunk.frame.schema[name]

    def _token_expr(self, chunk: RawChunk, f: FieldConfig) -> pl.Expr:
        """The vocabulary token (text) of each cell of a categorical or log-bucketed numeric field."""
        name = str(f.name)
        if f.kind == "numeric":  # log_bucket
            return _bucket_expr(self._number_expr(chunk, f))
        dtype = self._dtype(chunk, name)
        col = pl.col(name)
        if dtype == pl.Utf8:
            return col.fill_null(MISSING)
        if dtype.is_float():
            # a float id column (Parquet): an integral value keeps its integer text, cell by cell
            integral = col.cast(pl.Int64, strict=False).cast(pl.Utf8)
            return pl.when(col == col.floor()).then(integral).otherwise(col.cast(pl.Utf8)).fill_null(MISSING)
        return col.cast(pl.Utf8).fill_null(MISSING)

    def _token_frame(self, chunk: RawChunk, fields: list[FieldConfig]) -> pl.DataFrame:
        if not fields:
            return pl.DataFrame()
        return chunk.frame.select(self._token_expr(chunk, f).alias(str(f.name)) for f in fields)

    def _number_expr(self, chunk: RawChunk, f: FieldConfig) -> pl.Expr:
        name = str(f.name)
        v = _float_expr(pl.col(name), self._dtype(chunk, name))
        if f.log1p:
            v = (v.clip(lower_bound=0.0) + 1.0).log()
        return v

    def _labels(self, chunk: RawChunk) -> np.ndarray:
        v = _as_float(self._column(chunk, self.data.label))
        return v.to_numpy().astype(np.float32)

    def _multi_long(self, chunk: RawChunk, f: FieldConfig) -> tuple[np.ndarray, pl.Series, np.ndarray]:
        """Long form of a multi-valued field: (row index int64 [nnz], tags, weights float64 [nnz])."""
        col = self._column(chunk, str(f.name))
        frame = pl.DataFrame({"cell": col, "row": np.arange(len(col), dtype=np.int64)})
        if col.dtype == pl.Utf8:
            sep, wsep = self.data.multi_value_separator, self.data.weight_separator
            long = (frame.with_columns(pl.col("cell").fill_null("").str.split(sep)).explode("cell")
                    .filter(pl.col("cell").is_not_null() & (pl.col("cell") != "")))
            pattern = f"^(.*){re.escape(wsep)}([^{re.escape(wsep)}]*)$"
            has_w = long["cell"].str.contains(re.escape(wsep), literal=False)
            tag = pl.when(has_w).then(pl.col("cell").str.extract(pattern, 1)).otherwise(pl.col("cell"))
            wtxt = pl.when(has_w).then(pl.col("cell").str.extract(pattern, 2)).otherwise(pl.lit("1"))
            long = long.with_columns(has_w.alias("has_w")).select(
                "row", tag.alias("tag"), wtxt.alias("wtxt"))
            long = long.with_columns(pl.col("wtxt").cast(pl.Float64, strict=False).alias("w"))
            bad = long.filter(pl.col("w").is_null() | pl.col("w").is_nan())
            if bad.height:
                r = bad.row(0, named=True)
                raise DataError(f"weight '{r['wtxt']}' of tag '{r['tag']}' is not a number",
                                path=chunk.path, line=int(chunk.lines[r["row"]]), field=str(f.name))
        elif isinstance(col.dtype, pl.List):
            long = frame.explode("cell").filter(pl.col("cell").is_not_null())
            inner = col.dtype.inner
            if isinstance(inner, pl.Struct):
                names = [fld.name for fld in inner.fields]
                if len(names) != 2:
                    raise DataError("a list-of-struct multi-valued column needs two fields (tag, weight)",
                                    path=chunk.path, field=str(f.name))
                long = long.select("row", pl.col("cell").struct.field(names[0]).cast(pl.Utf8).alias("tag"),
                                   pl.col("cell").struct.field(names[1]).cast(pl.Float64).alias("w"))
            else:
                long = long.select("row", pl.col("cell").cast(pl.Utf8).alias("tag"), pl.lit(1.0).alias("w"))
        else:
            raise DataError(f"a multi-valued field needs a text or list column, found {col.dtype}",
                            path=chunk.path, field=str(f.name))
        if f.max_len is not None:
            long = long.filter(pl.int_range(pl.len()).over("row") < f.max_len)
        return (long["row"].to_numpy().astype(np.int64), long["tag"].fill_null(MISSING),
                long["w"].to_numpy().astype(np.float64))

    def _drop_bad(self, chunk: RawChunk, bad: BadRows | None,
                  check_label: bool = True) -> tuple[RawChunk, np.ndarray]:
        """Validate labels and numeric cells; raise on the first bad row, or drop and report bad rows."""
        n = len(chunk)
        checks: list[tuple[pl.Expr, str, str]] = []  # (bad-row expression, field, reason)
        if check_label:
            label = self.data.label
            parsed = _float_expr(pl.col(label), self._dtype(chunk, label))
            checks.append((~parsed.is_in([0.0, 1.0]).fill_null(False), label, "label must be 0 or 1"))
        for f in self.fields:
            if f.kind == "numeric":
                name = str(f.name)
                checks.append((_bad_number_expr(pl.col(name), self._dtype(chunk, name)), name,
                               "is not a finite number"))
        for source in dict.fromkeys(d.source for d in self.data.derive):
            bad_expr, _ = _derive_exprs(pl.col(source), self._dtype(chunk, source))
            checks.append((bad_expr, source, "is not a YYMMDDHH timestamp"))
        problems: list[tuple[np.ndarray, str, str]] = []
        if checks:
            flags = chunk.frame.select(e.alias(f"_{k}") for k, (e, _, _) in enumerate(checks))
            any_bad = flags.select(pl.all().any()).row(0)
            problems = [(flags[f"_{k}"].to_numpy(), name, reason)
                        for k, (_, name, reason) in enumerate(checks) if any_bad[k]]
        kept = np.ones(n, dtype=bool)
        if not problems:
            return self._derive(chunk), kept
        if bad is None:
            first = min(int(np.argmax(m)) for m, _, _ in problems)
            for m, name, reason in problems:
                if m[first]:
                    value = self._column(chunk, name)[first]
                    raise DataError(f"value {value!r} {reason}" if "label" not in reason
                                    else f"{reason}, found {value!r}",
                                    path=chunk.path, line=int(chunk.lines[first]), field=name)
        assert bad is not None
        for m, name, reason in problems:
            for i in np.nonzero(m & kept)[0]:
                bad.add(chunk.path, int(chunk.lines[i]), f"field '{name}': {reason}",
                        json.dumps(chunk.frame.row(int(i)), default=str))
            kept &= ~m
        frame = chunk.frame.filter(pl.Series(kept))
        return self._derive(RawChunk(chunk.path, frame, chunk.lines[kept], chunk.row_start)), kept

    def _derive(self, chunk: RawChunk) -> RawChunk:
        """Add (or replace) the ``data.derive`` columns, all computed from the raw columns."""
        if not self.data.derive:
            return chunk
        exprs = [_derive_exprs(pl.col(d.source), self._dtype(chunk, d.source))[1][d.fn].alias(d.name)
                 for d in self.data.derive]
        return RawChunk(chunk.path, chunk.frame.with_columns(exprs), chunk.lines, chunk.row_start)

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        vocabs, stats = self._fitted()
        return {"vocabularies": {k: v.to_json() for k, v in vocabs.items()},
                "numeric": {k: {"mean": s.mean, "std": s.std} for k, s in stats.items()}}

    @classmethod
    def from_json(cls, fields: list[FieldConfig], data: DataConfig, obj: dict) -> Encoder:
        vocabs = {k: Vocabulary.from_json(k, v) for k, v in obj["vocabularies"].items()}
        stats = {k: NumericStats(float(v["mean"]), float(v["std"])) for k, v in obj["numeric"].items()}
        return cls(fields, data, vocabs, stats)
