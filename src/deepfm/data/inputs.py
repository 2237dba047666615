"""Several files read as one: the chunks of every file a spec resolves to (``deepfm.data.sources``), in order.

Rows are numbered across the files (``RawChunk.row_start``), so the seeded split and negative sampling, which
draw per row index, treat parts that concatenate to one file exactly as that file. Each chunk keeps its own
file's name and line numbers for messages, and carries its file's Hive partition folders as text columns.
A store that stops answering mid-read is an error naming the object, never a truncated input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TypeVar

import polars as pl
import pyarrow as pa

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.data.readers import BadRows, RawChunk, read_chunks
from deepfm.data.sources import Source
from deepfm.errors import DataError

T = TypeVar("T")


def store_of(data: DataConfig) -> sources.Store:
    return sources.Store(data.s3_endpoint_url)


def names_several(spec: str) -> bool:
    """Whether a path given on the command line is a glob, a folder or a URL (resolved to files), not one file."""
    return sources.is_url(spec) or bool(sources.WILDCARD.search(spec)) and not os.path.exists(spec) \
        or os.path.isdir(spec)


def files_of(spec: str | list[str] | Source, data: DataConfig, hint: str = "", what: str = "") -> list[Source]:
    """The files of one spec (``data.train`` and the like)."""
    return sources.resolve(spec, store_of(data), hint, what)


SplitFiles = dict[str, list[Source]]  # split name -> its files, for the splits the config names
_HINT = "check data.{}; relative paths are read from the config's folder"


def split_files(data: DataConfig) -> SplitFiles:
    """The files of ``data.train`` / ``valid`` / ``test`` (those given), each spec resolved once."""
    return {k: files_of(v, data, _HINT.format(k), k) for k in ("train", "valid", "test") if (v := getattr(data, k))}


def stamp_of(spec: str | list[str], files: list[Source]) -> dict | list[dict]:
    """What the cache key holds of a spec's files: a single file named as itself keeps the stamp it always had
    (existing caches stay valid); several, one stamp each, with their partition values."""
    if isinstance(spec, str) and len(files) == 1 and str(files[0]) == spec:
        return sources.stamp(files[0])
    return [sources.stamp(f) | ({"partitions": f.partitions} if f.partitions else {}) for f in files]


def parsed_bytes(files: list[Source]) -> float:
    """About how many bytes the files' text takes once parsed: infinite for compressed or remote files, whose
    text is not known before reading (they are then read twice rather than kept in memory)."""
    if any(f.remote or f.compression for f in files):
        return float("inf")
    return float(sum(sources.size_of(f) for f in files))


def describe(spec: str | list[str]) -> str:
    """A spec for a message."""
    return sources.display(spec) if isinstance(spec, str) else ", ".join(sources.display(s) for s in spec)


def read_files(files: list[Source], data: DataConfig, bad: BadRows | None = None,
               columns: list[str] | None = None, offsets: list[int] | None = None) -> Iterator[RawChunk]:
    """Chunks of ``files`` in order, rows numbered across them (or from ``offsets[k]`` for file k: a rank's
    files among all), partition columns added."""
    offset = 0
    for k, src in enumerate(map(sources.source, files)):
        if offsets is not None:
            offset = offsets[k]
        wanted = None if columns is None else [c for c in columns if c not in src.partitions]
        rows = 0
        for chunk in guarded(src, read_chunks(src, data, bad, wanted)):
            rows = chunk.row_start + len(chunk)
            frame = chunk.frame
            extra = [pl.lit(v, dtype=pl.Utf8).alias(k) for k, v in src.partitions.items() if k not in frame.columns]
            if extra:
                frame = frame.with_columns(extra)
            yield RawChunk(chunk.path, frame, chunk.lines, offset + chunk.row_start, chunk.absent_is_missing)
        offset += rows


def guarded(src: Source, chunks: Iterator[T]) -> Iterator[T]:
    """``chunks`` (of any kind), with a failing read (store gone, corrupt compressed data) as a ``DataError`` naming the file."""
    try:
        yield from chunks
    except DataError:
        raise
    except (OSError, pa.ArrowInvalid) as err:
        if src.remote:
            raise DataError(f"reading stopped: {sources.store_error(err)}", path=str(src)) from None
        kind = f" {src.compression} data" if src.compression else ""
        raise DataError(f"cannot read{kind}: {str(err).splitlines()[0][:300]}", path=str(src)) from None


def read_spec(spec: str | list[str], data: DataConfig, bad: BadRows | None = None,
              columns: list[str] | None = None) -> Iterator[RawChunk]:
    yield from read_files(files_of(spec, data), data, bad, columns)
