"""Readers: raw files -> chunks of columns, streamed, with the line number of every row.

Text formats are parsed by pyarrow's CSV reader (single-threaded so that it reports the line of a malformed
row); Parquet is read by row groups. Every value of a text file stays a string here: typing is the
encoder's job, so an id like ``123456789012345`` never passes through a float.
A row with the wrong number of columns, or a cell that is not valid text in ``data.encoding``, is an error
naming file, line (and field), or, with ``skip_bad_rows``, is handed to a ``BadRows`` sink that counts it and
writes it aside. Text cells are parsed as bytes and checked as UTF-8 per column and chunk (arrow's own check in
the parser names no row); a file in another encoding is transcoded to UTF-8 while it streams, its undecodable
bytes passed through so that the same check finds them. A line longer than a parse block is read by parsing
again with a block sized from the file's longest line.
"""

from __future__ import annotations

import codecs
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.errors import DataError

BLOCK_BYTES = 4 << 20  # streaming parse: 16 MB blocks parsed at half the rate of 4 MB ones on 2 cores
MAX_LINE_BYTES = 256 << 20  # a longer line is rejected by number (arrow's parse blocks are at most 2 GB)


@dataclass
class RawChunk:
    """Rows of one file: ``frame`` holds the columns, ``lines`` the 1-based line (or Parquet row) numbers."""

    path: str
    frame: pl.DataFrame
    lines: np.ndarray  # int64 [N]
    row_start: int  # 0-based index of the chunk's first data row within its file
    absent_is_missing: bool = False  # a column the frame lacks is all missing (sparse formats: libffm, libsvm)

    def __len__(self) -> int:
        return self.frame.height


@dataclass
class BadRows:
    """Collects rows skipped under ``skip_bad_rows``: a count and a side file of ``path:line: reason``."""

    side_file: Path | None = None
    count: int = 0
    examples: list[str] = field(default_factory=list)
    entries: list[tuple[str, int | None, str, str]] = field(default_factory=list)  # kept without a side file
    _handle: object | None = None

    def add(self, path: str, line: int | None, reason: str, text: str = "") -> None:
        self.count += 1
        if self.side_file is None:
            self.entries.append((path, line, reason, text))
        entry = f"{path}:{line if line is not None else '?'}: {reason}\t{text}"
        if len(self.examples) < 5:
            self.examples.append(entry)
        if self.side_file is not None:
            if self._handle is None:
                self.side_file.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.side_file, "a", encoding="utf-8")  # noqa: SIM115
            self._handle.write(entry.replace("\n", " ") + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None


CONFIG_HINT = "check data.train / valid / test in the config, relative paths are read from the config's folder"


def check_readable(path: str, hint: str = CONFIG_HINT) -> None:
    """``hint`` says where the path came from (the config by default), so the user knows what to fix."""
    if sources.source(path).remote:
        if not sources.exists(path):
            raise DataError(f"object not found ({hint})", path=path)
    elif not os.path.exists(path):
        raise DataError(f"file not found ({hint})", path=path)
    elif os.path.isdir(path):
        raise DataError("is a folder, expected a file", path=path)
    if sources.size_of(path) == 0:
        raise DataError("file is empty", path=path)


def read_chunks(path: str, data: DataConfig, bad: BadRows | None = None,
                columns: list[str] | None = None) -> Iterator[RawChunk]:
    """Stream ``path`` as chunks of about ``data.chunk_rows`` rows.

    ``columns`` limits what is kept (Parquet reads only those); ``bad`` receives skipped rows, and its
    absence means a malformed row raises ``DataError``.
    """
    check_readable(path)
    fmt = data.format
    if fmt == "parquet":
        yield from _read_parquet(path, data, bad, columns)
    elif fmt in ("csv", "tsv"):
        yield from _read_delimited(path, data, bad, columns)
    else:
        yield from _read_sparse_lines(path, data, bad)


def _read_parquet(path: str, data: DataConfig, bad: BadRows | None,
                  columns: list[str] | None) -> Iterator[RawChunk]:
    try:
        pf = pq.ParquetFile(sources.open_random_access(path))
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})", path=path) from None
    present = set(pf.schema_arrow.names)
    if columns is not None:
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"Parquet file lacks column(s) {missing}; it has {sorted(present)}", path=path)
    start = 0
    for batch in pf.iter_batches(batch_size=data.chunk_rows, columns=columns):
        n = batch.num_rows
        batch, lines = decode_cells(path, batch, np.arange(start + 1, start + n + 1, dtype=np.int64), None, bad)
        frame = pl.from_arrow(pa.Table.from_batches([batch]))
        assert isinstance(frame, pl.DataFrame)
        yield RawChunk(path, frame, lines, start)
        start += n
    if start == 0:
        raise DataError("Parquet file has no rows", path=path)


def first_lines(path: str, encoding: str, n: int) -> list[str]:
    """Up to ``n`` first lines of a text file, without line ends (undecodable bytes replaced)."""
    out: list[str] = []
    with io.TextIOWrapper(sources.open_binary(path), encoding=encoding, errors="replace", newline="") as fh:
        for line in fh:
            out.append(line.rstrip("\r\n"))
            if len(out) == n:
                break
    return out


def header_names(path: str, sep: str, encoding: str) -> list[str]:
    """The column names on the first line of a text file."""
    first = (first_lines(path, encoding, 1) or [""])[0]
    return [c.strip() for c in first.split(sep)]


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


class _Transcoded(io.RawIOBase):
    """A file in ``encoding`` read as UTF-8, streamed. Bytes that do not decode pass through unchanged
    (``surrogateescape``), so the UTF-8 check of the cells reports them with their line and field."""

    def __init__(self, path: str, encoding: str) -> None:
        self._fh = sources.open_native(path)
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="surrogateescape")
        self._buf = bytearray()
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while len(self._buf) < len(b) and not self._eof:
            raw = self._fh.read(max(len(b), 1 << 20))
            self._eof = not raw
            self._buf += self._decoder.decode(raw, final=self._eof).encode("utf-8", "surrogateescape")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        del self._buf[:n]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def text_source(path: str, encoding: str) -> str | io.RawIOBase | pa.NativeFile:
    """What arrow's CSV reader reads for ``path``: the path itself for a local UTF-8 file, else a stream (of
    a compressed or remote file: ``deepfm.data.sources``; of another encoding: transcoding).
    A stream must be read with ``open_csv``: arrow's multi-threaded ``read_csv`` on a Python file object
    aborts the process at exit now and then ("terminate called without an active exception", pyarrow 26)."""
    if not is_utf8(encoding):
        return _Transcoded(path, encoding)
    return sources.open_native(path) if sources.needs_stream(path) else path


def longest_line(path: str) -> tuple[int, int]:
    """(length in bytes, 1-based number) of the longest line of a file, read in blocks."""
    longest, number, carry, seen = 0, 1, 0, 0
    with sources.open_binary(path) as fh:
        while block := fh.read(64 << 20):
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            if len(ends):
                lengths = np.diff(ends, prepend=-1)
                lengths[0] += carry
                k = int(np.argmax(lengths))
                if lengths[k] > longest:
                    longest, number = int(lengths[k]), seen + k + 1
                carry, seen = len(block) - int(ends[-1]) - 1, seen + len(ends)
            else:
                carry += len(block)
    if carry > longest:
        longest, number = carry, seen + 1
    return longest, number


def block_for_lines(path: str, encoding: str) -> int:
    """A parse block that holds the file's longest line (transcoding may double its bytes)."""
    longest, number = longest_line(path)
    if longest > MAX_LINE_BYTES:
        raise DataError(f"line is {longest:,} bytes long; deepfm reads lines up to {MAX_LINE_BYTES:,} bytes",
                        path=path, line=number)
    return max(BLOCK_BYTES, (2 if is_utf8(encoding) else 4) * (longest + 1))


def straddles(err: Exception) -> bool:
    """Whether arrow failed because a row is longer than its parse block."""
    return "straddl" in str(err)


def decode_cells(path: str, batch: pa.RecordBatch, lines: np.ndarray, encoding: str | None,
                 bad: BadRows | None) -> tuple[pa.RecordBatch, np.ndarray]:
    """``batch`` with its binary columns as UTF-8 text; a row holding a cell that is not valid UTF-8 is an
    error naming file, line and field, or, with ``bad``, is recorded there and dropped. ``encoding`` is the
    text file's (its undecodable bytes were passed through); None for Parquet, whose text is UTF-8."""
    binary = [i for i, t in enumerate(batch.schema.types) if pa.types.is_binary(t) or pa.types.is_large_binary(t)]
    found: dict[int, tuple[str, bytes]] = {}  # row -> (field, cell): the first bad cell of each bad row
    for i in binary:
        try:
            batch.column(i).cast(pa.string())
            continue
        except pa.ArrowInvalid:
            pass
        for row, cell in enumerate(batch.column(i).to_pylist()):
            if cell is not None and row not in found and not _decodes_as(cell):
                found[row] = (batch.schema.names[i], cell)
    dropped = np.zeros(batch.num_rows, dtype=bool)
    for row in sorted(found):
        name, cell = found[row]
        reason = _not_text(_shown(cell), encoding)  # cells are UTF-8 here, but for the undecodable bytes
        if bad is None:
            raise DataError(reason, path=path, line=int(lines[row]), field=name)
        bad.add(path, int(lines[row]), f"field '{name}': {reason}", _shown(cell))
        dropped[row] = True
    if dropped.any():
        batch, lines = batch.filter(pa.array(~dropped)), lines[~dropped]
    if binary:
        arrays = [c.cast(pa.string()) if i in binary else c for i, c in enumerate(batch.columns)]
        batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
    return batch, lines


def _not_text(shown: str, encoding: str | None) -> str:
    """The reason given for a cell (as ``_shown``) that does not decode in the file's encoding (None: Parquet's
    UTF-8)."""
    if encoding is None:
        return f"{shown} is not valid UTF-8 text"
    hint = "; if the file is in another encoding, set data.encoding (e.g. latin-1)" if is_utf8(encoding) else ""
    return f"{shown} is not valid {encoding} text{hint}"


def _decodes_as(cell: bytes, encoding: str = "utf-8") -> bool:
    try:
        cell.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _shown(cell: bytes, encoding: str = "utf-8") -> str:
    """A cell for a message: its text with undecodable bytes as \\xNN escapes, shortened."""
    text = cell[:200].decode(encoding, "backslashreplace")
    return f"'{text}'" if len(cell) <= 200 else f"'{text}...'"


def delimited_columns(path: str, data: DataConfig, columns: list[str] | None = None) -> tuple[list[str], int, str]:
    """(column names, header lines to skip, separator) of a CSV/TSV file; checks ``columns`` are present."""
    sep = "\t" if data.format == "tsv" else ","
    if data.header:
        names = header_names(path, sep, data.encoding)
        header_lines = 1
        declared = data.column_names
        if declared is not None and declared != names:
            raise DataError(f"header {names} differs from data.columns {declared}", path=path, line=1)
    else:
        names = list(data.column_names or [])
        header_lines = 0
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"file lacks column(s) {missing}; its columns are {names}", path=path,
                            line=1 if data.header else None)
    return names, header_lines, sep


@dataclass
class _HandedOver:
    """How far a parse got: the last line of the rows yielded, their count, the last bad line reported."""

    line: int = 0
    rows: int = 0
    bad_line: int = 0


@dataclass
class _NewBadRows(BadRows):
    """Passes to ``target`` the bad rows after ``done.bad_line`` as of the start of a parse (a parse started
    again after a long line sees the rows before once more)."""

    target: BadRows = field(default_factory=BadRows)
    done: _HandedOver = field(default_factory=_HandedOver)
    after: int = 0

    def add(self, path: str, line: int | None, reason: str, text: str = "") -> None:
        if line is not None and line <= self.after:
            return
        self.done.bad_line = max(self.done.bad_line, line or 0)
        self.target.add(path, line, reason, text)


def _read_delimited(path: str, data: DataConfig, bad: BadRows | None,
                    columns: list[str] | None) -> Iterator[RawChunk]:
    names, header_lines, sep = delimited_columns(path, data, columns)
    done = _HandedOver(line=header_lines)
    block = BLOCK_BYTES
    while True:
        try:
            yield from _parse_delimited(path, data, bad, columns, (names, header_lines, sep), block, done)
            return
        except _Straddling:  # a line longer than the block: parse again, handing over only what is new
            if block > BLOCK_BYTES:
                raise DataError("a line does not fit the parse block sized from the longest line", path=path) \
                    from None
            block = block_for_lines(path, data.encoding)


class _Straddling(Exception):
    pass


def _parse_delimited(path: str, data: DataConfig, bad: BadRows | None, columns: list[str] | None,
                     layout: tuple[list[str], int, str], block: int, done: _HandedOver) -> Iterator[RawChunk]:
    names, header_lines, sep = layout
    resumed_after = done.line  # rows up to this line were yielded by an earlier parse
    if bad is not None:
        bad = _NewBadRows(target=bad, done=done, after=done.bad_line)

    invalid: list[tuple[int | None, str, str]] = []  # (line, reason, text)

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, f"expected {row.expected_columns} columns, found {row.actual_columns}",
                        row.text))
        return "skip"

    def report_invalid() -> None:
        if invalid and bad is None:
            line, reason, text = invalid[0]
            if line is None:  # the multi-threaded parser does not count lines: find it (error path only)
                line = _find_line(path, text, header_lines, data.encoding)
            raise DataError(f"{reason}: {text[:200]!r}", path=path, line=line)
        for line, reason, text in invalid:
            assert bad is not None
            bad.add(path, line, reason, text)
        invalid.clear()

    source = text_source(path, data.encoding)
    # Parse on all cores unless skipping bad rows: then every line number must be known, which pyarrow
    # only reports single-threaded. A strict run stops at the first malformed row and locates it then.
    # Cells are read as bytes: decode_cells checks them as UTF-8 and names the line and field of a bad one.
    try:
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(use_threads=bad is None, block_size=block, column_names=names,
                                           skip_rows=header_lines),
            parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid,
                                             ignore_empty_lines=False, quote_char='"' if sep == "," else False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                                 strings_can_be_null=False, include_columns=columns),
        )
        next_line = header_lines + 1
        pending: list[pl.DataFrame] = []
        pending_lines: list[np.ndarray] = []
        pending_rows = 0
        for batch in reader:
            skipped = sorted(n for n, _, _ in invalid if n is not None)
            report_invalid()
            n = batch.num_rows
            lines = _line_numbers(next_line, n, skipped)
            next_line = int(lines[-1]) + 1 if n else next_line + len(skipped)
            if n and lines[0] <= resumed_after:  # handed over before a reparse
                keep = lines > resumed_after
                batch, lines = batch.filter(pa.array(keep)), lines[keep]
            batch, lines = decode_cells(path, batch, lines, data.encoding, bad)
            if not batch.num_rows:
                continue
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(frame, pl.DataFrame)
            pending.append(frame)
            pending_lines.append(lines)
            pending_rows += frame.height
            if pending_rows >= data.chunk_rows:
                yield _emit(path, pending, pending_lines, done)
                pending, pending_lines, pending_rows = [], [], 0
    except pa.ArrowInvalid as err:
        if straddles(err):
            raise _Straddling() from None
        raise DataError(f"cannot parse: {err}", path=path) from None
    finally:
        if not isinstance(source, str):
            source.close()
    report_invalid()
    if pending_rows:
        yield _emit(path, pending, pending_lines, done)
    elif done.rows == 0:
        raise DataError("file has no data rows", path=path)


def _find_line(path: str, text: str, header_lines: int, encoding: str) -> int | None:
    with io.TextIOWrapper(sources.open_binary(path), encoding=encoding, errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if number > header_lines and line.rstrip("\r\n") == text:
                return number
    return None


def _line_numbers(first: int, n: int, skipped: list[int]) -> np.ndarray:
    """The line numbers of ``n`` parsed rows that start at line ``first``, stepping over skipped lines."""
    span = np.arange(first, first + n + len(skipped), dtype=np.int64)
    if skipped:
        span = span[~np.isin(span, np.asarray(skipped, dtype=np.int64))]
    return span[:n]


def _emit(path: str, frames: list[pl.DataFrame], lines: list[np.ndarray], done: _HandedOver) -> RawChunk:
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)
    all_lines = lines[0] if len(lines) == 1 else np.concatenate(lines)
    # a blank line is no row: drop rows whose every cell is empty (pyarrow keeps them as empty strings)
    first = frame.columns[0]
    blank = frame.select(pl.all_horizontal(pl.all() == "")).to_series() if (frame[first] == "").any() else None
    if blank is not None and blank.any():
        keep = ~blank.to_numpy()
        frame, all_lines = frame.filter(pl.Series(keep)), all_lines[keep]
    chunk = RawChunk(path, frame, all_lines, done.rows)
    done.rows += frame.height
    done.line = max(done.line, int(all_lines[-1]) if len(all_lines) else 0)
    return chunk


def _read_sparse_lines(path: str, data: DataConfig, bad: BadRows | None) -> Iterator[RawChunk]:
    """libffm (``label field:index:value ...``) and libsvm (``label index:value ...``).

    Each libffm field becomes one multi-valued column named ``data.columns[field]`` (or ``f<field>``) whose
    cell is ``index:value^index:value``; libsvm has a single such column, ``data.columns[0]`` or
    ``features``. The label column is named ``data.label``.
    """
    names = data.column_names or []
    sep, wsep = data.multi_value_separator, data.weight_separator
    line_no = 0
    row_start = 0
    emitted = False
    with sources.open_binary(path) as fh:
        while True:
            raw_lines = fh.readlines(BLOCK_BYTES)
            if not raw_lines:
                break
            numbers = np.arange(line_no + 1, line_no + len(raw_lines) + 1, dtype=np.int64)
            line_no += len(raw_lines)
            texts, numbers = _decode_lines(path, raw_lines, numbers, data, names, bad)
            lines = pl.Series("text", texts, dtype=pl.Utf8).str.strip_chars("\r\n ")
            keep = (lines != "").to_numpy()
            lines, numbers = lines.filter(pl.Series(keep)), numbers[keep]
            frame = _parse_sparse(path, lines, numbers, data, names, sep, wsep, bad)
            if frame is None:
                continue
            emitted = True
            yield RawChunk(path, frame[0], frame[1], row_start, absent_is_missing=True)
            row_start += frame[0].height
    if not emitted:
        raise DataError("file has no data rows", path=path)


def _decode_lines(path: str, raw: list[bytes], numbers: np.ndarray, data: DataConfig, names: list[str],
                  bad: BadRows | None) -> tuple[list[str], np.ndarray]:
    """Lines of a libffm/libsvm file as text; a line that does not decode names its line and field."""
    enc = data.encoding
    try:
        return [line.decode(enc) for line in raw], numbers
    except UnicodeDecodeError:
        pass
    texts, kept = [], []
    for k, line in enumerate(raw):
        try:
            texts.append(line.decode(enc))
            kept.append(k)
            continue
        except UnicodeDecodeError:
            pass
        tokens = line.split()
        j = next(j for j, t in enumerate(tokens) if not _decodes_as(t, enc))
        if j == 0:
            name = data.label
        elif data.format == "libffm":
            fid = tokens[j].split(b":")[0].decode(enc, "replace")
            name = names[int(fid)] if fid.isdigit() and int(fid) < len(names) else f"f{fid}"
        else:
            name = names[0] if names else "features"
        reason = _not_text(_shown(tokens[j], enc), enc)
        if bad is None:
            raise DataError(reason, path=path, line=int(numbers[k]), field=name)
        bad.add(path, int(numbers[k]), f"field '{name}': {reason}", _shown(line, enc))
    return texts, numbers[kept]


def _parse_sparse(path: str, lines: pl.Series, numbers: np.ndarray, data: DataConfig, names: list[str],
                  sep: str, wsep: str, bad: BadRows | None) -> tuple[pl.DataFrame, np.ndarray] | None:
    ffm = data.format == "libffm"
    df = pl.DataFrame({"text": lines, "_line": numbers, "_row": np.arange(len(lines))})
    parts = df.with_columns(pl.col("text").str.split(" ").alias("tok")).drop("text")
    labels = parts.select(pl.col("tok").list.first().alias(data.label), "_line", "_row")
    long = (parts.with_columns(pl.col("tok").list.slice(1)).explode("tok")
            .filter(pl.col("tok").is_not_null() & (pl.col("tok") != "")))
    pieces = long.with_columns(pl.col("tok").str.split(":").alias("p"))
    expected = 3 if ffm else 2
    wrong = pieces.filter(pl.col("p").list.len() != expected)
    if wrong.height:
        first_bad = wrong.row(0, named=True)
        reason = f"expected {'field:index:value' if ffm else 'index:value'}, found '{first_bad['tok']}'"
        if bad is None:
            raise DataError(reason, path=path, line=int(first_bad["_line"]))
        bad_rows = wrong.select("_row", "_line", "tok").unique("_row", keep="first").sort("_row")
        for r in bad_rows.iter_rows(named=True):
            bad.add(path, int(r["_line"]), f"malformed token '{r['tok']}'")
        dropped = set(bad_rows["_row"].to_list())
        pieces = pieces.filter(~pl.col("_row").is_in(list(dropped)))
        labels = labels.filter(~pl.col("_row").is_in(list(dropped)))
        if labels.height == 0:
            return None
    if ffm:
        pieces = pieces.select("_row", pl.col("p").list.get(0).alias("field"),
                               (pl.col("p").list.get(1) + wsep + pl.col("p").list.get(2)).alias("tw"))
    else:
        pieces = pieces.select("_row", pl.lit("0").alias("field"),
                               (pl.col("p").list.get(0) + wsep + pl.col("p").list.get(1)).alias("tw"))
    grouped = pieces.group_by("_row", "field", maintain_order=True).agg(pl.col("tw").str.join(sep))
    wide = grouped.pivot(on="field", index="_row", values="tw") if grouped.height else \
        pl.DataFrame({"_row": pl.Series([], dtype=pl.Int64)})

    def col_name(field_id: str) -> str:
        if not field_id.isdigit():
            raise DataError(f"field id '{field_id}' is not a number", path=path)
        k = int(field_id)
        if names:
            if k >= len(names):
                raise DataError(f"field {k} has no name in data.columns ({len(names)} names)", path=path)
            return names[k]
        return f"f{k}" if ffm else "features"

    wide = wide.rename({c: col_name(c) for c in wide.columns if c != "_row"})
    out = labels.join(wide.with_columns(pl.col("_row").cast(labels["_row"].dtype)), on="_row", how="left")
    out = out.sort("_row")
    line_numbers = out["_line"].to_numpy().astype(np.int64)
    return out.drop("_row", "_line"), line_numbers
