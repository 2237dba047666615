"""A stable, vectorised string hash (64-bit FNV-1a) for hashing categories into a fixed number of buckets.

Python's ``hash`` is salted per process and polars' hash is not promised stable across versions; a model
trained today must map a value to the same bucket when it is served next year, so the hash is our own.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64(strings: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each UTF-8 string; nulls hash like the empty string. Returns uint64 ``[N]``.

    Runs one vectorised step per byte position (strings of a column are short), never per row.
    """
    arr = pa.array(strings).cast(pa.large_string())
    if arr.null_count:
        arr = arr.fill_null("")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    _, offsets_buf, data_buf = arr.buffers()
    n = len(arr)
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    max_len = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for pos in range(max_len):
            live = np.nonzero(lengths > pos)[0]
            byte = data[starts[live] + pos].astype(np.uint64)
            h[live] = (h[live] ^ byte) * _FNV_PRIME
    return h


def bucketize(strings: pa.Array, buckets: int) -> np.ndarray:
    """Bucket id in ``[0, buckets)`` for each string, as int64."""
    return (fnv1a64(strings) % np.uint64(buckets)).astype(np.int64)
