"""CSV and TSV files, parsed by pyarrow's CSV reader in blocks, every row with its line number.

Single-threaded when skipping bad rows (only then does pyarrow report the line of a malformed row); a line
longer than a parse block is read by parsing again with a block sized from the file's longest line, handing
over only the rows (and bad rows) the first parse had not.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.data.readers.base import BadRows, RawChunk
from deepfm.data.readers.text import decode_cells, header_names, is_utf8, text_source
from deepfm.errors import DataError

# The streaming parse block: small blocks keep memory bounded and parsed faster than large ones where
# measured (bench/FIGURES.md); a line longer than a block is read by parsing again (``block_for_lines``).
BLOCK_BYTES = 4 << 20
MAX_LINE_BYTES = 256 << 20  # a longer line is rejected by number (arrow's parse blocks are at most 2 GB)


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


def read_delimited(path: str, data: DataConfig, bad: BadRows | None,
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
