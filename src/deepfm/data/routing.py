"""Where each row of a training file goes: its split (seeded by its index in the file, or by a time column)
and whether negative downsampling keeps it. Decided per row from the row's index, so the same rows land in the
same split however the file is chunked, on every run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import polars as pl

from deepfm.config import Config, DataConfig, TimeSplitConfig
from deepfm.data.codecs import label_expr
from deepfm.data import inputs
from deepfm.data.readers import BadRows, RawChunk
from deepfm.data.sources import Source
from deepfm.errors import DataError


def _row_uniform(row_index: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per row from a counter-based hash (splitmix64) of (seed, stream, row index):
    independent of how the file is chunked. ``stream`` separates uses of one seed (split, sampling)."""
    with np.errstate(over="ignore"):
        z = row_index.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) \
            + np.uint64(stream) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_of_rows(row_index: np.ndarray, valid: float, test: float, seed: int) -> np.ndarray:
    """Seeded split assignment of rows (0 train, 1 valid, 2 test) from their index in the file."""
    u = _row_uniform(row_index, seed)
    return np.where(u < valid, 1, np.where(u < valid + test, 2, 0)).astype(np.int8)


def kept_by_sampling(row_index: np.ndarray, negative: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Which rows negative downsampling keeps: every non-negative row, a negative with probability ``rate``,
    decided by a seeded hash of its index in the file (the same rows every run, however the file is chunked;
    a stream of its own, so that it does not follow the random split's draw)."""
    if rate >= 1.0:
        return np.ones(len(row_index), dtype=bool)
    return ~negative | (_row_uniform(row_index, seed, stream=1) < rate)


def time_split_of_chunk(chunk: RawChunk, split: TimeSplitConfig, bad: BadRows | None) -> tuple[np.ndarray, np.ndarray]:
    """(split code per row: 0 train, 1 valid, 2 test; mask of rows with a usable ``split.by`` value).

    A missing value, or one that is not a number when the thresholds are numbers, raises ``DataError``
    naming file, line and field, or is reported to ``bad`` and masked out."""
    if split.by not in chunk.frame.columns:
        raise DataError(f"the split column '{split.by}' (data.split.by) is not in the data; columns are "
                        f"{chunk.frame.columns}", path=chunk.path, field=split.by)
    col = chunk.frame[split.by]
    if split.numeric:
        values = col.cast(pl.Float64, strict=False) if col.dtype != pl.Utf8 else \
            col.str.strip_chars().cast(pl.Float64, strict=False)
        values = values.fill_nan(None)
        lo, hi = float(split.valid_from), float(split.test_from)
        reason = "is not a number (data.split compares numbers)"
    else:
        text = col.cast(pl.Utf8)
        values = pl.select(pl.when(text.str.strip_chars() == "").then(None).otherwise(text)).to_series()
        lo, hi = str(split.valid_from), str(split.test_from)  # type: ignore[assignment]
        reason = "is missing"  # text: only an empty value is unusable
    ok = values.is_not_null().to_numpy()

    def why(raw: object) -> str:
        return "is missing (data.split.by needs a value on every row)" if raw is None or str(raw).strip() == "" \
            else reason

    if not ok.all():
        if bad is None:
            first = int(np.argmin(ok))
            raise DataError(f"value {col[first]!r} of the split column {why(col[first])}", path=chunk.path,
                            line=int(chunk.lines[first]), field=split.by)
        for i in np.nonzero(~ok)[0]:
            raw = col[int(i)]
            bad.add(chunk.path, int(chunk.lines[i]), f"field '{split.by}': split column value {raw!r} {why(raw)}",
                    json.dumps(chunk.frame.row(int(i)), default=str))
    code = pl.select(pl.when(values < lo).then(0).when(values < hi).then(1).otherwise(2)).to_series()
    return code.fill_null(0).to_numpy().astype(np.int8), ok


def route_rows(chunk: RawChunk, data: DataConfig, bad: BadRows | None,
               sample: bool = True) -> tuple[RawChunk, np.ndarray, int]:
    """Where each row of a chunk of ``data.train`` goes: the kept rows, their split (0 train, 1 valid, 2 test)
    and the number of negatives that downsampling dropped. Rows with an unusable split value are reported to
    ``bad`` (or raise) and dropped; only training rows are downsampled (``sample=False``: none)."""
    n = len(chunk)
    index = chunk.row_start + np.arange(n)
    ok = np.ones(n, dtype=bool)
    if isinstance(data.split, TimeSplitConfig):
        assign, ok = time_split_of_chunk(chunk, data.split, bad)
    elif data.split is not None:
        assign = split_of_rows(index, data.split.valid, data.split.test, data.split.seed)
    else:
        assign = np.zeros(n, dtype=np.int8)
    dropped = 0
    if sample and data.negative_sampling_rate < 1.0 and data.label in chunk.frame.columns:
        col = chunk.frame[data.label]
        # an invalid label is not a negative: it is kept here and reported by the encoder's validation
        negative = col.to_frame("v").select(label_expr(pl.col("v"), col.dtype) == 0.0)["v"].fill_null(False)
        sampled = kept_by_sampling(index, negative.to_numpy() & (assign == 0), data.negative_sampling_rate,
                                   data.sampling_seed)
        dropped = int((ok & ~sampled).sum())
        ok &= sampled
    if not ok.all():
        chunk = subset_rows(chunk, ok)
        assign = assign[ok]
    return chunk, assign, dropped


def subset_rows(chunk: RawChunk, mask: np.ndarray) -> RawChunk:
    return RawChunk(chunk.path, chunk.frame.filter(pl.Series(mask)), chunk.lines[mask], chunk.row_start,
                    chunk.absent_is_missing)


def train_chunks(cfg: Config, bad: BadRows | None, files: list[Source]) -> Iterator[RawChunk]:
    """The training rows of ``data.train`` (after the split, before negative downsampling): what vocabularies
    and numeric statistics are fitted on. Downsampling saves training steps; the vocabularies still see every
    training row, so a value is not dropped below ``min_count`` because its negatives were sampled away."""
    for chunk in inputs.read_files(files, cfg.data, bad):
        chunk, assign, _ = route_rows(chunk, cfg.data, bad, sample=False)
        yield chunk if (assign == 0).all() else subset_rows(chunk, assign == 0)
