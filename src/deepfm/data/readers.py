"""Readers: raw files -> chunks of columns, streamed, with the line number of every row.

Text formats are parsed by pyarrow's CSV reader (single-threaded so that it reports the line of a malformed
row); Parquet is read by row groups. Every value of a text file stays a string here: typing is the
encoder's job, so an id like ``123456789012345`` never passes through a float.
A row with the wrong number of columns is an error naming file and line, or, with ``skip_bad_rows``, is
handed to a ``BadRows`` sink that counts it and writes it aside.
"""

from __future__ import annotations

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
from deepfm.errors import DataError

BLOCK_BYTES = 4 << 20  # streaming parse: 16 MB blocks parsed at half the rate of 4 MB ones on 2 cores


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


def check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise DataError("file not found (check data.train / valid / test in the config, "
                        "relative paths are read from the config's folder)", path=path)
    if os.path.isdir(path):
        raise DataError("is a folder, expected a file", path=path)
    if os.path.getsize(path) == 0:
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
        yield from _read_parquet(path, data, columns)
    elif fmt in ("csv", "tsv"):
        yield from _read_delimited(path, data, bad, columns)
    else:
        yield from _read_sparse_lines(path, data, bad)


def _read_parquet(path: str, data: DataConfig, columns: list[str] | None) -> Iterator[RawChunk]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})", path=path) from None
    present = set(pf.schema_arrow.names)
    if columns is not None:
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"Parquet file lacks column(s) {missing}; it has {sorted(present)}", path=path)
    start = 0
    for batch in pf.iter_batches(batch_size=data.chunk_rows, columns=columns):
        frame = pl.from_arrow(pa.Table.from_batches([batch]))
        assert isinstance(frame, pl.DataFrame)
        n = frame.height
        yield RawChunk(path, frame, np.arange(start + 1, start + n + 1, dtype=np.int64), start)
        start += n
    if start == 0:
        raise DataError("Parquet file has no rows", path=path)


def _header_names(path: str, sep: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline().rstrip("\r\n")
    return [c.strip() for c in first.split(sep)]


def delimited_columns(path: str, data: DataConfig, columns: list[str] | None = None) -> tuple[list[str], int, str]:
    """(column names, header lines to skip, separator) of a CSV/TSV file; checks ``columns`` are present."""
    sep = "\t" if data.format == "tsv" else ","
    if data.header:
        names = _header_names(path, sep)
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


def _read_delimited(path: str, data: DataConfig, bad: BadRows | None,
                    columns: list[str] | None) -> Iterator[RawChunk]:
    names, header_lines, sep = delimited_columns(path, data, columns)

    invalid: list[tuple[int | None, str, str]] = []  # (line, reason, text)

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, f"expected {row.expected_columns} columns, found {row.actual_columns}",
                        row.text))
        return "skip"

    def report_invalid() -> None:
        if invalid and bad is None:
            line, reason, text = invalid[0]
            if line is None:  # the multi-threaded parser does not count lines: find it (error path only)
                line = _find_line(path, text, header_lines)
            raise DataError(f"{reason}: {text[:200]!r}", path=path, line=line)
        for line, reason, text in invalid:
            assert bad is not None
            bad.add(path, line, reason, text)
        invalid.clear()

    # Parse on all cores unless skipping bad rows: then every line number must be known, which pyarrow
    # only reports single-threaded. A strict run stops at the first malformed row and locates it then.
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=bad is None, block_size=BLOCK_BYTES, column_names=names,
                                       skip_rows=header_lines),
        parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid,
                                         ignore_empty_lines=False, quote_char='"' if sep == "," else False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             strings_can_be_null=False, include_columns=columns),
    )
    next_line = header_lines + 1
    row_start = 0
    pending: list[pl.DataFrame] = []
    pending_lines: list[np.ndarray] = []
    pending_rows = 0
    try:
        for batch in reader:
            skipped = sorted(n for n, _, _ in invalid if n is not None)
            report_invalid()
            n = batch.num_rows
            lines = _line_numbers(next_line, n, skipped)
            next_line = int(lines[-1]) + 1 if n else next_line + len(skipped)
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(frame, pl.DataFrame)
            pending.append(frame)
            pending_lines.append(lines)
            pending_rows += n
            if pending_rows >= data.chunk_rows:
                yield _emit(path, pending, pending_lines, row_start)
                row_start += pending_rows
                pending, pending_lines, pending_rows = [], [], 0
    except pa.ArrowInvalid as err:
        raise DataError(f"cannot parse: {err}", path=path) from None
    report_invalid()
    if pending_rows:
        yield _emit(path, pending, pending_lines, row_start)
    elif row_start == 0:
        raise DataError("file has no data rows", path=path)


def _find_line(path: str, text: str, header_lines: int) -> int | None:
    with open(path, encoding="utf-8", errors="replace") as fh:
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


def _emit(path: str, frames: list[pl.DataFrame], lines: list[np.ndarray], row_start: int) -> RawChunk:
    frame = frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)
    all_lines = lines[0] if len(lines) == 1 else np.concatenate(lines)
    # a blank line is no row: drop rows whose every cell is empty (pyarrow keeps them as empty strings)
    first = frame.columns[0]
    blank = frame.select(pl.all_horizontal(pl.all() == "")).to_series() if (frame[first] == "").any() else None
    if blank is not None and blank.any():
        keep = ~blank.to_numpy()
        frame, all_lines = frame.filter(pl.Series(keep)), all_lines[keep]
    return RawChunk(path, frame, all_lines, row_start)


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
    with open(path, encoding="utf-8", errors="strict") as fh:
        while True:
            raw_lines = fh.readlines(BLOCK_BYTES)
            if not raw_lines:
                break
            lines = pl.Series("text", raw_lines, dtype=pl.Utf8).str.strip_chars("\r\n ")
            numbers = np.arange(line_no + 1, line_no + len(raw_lines) + 1, dtype=np.int64)
            line_no += len(raw_lines)
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
