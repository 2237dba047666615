"""Parquet files, read by row groups; text cells are checked as UTF-8 like a text file's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.data.readers.base import BadRows, RawChunk
from deepfm.data.readers.text import decode_cells
from deepfm.errors import DataError


def read_parquet(path: str, data: DataConfig, bad: BadRows | None,
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
