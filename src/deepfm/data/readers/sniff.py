"""What a file to score looks like, read from the file itself: its format (by extension), whether it carries
the label (and the sample-weight column), and whether a delimited file starts with a header line. The training
data config says how the training files looked; a file scored later may differ in those ways only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.data.readers.text import first_lines, header_names

FORMAT_BY_EXTENSION = {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv", ".csv": "csv"}
WIDTH_SAMPLE_LINES = 100


def infer_data_config(train_data: DataConfig, path: str) -> tuple[DataConfig, bool]:
    """The training data config adapted to a new file: format by extension, and whether it has labels. A
    headerless file narrower than ``data.columns`` lacks the sample-weight column first (a file to score need
    not carry it), then the label."""
    plain = Path(path).with_suffix("") if sources.compression_of(path) else Path(path)  # x.tsv.gz reads as x.tsv
    fmt = FORMAT_BY_EXTENSION.get(plain.suffix.lower(), train_data.format)
    update: dict = {"format": fmt, "train": path, "valid": None, "test": None, "split": None}
    if fmt == "parquet":
        update.update(header=True, columns=None, preset=None)
        cols = pq.ParquetFile(sources.open_random_access(path)).schema_arrow.names
        return train_data.model_copy(update=update), train_data.label in cols
    if fmt not in ("csv", "tsv"):
        return train_data.model_copy(update=update), True
    if fmt != train_data.format:
        update.update(header=True, columns=None, preset=None)
    cfg = train_data.model_copy(update=update)
    sep = "\t" if fmt == "tsv" else ","
    if cfg.header:
        return cfg, train_data.label in header_names(path, sep, cfg.encoding)
    names = list(cfg.column_names or [])
    width = usual_width(path, sep, cfg.encoding)
    if train_data.weight_column in names and width < len(names):  # training-time only: a file may lack it
        names.remove(train_data.weight_column)
        cfg = cfg.model_copy(update={"preset": None, "columns": names})
    if width == len(names) - 1 and train_data.label in names:  # no labels
        return cfg.model_copy(update={"preset": None, "columns": [c for c in names if c != train_data.label]}), False
    return cfg, True


def has_header(data: DataConfig) -> bool:
    """Whether the file ``data`` (as ``infer_data_config`` gives it) starts with a header line."""
    return data.format in ("csv", "tsv") and data.header


def usual_width(path: str, sep: str, encoding: str) -> int:
    """The most common number of columns among the first lines of a headerless file (ties: the wider), so
    that one short or long row decides nothing: the reader then reports it by its line."""
    widths = [line.count(sep) + 1 for line in first_lines(path, encoding, WIDTH_SAMPLE_LINES) if line]
    if not widths:
        return 0
    counts = Counter(widths)
    return max(counts, key=lambda w: (counts[w], w))
