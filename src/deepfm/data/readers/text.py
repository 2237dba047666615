"""Text files read as text: their first lines, a transcoding stream for encodings other than UTF-8, and the
check that every cell decodes (a cell that does not is named by file, line and field)."""

from __future__ import annotations

import codecs
import io

import numpy as np
import pyarrow as pa

from deepfm.data import sources
from deepfm.data.readers.base import BadRows
from deepfm.errors import DataError


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
            if cell is not None and row not in found and not decodes_as(cell):
                found[row] = (batch.schema.names[i], cell)
    dropped = np.zeros(batch.num_rows, dtype=bool)
    for row in sorted(found):
        name, cell = found[row]
        reason = not_text(shown(cell), encoding)  # cells are UTF-8 here, but for the undecodable bytes
        if bad is None:
            raise DataError(reason, path=path, line=int(lines[row]), field=name)
        bad.add(path, int(lines[row]), f"field '{name}': {reason}", shown(cell))
        dropped[row] = True
    if dropped.any():
        batch, lines = batch.filter(pa.array(~dropped)), lines[~dropped]
    if binary:
        arrays = [c.cast(pa.string()) if i in binary else c for i, c in enumerate(batch.columns)]
        batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
    return batch, lines


def not_text(shown: str, encoding: str | None) -> str:
    """The reason given for a cell (as ``_shown``) that does not decode in the file's encoding (None: Parquet's
    UTF-8)."""
    if encoding is None:
        return f"{shown} is not valid UTF-8 text"
    hint = "; if the file is in another encoding, set data.encoding (e.g. latin-1)" if is_utf8(encoding) else ""
    return f"{shown} is not valid {encoding} text{hint}"


def decodes_as(cell: bytes, encoding: str = "utf-8") -> bool:
    try:
        cell.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def shown(cell: bytes, encoding: str = "utf-8") -> str:
    """A cell for a message: its text with undecodable bytes as \\xNN escapes, shortened."""
    text = cell[:200].decode(encoding, "backslashreplace")
    return f"'{text}'" if len(cell) <= 200 else f"'{text}...'"
