"""The fast path of preparation for CSV/TSV files: one typed, dictionary-encoded parse per file.

The general path (``readers`` + ``Encoder``) reads every cell as text, then validates, counts and looks up
values with polars expressions, so each categorical value is hashed twice per row (counting, lookup). Here
pyarrow parses numeric columns straight to float64 and categorical columns to dictionary-encoded strings,
so the text of each cell is hashed once, inside the parser; vocabularies are then counted with
``np.bincount`` over the dictionary indices, and ids are looked up once per distinct value, not per row.
Multi-valued cells are dictionary-encoded too: each distinct cell is split into tags and weights once, by
its codec, and rows gather their cell's tags.

It yields exactly the vocabularies and arrays of the general path (the tests compare them), driving the same
codecs for validation, bucketing and scaling. It applies only where it can be exact: CSV/TSV, no
``data.split`` / ``group_column`` / ``skip_bad_rows`` / ``derive`` / ``negative_sampling_rate``, and no fitted
numeric transform (``standardize``, ``minmax``) in a streamed file.
A file up to ``WHOLE_FILE_BYTES`` is parsed at once and encoded in memory; a larger one is streamed in chunks of
``CHUNK_ROWS`` rows: each token gets a provisional id in first-seen order (one hash join per chunk over its
distinct values; a multi-valued field's tags likewise), the training ids are written provisionally and renumbered
in place once the vocabularies are fitted. Anything else it meets -- a malformed row, a cell that is not valid
UTF-8 (text cells are parsed as bytes and their distinct values checked, so arrow never meets invalid text), a
line longer than a parse block, a value that is not a finite float32, a label other than 0/1, a bad sample weight
-- raises ``Unsupported`` and preparation runs the general path, which names the file, line and field of the bad
value.
A file in another ``data.encoding`` is transcoded while it streams (``readers.text_source``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from deepfm.config import Config
from deepfm.data.codecs import MISSING
from deepfm.data.encoder import EncodedChunk, Encoder, MultiValues
from deepfm.data import sources
from deepfm.data.inputs import SplitFiles, guarded, split_files
from deepfm.data.readers import RawChunk, delimited_columns, text_source
from deepfm.errors import DataError

WHOLE_FILE_BYTES = 256 << 20
CHUNK_ROWS = 1 << 20
BLOCK_BYTES = 2 << 20  # blocks of a few MB keep both cores parsing


class Unsupported(Exception):
    """The fast path cannot give the general path's exact result for this data: use the general path."""


def why_not(cfg: Config) -> str | None:
    """Why the fast path does not apply to this configuration (None: it applies)."""
    d = cfg.data
    if d.format not in ("csv", "tsv"):
        return f"format {d.format}"
    if d.split is not None or d.group_column is not None or d.skip_bad_rows or d.negative_sampling_rate < 1.0:
        return "data.split, data.group_column, data.skip_bad_rows or data.negative_sampling_rate is set"
    if d.derive:
        return "data.derive is set"
    return None


def why_not_files(files: SplitFiles) -> str | None:
    """Why the fast path does not apply to these input files (None: it applies)."""
    if any(f.partitions for fs in files.values() for f in fs):
        return "the inputs have partition folders (columns the fast path does not add)"
    return None


class _Column:
    """One field of a file as (distinct tokens, index of each row's token)."""

    def __init__(self, tokens: pl.Series, index: np.ndarray) -> None:
        self.tokens, self.index = tokens, index

    def counts(self) -> np.ndarray:
        return np.bincount(self.index, minlength=len(self.tokens))


class _Bags:
    """A multi-valued field of a file: its distinct cells parsed once by the codec (``long_form``) as tags
    with weights in CSR form (``offsets`` [D+1] over the parsed tags), each parsed tag as an index into the
    distinct tags (``tag_index`` into ``tags``: a tag's text is hashed once here, looked up once per distinct
    tag), and each row's cell (``index``)."""

    def __init__(self, codec: Any, encoder: Encoder, cells: pl.Series, index: np.ndarray) -> None:
        try:
            cell_of, parsed, weights = encoder.long_form_of(codec, cells)
        except DataError as err:  # a bad weight: the general path names its line
            raise Unsupported(f"field '{err.field}': {err.reason}") from None
        distinct = parsed.to_arrow().dictionary_encode()
        if isinstance(distinct, pa.ChunkedArray):
            distinct = distinct.combine_chunks()
        self.tags = pl.Series(distinct.dictionary, dtype=pl.Utf8)
        self.tag_index = np.asarray(distinct.indices, dtype=np.int64)
        self.weights = weights.astype(np.float32)
        self.offsets = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(np.bincount(cell_of, minlength=len(cells)), out=self.offsets[1:])
        self.index = index

    def tag_counts(self) -> np.ndarray:
        """How often each distinct tag occurs in the file (over rows, as the general path counts it)."""
        per_cell = np.bincount(self.index, minlength=len(self.offsets) - 1)
        return np.bincount(self.tag_index, weights=np.repeat(per_cell, np.diff(self.offsets)),
                           minlength=len(self.tags)).astype(np.int64)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tags as positions in the parsed tags (row after row), and each row's tag count."""
        starts, lengths = self.offsets[self.index], np.diff(self.offsets)[self.index]
        total = int(lengths.sum())
        first_out = np.cumsum(lengths) - lengths  # a row's first tag in the output
        return np.repeat(starts - first_out, lengths) + np.arange(total, dtype=np.int64), lengths.astype(np.int64)

    def rows(self, tag_ids: np.ndarray) -> MultiValues:
        """Every row's tags (ids from ``tag_ids``, one per distinct tag) and weights, row after row."""
        pos, lengths = self.positions()
        return MultiValues(tag_ids[self.tag_index[pos]], self.weights[pos], lengths)

    def provisional_rows(self, provisional: _Provisional) -> MultiValues:
        """``rows`` with provisional ids (first-seen order over the whole file), counting every tag."""
        pos, lengths = self.positions()
        ids = provisional.add(_Column(self.tags, self.tag_index[pos]))
        return MultiValues(ids, self.weights[pos], lengths)


def _tables(path: str, cfg: Config, encoder: Encoder) -> Iterator[pa.Table]:
    """The file as tables with one dictionary per categorical column: all of it at once up to
    ``WHOLE_FILE_BYTES``, else chunks of about ``CHUNK_ROWS`` rows."""
    data = cfg.data
    cat = [c.name for c in encoder.codecs if c.source == "text"]  # categories and tag lists: dictionaries
    num = [c.name for c in encoder.codecs if c.source == "number"]
    weight = [data.weight_column] if data.weight_column is not None else []
    wanted = [data.label] + weight + cat + num
    try:
        names, header_lines, sep = delimited_columns(path, data, wanted)
    except DataError as err:
        raise Unsupported(str(err)) from None
    # categorical cells as bytes: their distinct values are checked as UTF-8 once per table (_tokens)
    types = {c: pa.dictionary(pa.int32(), pa.binary()) for c in cat}
    types.update({c: pa.float64() for c in num + [data.label] + weight})
    invalid = []

    def on_invalid(_row: pacsv.InvalidRow) -> str:
        invalid.append(1)
        return "skip"

    options = {
        "read_options": pacsv.ReadOptions(block_size=BLOCK_BYTES, column_names=names, skip_rows=header_lines),
        "parse_options": pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid, ignore_empty_lines=True,
                                            quote_char='"' if sep == "," else False),
        "convert_options": pacsv.ConvertOptions(column_types=types, include_columns=wanted, null_values=[""],
                                                strings_can_be_null=False, quoted_strings_can_be_null=False)}
    rows = yielded = 0
    source = text_source(path, data.encoding)
    try:
        if sources.size_of(path) * (1 if sources.compression_of(path) is None else 8) <= WHOLE_FILE_BYTES:
            # a transcoding stream is read through open_csv (see readers.text_source)
            table = pacsv.read_csv(source, **options) if isinstance(source, str) else \
                pacsv.open_csv(source, **options).read_all()
            if invalid:
                raise Unsupported(f"{path}: malformed rows")
            rows = table.num_rows
            if rows:
                yield table.unify_dictionaries()
        else:
            pending: list[pa.RecordBatch] = []
            for batch in pacsv.open_csv(source, **options):
                if invalid:
                    raise Unsupported(f"{path}: malformed rows")
                pending.append(batch)
                rows += batch.num_rows
                if rows - yielded >= CHUNK_ROWS:
                    yield pa.Table.from_batches(pending).unify_dictionaries()
                    pending, yielded = [], rows
            if invalid:
                raise Unsupported(f"{path}: malformed rows")
            if pending:
                yield pa.Table.from_batches(pending).unify_dictionaries()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise Unsupported(f"{path}: {err}") from None
    finally:
        if not isinstance(source, str):
            source.close()
    if rows == 0:
        raise Unsupported(f"{path}: no rows")


class _Provisional:
    """A field's distinct tokens in first-seen order (provisional ids) and their counts, over chunks."""

    def __init__(self) -> None:
        self.known = pl.DataFrame(schema={"token": pl.Utf8, "pid": pl.Int64})
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, col: _Column) -> np.ndarray:
        """Provisional id (int32) of each row of ``col``."""
        joined = pl.DataFrame({"token": col.tokens}).join(self.known, on="token", how="left",
                                                          maintain_order="left")
        new = joined["pid"].is_null()
        pid = joined["pid"].fill_null(-1).to_numpy().astype(np.int32)
        n_new = int(new.sum())
        if n_new:
            start = self.known.height
            fresh = np.arange(start, start + n_new, dtype=np.int64)
            self.known = pl.concat([self.known, pl.DataFrame({"token": joined["token"].filter(new), "pid": fresh})])
            pid[new.to_numpy()] = fresh
        rows = pid[col.index]
        counts = np.bincount(rows, minlength=self.known.height)
        counts[: len(self.counts)] += self.counts
        self.counts = counts
        return rows


def _columns(table: pa.Table, encoder: Encoder, numbers: pl.DataFrame) -> dict[str, _Column]:
    """Every id-slot field of ``table`` as a ``_Column``: text columns from the parser's dictionary, number
    columns through the codec's integer tokens."""
    out: dict[str, _Column] = {}
    for codec in encoder.id_codecs:
        name = codec.name
        if codec.source == "text":
            col = table[name]
            tokens = _tokens(col.chunk(0).dictionary, name)
            index = np.concatenate([_indices(c) for c in col.chunks])
            out[name] = _Column(tokens, index)
        else:  # integers -> tokens without a per-row string
            b = numbers.select(codec.int_token_expr(pl.col(name), numbers.schema[name]))[:, 0]
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


def _bags(table: pa.Table, encoder: Encoder) -> list[_Bags]:
    """Every multi-valued field of ``table``, parsed once per distinct cell."""
    out = []
    for codec in encoder.bag_codecs:
        col = table[codec.name]
        cells = _tokens(col.chunk(0).dictionary, codec.name)
        out.append(_Bags(codec, encoder, cells, np.concatenate([_indices(c) for c in col.chunks])))
    return out


def _tokens(dictionary: pa.Array, name: str) -> pl.Series:
    """A column's distinct cells as text; one that is not valid UTF-8 is left to the general path, which
    reports it by line and field."""
    try:
        return pl.Series(dictionary.cast(pa.string()), dtype=pl.Utf8)
    except pa.ArrowInvalid:
        raise Unsupported(f"field '{name}' holds a cell that is not valid UTF-8") from None


def _indices(chunk: pa.DictionaryArray) -> np.ndarray:
    """The int32 dictionary indices of a chunk, read from its buffer (no nulls: cells are never null here)."""
    idx = chunk.indices
    return np.frombuffer(idx.buffers()[1], dtype=np.int32, count=len(idx), offset=idx.offset * 4)


def _chunk(frame: pl.DataFrame) -> RawChunk:
    return RawChunk("<fast path>", frame, np.arange(1, frame.height + 1, dtype=np.int64), 0)


def _numbers(table: pa.Table, encoder: Encoder) -> pl.DataFrame:
    """Label, sample-weight and number columns as float64 polars columns, validated by the encoder's own checks."""
    weight = [encoder.weight_column] if encoder.weight_column is not None else []
    keep = [encoder.label] + weight + [c.name for c in encoder.codecs if c.source == "number"]
    frame = pl.from_arrow(table.select(keep))
    assert isinstance(frame, pl.DataFrame)
    try:
        encoder.validate(_chunk(frame), None, codecs=[c for c in encoder.codecs if c.source == "number"],
                         check_weight=True)
    except DataError as err:  # the general path reports it with its file and line
        raise Unsupported(f"field '{err.field}': {err.reason}") from None
    return frame


def _fit_in_memory(encoder: Encoder, numbers: pl.DataFrame, columns: dict[str, _Column], bags: list[_Bags]) -> None:
    counters = encoder.counters()
    for c in encoder.id_codecs:
        col = columns[c.name]
        counters[str(c.vocab_name)].add_counts(col.tokens, col.counts())
    for c, b in zip(encoder.bag_codecs, bags, strict=True):
        counters[str(c.vocab_name)].add_counts(b.tags, b.tag_counts())
    acc: dict[str, dict] = {}
    encoder.accumulate_stats(_chunk(numbers), acc)
    encoder.set_fitted(counters, acc)


def prepare_splits(cfg: Config, encoder: Encoder, writer_for: Callable[[str], Any],
                   files: SplitFiles | None = None) -> None:
    """Fit ``encoder`` on the training files and write every split through ``writer_for(split).append``.

    Raises ``Unsupported`` (possibly after writing part of the training split) when the general path must run.
    """
    files = split_files(cfg.data) if files is None else files
    chunks = itertools.chain.from_iterable(guarded(f, _tables(f, cfg, encoder)) for f in files["train"])
    first = next(chunks)
    second = next(chunks, None)
    if second is None:  # the whole file in one table: fit, then encode from memory
        numbers = _numbers(first, encoder)
        columns = _columns(first, encoder, numbers)
        bags = _bags(first, encoder)
        _fit_in_memory(encoder, numbers, columns, bags)
        _check_id_range(encoder)
        writer_for("train").append(encode(encoder, first, numbers, columns, bags), None)
    else:
        _fit_streamed(cfg, encoder, itertools.chain([first, second], chunks), writer_for("train"))
    del first, second
    for name in ("valid", "test"):
        for path in files.get(name, []):
            for table in guarded(path, _tables(path, cfg, encoder)):
                numbers = _numbers(table, encoder)
                writer_for(name).append(encode(encoder, table, numbers, _columns(table, encoder, numbers),
                                               _bags(table, encoder)), None)


def _check_id_range(encoder: Encoder) -> None:
    if encoder.layout().num_rows >= 2**31:  # the fast path writes int32 ids
        raise Unsupported("an embedding table of 2^31 rows or more needs int64 ids")


def _fit_streamed(cfg: Config, encoder: Encoder, chunks: Iterator[pa.Table], writer: Any) -> None:
    """Provisional ids chunk by chunk, then the vocabularies, then the training ids renumbered in place."""
    if encoder.needs_stats:
        raise Unsupported("fitted numeric transforms need their statistics before a streamed file is encoded")
    provisional = {c.name: _Provisional() for c in encoder.id_codecs + encoder.bag_codecs}
    for table in chunks:
        numbers = _numbers(table, encoder)
        columns = _columns(table, encoder, numbers)
        n = table.num_rows
        cat_t = np.empty((len(encoder.id_codecs), n), dtype=np.int32)
        for j, c in enumerate(encoder.id_codecs):
            cat_t[j] = provisional[c.name].add(columns[c.name])
        multi = [b.provisional_rows(provisional[c.name]) for c, b in zip(encoder.bag_codecs, _bags(table, encoder),
                                                                          strict=True)]
        writer.append(EncodedChunk(_labels(encoder, numbers), np.ascontiguousarray(cat_t.T),
                                   _numeric_values(encoder, numbers, stats={}), multi, np.ones(n, dtype=bool),
                                   _weights(encoder, numbers)), None)
    counters = encoder.counters()
    for c in encoder.id_codecs + encoder.bag_codecs:
        p = provisional[c.name]
        counters[str(c.vocab_name)].add_counts(p.known["token"], p.counts)
    encoder.set_fitted(counters, {})
    _check_id_range(encoder)
    vocabs = encoder.fitted_state()[0]
    luts = {}
    for c in encoder.id_codecs + encoder.bag_codecs:
        known = provisional[c.name].known  # pids are 0..n-1 in order
        luts[c.name] = vocabs[str(c.vocab_name)].encode(known["token"]).astype(np.int32)
    writer.renumber_ids([luts[c.name] for c in encoder.id_codecs], [luts[c.name] for c in encoder.bag_codecs])


def encode(encoder: Encoder, table: pa.Table, numbers: pl.DataFrame, columns: dict[str, _Column],
           bags: list[_Bags]) -> EncodedChunk:
    vocabs = encoder.fitted_state()[0]
    n = table.num_rows
    id_dtype = np.int32  # _check_id_range
    cat_t = np.empty((len(encoder.id_codecs), n), dtype=id_dtype)  # field-major: each field fills a row
    for j, c in enumerate(encoder.id_codecs):
        col, vocab = columns[c.name], vocabs[str(c.vocab_name)]
        ids = vocab.encode(col.tokens).astype(id_dtype)  # once per distinct value
        np.take(ids, col.index, out=cat_t[j])
    cat = np.ascontiguousarray(cat_t.T)
    multi = [b.rows(vocabs[str(c.vocab_name)].encode(b.tags).astype(id_dtype))  # once per distinct tag
             for c, b in zip(encoder.bag_codecs, bags, strict=True)]
    return EncodedChunk(_labels(encoder, numbers), cat, _numeric_values(encoder, numbers), multi,
                        np.ones(n, dtype=bool), _weights(encoder, numbers))


def _numeric_values(encoder: Encoder, numbers: pl.DataFrame, stats: dict | None = None) -> np.ndarray:
    exprs = encoder.value_exprs(_chunk(numbers), stats)
    values = numbers.select(exprs) if exprs else None
    num = np.empty((numbers.height, len(encoder.value_codecs)), dtype=np.float32)
    for j in range(len(encoder.value_codecs)):
        num[:, j] = values[f"n{j}"].to_numpy()  # type: ignore[index]
    return num


def _labels(encoder: Encoder, numbers: pl.DataFrame) -> np.ndarray:
    return numbers[encoder.label].to_numpy().astype(np.float32)


def _weights(encoder: Encoder, numbers: pl.DataFrame) -> np.ndarray | None:
    if encoder.weight_column is None:
        return None
    return numbers[encoder.weight_column].to_numpy().astype(np.float32)
