"""The encoder: raw columns -> typed model inputs. One piece of code for preparation, predict and serve.

``Encoder.fit`` streams the training split once to fit vocabularies (with min count) and the value codecs'
statistics; ``Encoder.transform`` turns a chunk of raw rows into an ``EncodedChunk`` of numpy arrays:

    labels      float32 [N]          0/1 (None when the data has no label column)
    weights     float32 [N]          sample weights from ``data.weight_column`` (only when asked: preparation)
    cat_ids     int64   [N, Fc]      local ids of categorical (and log-bucketed numeric) fields (int32 from
                                     the fast path of preparation)
    num_values  float32 [N, Fn]      scaled numeric fields; NaN marks a missing value
    multi       per multi-valued field: ids int64 [nnz], weights float32 [nnz], lengths int64 [N]

Everything is vectorised over the chunk with polars; a bad value raises ``DataError`` naming the file, the
line and the field, or, under ``skip_bad_rows``, drops the row and reports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import DataConfig, FieldConfig
from deepfm.data.batch import EncodedChunk, MultiValues  # noqa: F401 (re-exported)
from deepfm.data.codecs import BAD_WEIGHT, MISSING, Check, Codec, IdCodec, MultiCodec, ValueCodec, bad_label_expr, \
    bad_weight_expr, codec_for, label_expr, weight_expr
from deepfm.data.readers import BadRows, RawChunk
from deepfm.data.vocab import Vocabulary, VocabularyCounter
from deepfm.errors import DataError
from deepfm.layout import TableLayout

Stats = dict[str, dict[str, float]]  # fitted state of the value codecs, by field name


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
    """Fitted state (vocabularies, value statistics) plus the columnar engine that applies the codecs.

    It knows fields only through their codecs (``deepfm.data.codecs``) and files not at all: it reads the
    columns of ``RawChunk``s, whoever made them. From the data config it keeps what belongs to the fields:
    the label column, the sample-weight column, the multi-value separators and the derived columns.
    """

    def __init__(self, fields: list[FieldConfig], data: DataConfig,
                 vocabularies: dict[str, Vocabulary] | None = None, numeric: Stats | None = None,
                 parent: Encoder | None = None) -> None:
        self.fields = list(fields)
        self.label = data.label
        self.weight_column = data.weight_column
        self.multi_value_separator, self.weight_separator = data.multi_value_separator, data.weight_separator
        self.derive = tuple(data.derive)
        self.codecs: list[Codec] = [codec_for(f) for f in self.fields]
        self.id_codecs: list[IdCodec] = [c for c in self.codecs if isinstance(c, IdCodec)]
        self.value_codecs: list[ValueCodec] = [c for c in self.codecs if isinstance(c, ValueCodec)]
        self.bag_codecs: list[MultiCodec] = [c for c in self.codecs if isinstance(c, MultiCodec)]
        self.vocabularies_ = vocabularies
        self.numeric_ = numeric
        # fitting grows the parent's vocabularies and keeps its statistics (a model trained further on new data)
        self.parent = parent

    # ---------------------------------------------------------------- fitting
    def fit(self, chunks: Iterable[RawChunk], bad: BadRows | None = None) -> Encoder:
        counters = self.counters()
        acc: dict[str, dict[str, Any]] = {}
        rows = 0
        for chunk in chunks:
            chunk, _ = self.validate(chunk, bad, check_weight=True)  # fit on the rows that encoding keeps
            rows += len(chunk)
            self.count(chunk, counters)
            self.accumulate_stats(chunk, acc)
        if rows == 0:
            raise DataError("the training split has no rows to fit vocabularies on")
        self.set_fitted(counters, acc)
        return self

    def counters(self) -> dict[str, VocabularyCounter]:
        """One empty counter per vocabulary (fields sharing a vocabulary share its counter)."""
        counters: dict[str, VocabularyCounter] = {}
        for c in self.id_codecs + self.bag_codecs:
            assert c.vocab_name is not None
            counters.setdefault(c.vocab_name, VocabularyCounter(c.vocab_name, *c.vocab_settings()))
        return counters

    def count(self, chunk: RawChunk, counters: dict[str, VocabularyCounter]) -> None:
        """Add the tokens of a (validated) chunk to the vocabulary counters."""
        tokens = self._token_frame(chunk, self.id_codecs)
        for c in self.id_codecs:
            counters[str(c.vocab_name)].update(tokens[c.name])
        for c in self.bag_codecs:
            _, tags, _ = self._long_form(chunk, c)
            counters[str(c.vocab_name)].update(tags)

    def accumulate_stats(self, chunk: RawChunk, acc: dict[str, dict[str, Any]]) -> None:
        """Fold a (validated) chunk into the value codecs' running aggregations (``acc``, by field name)."""
        fold_stats(acc, self.chunk_stats(chunk))

    def chunk_stats(self, chunk: RawChunk) -> list[tuple[str, str, str, Any]]:
        """A (validated) chunk's aggregations: (field, key, how: sum | min | max, value). Folded in chunk order
        (``fold_stats``) they give the statistics, bit for bit, whichever process computed each chunk's."""
        specs = [(c, key, expr, how) for c in self.value_codecs
                 for key, expr, how in c.stat_exprs(c.number_expr(pl.col(c.name), self._dtype(chunk, c.name)))]
        if not specs:
            return []
        row = chunk.frame.select(expr.alias(f"{c.name}__{key}") for c, key, expr, _ in specs).row(0)
        return [(c.name, key, how, value) for (c, key, _, how), value in zip(specs, row, strict=True)]

    def set_fitted(self, counters: dict[str, VocabularyCounter], acc: dict[str, dict[str, Any]]) -> None:
        """Build the vocabularies from their counters and the value codecs' statistics from their aggregations;
        with a ``parent``, grow its vocabularies instead and keep its statistics (the meaning of a value must not
        change under weights that learnt it)."""
        if self.parent is None:
            self.vocabularies_ = {name: c.build() for name, c in counters.items()}
            stats = {c.name: c.fit_stats(acc.get(c.name, {})) for c in self.value_codecs}
            self.numeric_ = {name: s for name, s in stats.items() if s is not None}
            return
        parent_vocabs, parent_stats = self.parent.fitted_state()
        self.vocabularies_ = {name: counter.grow(parent_vocabs[name]) for name, counter in counters.items()}
        self.numeric_ = {k: dict(v) for k, v in parent_stats.items()}

    @property
    def needs_stats(self) -> bool:
        """Whether a value must be fitted on the whole training split before any row can be encoded."""
        return any(c.needs_stats for c in self.value_codecs)

    # ---------------------------------------------------------------- layout
    def layout(self) -> TableLayout:
        vocabs = self._fitted()[0]
        blocks: dict[str, tuple[int, int]] = {}
        row = 0
        for c in self.id_codecs + self.bag_codecs:
            name = str(c.vocab_name)
            if name not in blocks:
                blocks[name] = (row, vocabs[name].size)
                row += vocabs[name].size
        num_offsets = []
        for _ in self.value_codecs:
            num_offsets.append(row)
            row += 2  # the value row and the "missing" row
        return TableLayout(
            num_rows=row,
            cat_fields=tuple(c.name for c in self.id_codecs),
            cat_offsets=tuple(blocks[str(c.vocab_name)][0] for c in self.id_codecs),
            num_fields=tuple(c.name for c in self.value_codecs),
            num_offsets=tuple(num_offsets),
            multi_fields=tuple(c.name for c in self.bag_codecs),
            multi_offsets=tuple(blocks[str(c.vocab_name)][0] for c in self.bag_codecs),
            multi_combiners=tuple(c.spec.combiner for c in self.bag_codecs),
            vocab_blocks=blocks,
        )

    def describe(self) -> list[dict[str, Any]]:
        """Every field as its codec describes it (kind, transform, vocabulary and its size)."""
        vocabs = self._fitted()[0]
        return [c.describe(vocabs[c.vocab_name].size if c.vocab_name is not None else None) for c in self.codecs]

    # ---------------------------------------------------------------- transform
    def transform(self, chunk: RawChunk, *, labels: bool = True, weights: bool = False,
                  bad: BadRows | None = None) -> EncodedChunk:
        """Encode a raw chunk. ``labels=False`` for data without a label column (predict, serve);
        ``weights=True`` reads ``data.weight_column`` too, when set (preparation: a file to score may lack it)."""
        vocabs, _ = self._fitted()
        weights = weights and self.weight_column is not None
        chunk, kept = self.validate(chunk, bad, check_label=labels, check_weight=weights)
        n = len(chunk)
        label_arr = self._labels(chunk) if labels else None
        weight_arr = self._weights(chunk) if weights else None
        # one select for every field: polars evaluates the columns in parallel
        cat = np.empty((n, len(self.id_codecs)), dtype=np.int64)
        looked_up = [(j, c) for j, c in enumerate(self.id_codecs) if not vocabs[str(c.vocab_name)].hash_buckets]
        hashed = [(j, c) for j, c in enumerate(self.id_codecs) if vocabs[str(c.vocab_name)].hash_buckets]
        exprs = [vocabs[str(c.vocab_name)].lookup_expr(self._token_expr(chunk, c)).alias(f"c{j}")
                 for j, c in looked_up]
        exprs += self.value_exprs(chunk)
        encoded = chunk.frame.select(exprs) if exprs else pl.DataFrame()
        for j, _ in looked_up:
            cat[:, j] = encoded[f"c{j}"].to_numpy()
        if hashed:
            tokens = self._token_frame(chunk, [c for _, c in hashed])
            for j, c in hashed:
                cat[:, j] = vocabs[str(c.vocab_name)].encode(tokens[c.name])
        num = np.empty((n, len(self.value_codecs)), dtype=np.float32)
        for j in range(len(self.value_codecs)):
            num[:, j] = encoded[f"n{j}"].to_numpy()
        multi = []
        for c in self.bag_codecs:
            rows, tags, weights = self._long_form(chunk, c)
            ids = vocabs[str(c.vocab_name)].encode(tags)
            lengths = np.bincount(rows, minlength=n).astype(np.int64) if len(rows) else np.zeros(n, np.int64)
            multi.append(MultiValues(ids.astype(np.int64), weights.astype(np.float32), lengths))
        return EncodedChunk(label_arr, cat, num, multi, kept, weight_arr)

    def value_exprs(self, chunk: RawChunk, stats: Stats | None = None) -> list[pl.Expr]:
        """Expressions ``n0, n1, ...``: the values of the value codecs (float32, NaN if missing). ``stats``
        defaults to the fitted ones."""
        stats = self._fitted()[1] if stats is None else stats
        return [c.value_expr(pl.col(c.name), self._dtype(chunk, c.name), stats.get(c.name)).alias(f"n{j}")
                for j, c in enumerate(self.value_codecs)]

    # ---------------------------------------------------------------- helpers
    def fitted_state(self) -> tuple[dict[str, Vocabulary], Stats]:
        """The fitted vocabularies (by vocabulary name) and value statistics (by field name)."""
        return self._fitted()

    def _fitted(self) -> tuple[dict[str, Vocabulary], Stats]:
        if self.vocabularies_ is None or self.numeric_ is None:
            raise RuntimeError("Encoder is not fitted: call fit() or load one with Encoder.load()")
        return self.vocabularies_, self.numeric_

    def _column(self, chunk: RawChunk, name: str) -> pl.Series:
        if name not in chunk.frame.columns:
            raise DataError(f"column '{name}' is missing; columns are {chunk.frame.columns}",
                            path=chunk.path, field=name)
        return chunk.frame[name]

    def _dtype(self, chunk: RawChunk, name: str) -> pl.DataType:
        return self._column(chunk, name).dtype

    def _token_expr(self, chunk: RawChunk, c: IdCodec) -> pl.Expr:
        return c.token_expr(pl.col(c.name), self._dtype(chunk, c.name))

    def _token_frame(self, chunk: RawChunk, codecs: list[IdCodec]) -> pl.DataFrame:
        if not codecs:
            return pl.DataFrame()
        return chunk.frame.select(self._token_expr(chunk, c).alias(c.name) for c in codecs)

    def _labels(self, chunk: RawChunk) -> np.ndarray:
        col = self._column(chunk, self.label)
        return col.to_frame("v").select(label_expr(pl.col("v"), col.dtype))["v"].to_numpy().astype(np.float32)

    def _weights(self, chunk: RawChunk) -> np.ndarray:
        col = self._column(chunk, str(self.weight_column))
        return col.to_frame("v").select(weight_expr(pl.col("v"), col.dtype))["v"].to_numpy().astype(np.float32)

    def _long_form(self, chunk: RawChunk, c: MultiCodec) -> tuple[np.ndarray, pl.Series, np.ndarray]:
        return c.long_form(self._column(chunk, c.name), self.multi_value_separator, self.weight_separator,
                           chunk.path, chunk.lines)

    def long_form_of(self, c: MultiCodec, cells: pl.Series) -> tuple[np.ndarray, pl.Series, np.ndarray]:
        """``c``'s long form of loose cells (an error's line is the cell's 1-based position)."""
        return c.long_form(cells, self.multi_value_separator, self.weight_separator, "<cells>",
                           np.arange(1, len(cells) + 1, dtype=np.int64))

    def validate(self, chunk: RawChunk, bad: BadRows | None, check_label: bool = True,
                 codecs: list[Codec] | None = None, check_weight: bool = False) -> tuple[RawChunk, np.ndarray]:
        """Check labels, sample weights (``check_weight``, when ``data.weight_column`` is set) and the values of
        ``codecs`` (default: all); raise on the first bad row, or drop and report bad rows. Returns the kept
        rows (with the derived columns added) and the mask of kept rows."""
        if chunk.absent_is_missing:  # a sparse format leaves out the columns a row has no value for
            absent = [pl.lit(None, pl.Utf8).alias(c.name) for c in self.codecs
                      if c.name not in chunk.frame.columns and c.name not in {d.name for d in self.derive}]
            if absent:
                chunk = RawChunk(chunk.path, chunk.frame.with_columns(absent), chunk.lines, chunk.row_start, True)
        n = len(chunk)
        checks: list[Check] = []
        if check_label:
            label = self.label
            checks.append(Check(label, bad_label_expr(pl.col(label), self._dtype(chunk, label)),
                                "label must be 0 or 1"))
        if check_weight and self.weight_column is not None:
            weight = self.weight_column
            checks.append(Check(weight, bad_weight_expr(pl.col(weight), self._dtype(chunk, weight)), BAD_WEIGHT))
        derived = {d.name for d in self.derive}  # computed below from their checked sources
        for c in self.codecs if codecs is None else codecs:
            if c.name not in derived:
                checks += c.checks(self._dtype(chunk, c.name))
        for source in dict.fromkeys(d.source for d in self.derive):
            bad_expr, _ = _derive_exprs(pl.col(source), self._dtype(chunk, source))
            checks.append(Check(source, bad_expr, "is not a YYMMDDHH timestamp"))
        problems: list[tuple[np.ndarray, str, str]] = []
        if checks:
            flags = chunk.frame.select(ch.bad.alias(f"_{k}") for k, ch in enumerate(checks))
            any_bad = flags.select(pl.all().any()).row(0)
            problems = [(flags[f"_{k}"].to_numpy(), ch.column, ch.reason)
                        for k, ch in enumerate(checks) if any_bad[k]]
        kept = np.ones(n, dtype=bool)
        if not problems:
            return self._derive(chunk), kept
        if bad is None:
            first = min(int(np.argmax(m)) for m, _, _ in problems)
            for m, name, reason in problems:
                if m[first]:
                    value = self._column(chunk, name)[first]
                    raise DataError(f"value {value!r} {reason}" if name != self.label or not check_label
                                    else f"{reason}, found {value!r}",
                                    path=chunk.path, line=int(chunk.lines[first]), field=name)
        assert bad is not None
        for m, name, reason in problems:
            for i in np.nonzero(m & kept)[0]:
                bad.add(chunk.path, int(chunk.lines[i]), f"field '{name}': {reason}",
                        json.dumps(chunk.frame.row(int(i)), default=str))
            kept &= ~m
        frame = chunk.frame.filter(pl.Series(kept))
        return self._derive(RawChunk(chunk.path, frame, chunk.lines[kept], chunk.row_start,
                                     chunk.absent_is_missing)), kept

    def _derive(self, chunk: RawChunk) -> RawChunk:
        """Add (or replace) the ``data.derive`` columns, all computed from the raw columns."""
        if not self.derive:
            return chunk
        exprs = [_derive_exprs(pl.col(d.source), self._dtype(chunk, d.source))[1][d.fn].alias(d.name)
                 for d in self.derive]
        return RawChunk(chunk.path, chunk.frame.with_columns(exprs), chunk.lines, chunk.row_start,
                        chunk.absent_is_missing)

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        vocabs, stats = self._fitted()
        return {"vocabularies": {k: v.to_json() for k, v in vocabs.items()},
                "numeric": {k: dict(s) for k, s in stats.items()}}

    @classmethod
    def from_json(cls, fields: list[FieldConfig], data: DataConfig, obj: dict) -> Encoder:
        vocabs = {k: Vocabulary.from_json(k, v) for k, v in obj["vocabularies"].items()}
        stats = {k: {sk: float(sv) for sk, sv in v.items()} for k, v in obj["numeric"].items()}
        return cls(fields, data, vocabs, stats)


def fold_stats(acc: dict[str, dict[str, Any]], stats: list[tuple[str, str, str, Any]]) -> None:
    """Fold one chunk's aggregations (``Encoder.chunk_stats``) into ``acc``."""
    for name, key, how, value in stats:
        field_acc = acc.setdefault(name, {})
        if value is None:
            continue
        old = field_acc.get(key)
        field_acc[key] = value if old is None else {"sum": old + value, "min": min(old, value),
                                                    "max": max(old, value)}[how]
