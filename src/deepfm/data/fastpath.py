"""The fast path of preparation for CSV/TSV files: one typed, dictionary-encoded parse per file.

The general path (``readers`` + ``Encoder``) reads every cell as text, then validates, counts and looks up
values with polars expressions, so each categorical value is hashed twice per row (counting, lookup). Here
pyarrow parses numeric columns straight to float64 and categorical columns to dictionary-encoded strings,
so the text of each cell is hashed once, inside the parser; vocabularies are then counted with
``np.bincount`` over the dictionary indices, and ids are looked up once per distinct value, not per row.

It yields exactly the vocabularies and arrays of the general path (the tests compare them), reusing the
encoder's own expressions for validation, bucketing and scaling. It applies only where it can be exact:
CSV/TSV, categorical and numeric fields, no ``data.split`` / ``group_column`` / ``skip_bad_rows`` / ``derive``,
files up to ``FAST_BELOW_FILE_BYTES``. Anything else it meets -- a malformed row, a value that is not a finite
float32, a label other than 0/1 -- raises ``Unsupported`` and preparation runs the general path, which
names the file, line and field of the bad value.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from deepfm.config import Config
from deepfm.data.encoder import MISSING, EncodedChunk, Encoder, bucket_int_expr
from deepfm.data.readers import RawChunk, delimited_columns
from deepfm.errors import DataError

FAST_BELOW_FILE_BYTES = 256 << 20
BLOCK_BYTES = 2 << 20  # blocks of a few MB keep both cores parsing


class Unsupported(Exception):
    """The fast path cannot give the general path's exact result for this data: use the general path."""


def why_not(cfg: Config) -> str | None:
    """Why the fast path does not apply to this configuration (None: it applies)."""
    d = cfg.data
    if d.format not in ("csv", "tsv"):
        return f"format {d.format}"
    if d.split is not None or d.group_column is not None or d.skip_bad_rows:
        return "data.split, data.group_column or data.skip_bad_rows is set"
    if any(f.kind == "multi" for f in cfg.fields):
        return "multi-valued fields"
    if d.derive:
        return "data.derive is set"
    for path in (d.train, d.valid, d.test):
        if path is not None and os.path.getsize(path) > FAST_BELOW_FILE_BYTES:
            return f"{path} is larger than {FAST_BELOW_FILE_BYTES >> 20} MB"
    return None


class _Column:
    """One field of a file as (distinct tokens, index of each row's token)."""

    def __init__(self, tokens: pl.Series, index: np.ndarray) -> None:
        self.tokens, self.index = tokens, index

    def counts(self) -> np.ndarray:
        return np.bincount(self.index, minlength=len(self.tokens))


def _read(path: str, cfg: Config, encoder: Encoder, labels: bool) -> pa.Table:
    data = cfg.data
    cat = [str(f.name) for f in encoder.fields if f.kind == "categorical"]
    num = [str(f.name) for f in encoder.fields if f.kind == "numeric"]
    wanted = ([data.label] if labels else []) + cat + num
    try:
        names, header_lines, sep = delimited_columns(path, data, wanted)
    except DataError as err:
        raise Unsupported(str(err)) from None
    types = {c: pa.dictionary(pa.int32(), pa.string()) for c in cat}
    types.update({c: pa.float64() for c in num + ([data.label] if labels else [])})
    invalid = []

    def on_invalid(_row: pacsv.InvalidRow) -> str:
        invalid.append(1)
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES, column_names=names, skip_rows=header_lines),
            parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid, ignore_empty_lines=True,
                                             quote_char='"' if sep == "," else False),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=wanted, null_values=[""],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise Unsupported(f"{path}: {err}") from None
    if invalid or table.num_rows == 0:
        raise Unsupported(f"{path}: malformed or no rows")
    return table.unify_dictionaries()


def _columns(table: pa.Table, encoder: Encoder, numbers: pl.DataFrame) -> dict[str, _Column]:
    """Every categorical and log-bucketed field of ``table`` as a ``_Column``."""
    out: dict[str, _Column] = {}
    for f in encoder.cat_fields:
        name = str(f.name)
        if f.kind == "categorical":
            col = table[name]
            tokens = pl.Series(col.chunk(0).dictionary, dtype=pl.Utf8)
            index = np.concatenate([_indices(c) for c in col.chunks])
            out[name] = _Column(tokens, index)
        else:  # log_bucket: the encoder's own bucketing, then integers -> tokens without a per-row string
            b = numbers.select(bucket_int_expr(encoder._number_expr(_chunk(numbers), f)))[:, 0]
            present = b.is_not_null().to_numpy()
            v = b.fill_null(0).to_numpy()
            if present.any():
                lo, hi = int(v[present].min()), int(v[present].max())
            else:
                lo = hi = 0
            if hi - lo < 1 << 20:
                index = np.where(present, v - lo, hi - lo + 1)
                used = np.flatnonzero(np.bincount(index, minlength=hi - lo + 2))
                remap = np.zeros(hi - lo + 2, np.int64)
                remap[used] = np.arange(len(used))
                index = remap[index]
                tokens = [str(lo + u) if u <= hi - lo else MISSING for u in used]
            else:
                uniq, inverse = np.unique(v[present], return_inverse=True)
                index = np.full(len(v), len(uniq), dtype=np.int64)
                index[present] = inverse
                tokens = [str(u) for u in uniq] + ([MISSING] if not present.all() else [])
            out[name] = _Column(pl.Series(tokens, dtype=pl.Utf8), index.astype(np.int64))
    return out


def _indices(chunk: pa.DictionaryArray) -> np.ndarray:
    """The int32 dictionary indices of a chunk, read from its buffer (no nulls: cells are never null here)."""
    idx = chunk.indices
    return np.frombuffer(idx.buffers()[1], dtype=np.int32, count=len(idx), offset=idx.offset * 4)


def _chunk(frame: pl.DataFrame) -> RawChunk:
    return RawChunk("<fast path>", frame, np.arange(1, frame.height + 1, dtype=np.int64), 0)


def _numbers(table: pa.Table, encoder: Encoder, labels: bool) -> pl.DataFrame:
    """Label and numeric columns as float64 polars columns, validated by the encoder's own checks."""
    keep = ([encoder.data.label] if labels else []) + [str(f.name) for f in encoder.fields if f.kind == "numeric"]
    frame = pl.from_arrow(table.select(keep)) if keep else pl.DataFrame()
    assert isinstance(frame, pl.DataFrame)
    try:
        encoder._drop_bad(_chunk(frame), None, check_label=labels)
    except DataError as err:  # the general path reports it with its line
        raise Unsupported(str(err)) from None
    return frame


def fit(cfg: Config, encoder: Encoder) -> tuple[pa.Table, pl.DataFrame, dict[str, _Column]]:
    """Fit ``encoder`` on the training file; returns what ``encode`` needs to encode that file again."""
    table = _read(cfg.data.train, cfg, encoder, labels=True)
    numbers = _numbers(table, encoder, labels=True)
    columns = _columns(table, encoder, numbers)
    counters = encoder.counters()
    for f in encoder.cat_fields:
        col = columns[str(f.name)]
        counters[f.vocab_name].add_counts(col.tokens, col.counts())
    sums: dict[str, list] = {}
    encoder.accumulate_moments(_chunk(numbers), sums)
    encoder.vocabularies_ = {name: c.build() for name, c in counters.items()}
    encoder.fit_numeric(sums)
    return table, numbers, columns


def encode(encoder: Encoder, table: pa.Table, numbers: pl.DataFrame,
           columns: dict[str, _Column]) -> EncodedChunk:
    vocabs = encoder.fitted_state()[0]
    n = table.num_rows
    id_dtype = np.int32 if encoder.layout().num_rows < 2**31 else np.int64
    cat_t = np.empty((len(encoder.cat_fields), n), dtype=id_dtype)  # field-major: each field fills a row
    for j, f in enumerate(encoder.cat_fields):
        col, vocab = columns[str(f.name)], vocabs[f.vocab_name]
        ids = vocab.encode(col.tokens).astype(id_dtype)  # once per distinct value
        np.take(ids, col.index, out=cat_t[j])
    cat = np.ascontiguousarray(cat_t.T)
    exprs = encoder.numeric_exprs(_chunk(numbers))
    values = numbers.select(exprs) if exprs else None
    num = np.empty((n, len(encoder.num_fields)), dtype=np.float32)
    for j in range(len(encoder.num_fields)):
        num[:, j] = values[f"n{j}"].to_numpy()  # type: ignore[index]
    label = encoder.data.label
    labels = numbers[label].to_numpy().astype(np.float32) if label in numbers.columns else None
    return EncodedChunk(labels, cat, num, [], np.ones(n, dtype=bool))


def encode_file(path: str, cfg: Config, encoder: Encoder) -> EncodedChunk:
    table = _read(path, cfg, encoder, labels=True)
    numbers = _numbers(table, encoder, labels=True)
    return encode(encoder, table, numbers, _columns(table, encoder, numbers))
