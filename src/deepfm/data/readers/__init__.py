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

from collections.abc import Iterator

from deepfm.config import DataConfig
from deepfm.data.readers.base import CONFIG_HINT, BadRows, RawChunk, check_readable
from deepfm.data.readers.delimited import delimited_columns, read_delimited
from deepfm.data.readers.parquet import read_parquet
from deepfm.data.readers.sniff import has_header, infer_data_config, usual_width
from deepfm.data.readers.sparse import read_sparse_lines
from deepfm.data.readers.text import decode_cells, first_lines, header_names, is_utf8, text_source

__all__ = ["CONFIG_HINT", "BadRows", "RawChunk", "check_readable", "read_chunks", "delimited_columns",
           "decode_cells", "first_lines", "header_names", "is_utf8", "text_source", "infer_data_config",
           "has_header", "usual_width"]


def read_chunks(path: str, data: DataConfig, bad: BadRows | None = None,
                columns: list[str] | None = None) -> Iterator[RawChunk]:
    """Stream ``path`` as chunks of about ``data.chunk_rows`` rows.

    ``columns`` limits what is kept (Parquet reads only those); ``bad`` receives skipped rows, and its
    absence means a malformed row raises ``DataError``.
    """
    check_readable(path)
    fmt = data.format
    if fmt == "parquet":
        yield from read_parquet(path, data, bad, columns)
    elif fmt in ("csv", "tsv"):
        yield from read_delimited(path, data, bad, columns)
    else:
        yield from read_sparse_lines(path, data, bad)
