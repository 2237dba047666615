"""Batch prediction and evaluation from a model directory: raw file -> the same encoder -> probabilities.

Streams the input chunk by chunk, so the data may exceed memory; the caller's id columns are carried
through unchanged next to a ``probability`` column; the output file appears only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deepfm.artifact import LoadedModel, load_model
from deepfm.data.batch import ModelInput, input_from_chunk
from deepfm.data import inputs
from deepfm.data.readers import BadRows, RawChunk, check_readable, has_header, infer_data_config
from deepfm.errors import DataError
from deepfm.io import atomic_path
from deepfm.metrics import group_auc, summarize
from deepfm.progress import progress_bar
from deepfm.runtime import Runtime, resolve_device


OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def output_format(path: str | Path) -> str:
    """The predictions file's format, from its extension; any other extension is an error (never a silent CSV)."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"unknown output extension '{Path(path).suffix}': use "
                        f"{', '.join(OUTPUT_FORMATS)} (predictions are written as CSV or Parquet)", path=str(path))
    return fmt


@dataclass
class Scored:
    chunk: RawChunk  # the rows that were scored (bad rows already dropped)
    probs: np.ndarray  # float64 [N]
    labels: np.ndarray | None
    weights: np.ndarray | None = None  # sample weights (data.weight_column) when asked for and in the file
    inputs: ModelInput | None = None  # the encoded rows the model scored


class Predictor:
    """A loaded model plus its encoder. ``predict_proba`` on DataFrames, ``score_file`` on files."""

    def __init__(self, model_dir: str | Path | LoadedModel, device: str = "auto", precision: str = "fp32",
                 batch_size: int = 16384) -> None:
        dev = resolve_device(device)
        self.loaded = model_dir if isinstance(model_dir, LoadedModel) else load_model(Path(model_dir), dev)
        self.runtime = Runtime.place(self.loaded.model, str(dev), precision, batch_size)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def config(self):
        return self.loaded.config

    def _probs(self, chunk: RawChunk, labels: bool, bad: BadRows | None, weights: bool = False) -> Scored:
        enc = self.loaded.encoder.transform(chunk, labels=labels, weights=weights, bad=bad)
        if not enc.kept.all():
            chunk = RawChunk(chunk.path, chunk.frame.filter(pl.Series(enc.kept)), chunk.lines[enc.kept],
                             chunk.row_start)
        inputs = input_from_chunk(enc)
        return Scored(chunk, self.runtime.probabilities(inputs), enc.labels, enc.weights, inputs)

    def score_chunks(self, path: str, *, need_labels: bool = False, skip_bad_rows: bool = False,
                     bad: BadRows | None = None, progress: bool = True, weights: bool = False) -> Iterator[Scored]:
        """The file's rows with their probabilities, chunk by chunk; ``weights``: with the sample weights too,
        where the file has ``data.weight_column`` (evaluation; predicting never reads the column)."""
        hint = f"the input file to score; relative paths are read from the current folder {os.getcwd()}"
        if inputs.names_several(path):  # a glob, a folder or a URL: its files, read as one (deepfm.data.inputs)
            files = inputs.files_of(path, self.config.data, hint)
        else:
            check_readable(path, hint=hint)
            files = [path]
        data, has_labels = infer_data_config(self.config.data, files[0])
        if need_labels and not has_labels:
            raise DataError(f"has no label column '{data.label}' to evaluate against", path=files[0])
        if skip_bad_rows and bad is None:
            bad = BadRows()
        for chunk in progress_bar(inputs.read_files(files, data, bad if skip_bad_rows else None),  # type: ignore[arg-type]
                                  desc="score", enabled=progress, unit="chunk"):
            yield self._probs(chunk, has_labels, bad if skip_bad_rows else None,
                              weights=weights and self.config.data.weight_column in chunk.frame.columns)

    def predict_proba(self, frame) -> np.ndarray:
        """Probabilities for the rows of a pandas or polars DataFrame holding the training columns."""
        df = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
        if self.config.data.label in df.columns:
            df = df.drop(self.config.data.label)
        chunk = RawChunk("<dataframe>", df, np.arange(1, df.height + 1, dtype=np.int64), 0)
        return self._probs(chunk, labels=False, bad=None).probs

    def evaluate_file(self, path: str, *, skip_bad_rows: bool = False, progress: bool = True) -> dict:
        """AUC, log loss and calibration of the model on a labelled file, weighted by its
        ``data.weight_column`` when the file has that column (as validation during training), and gAUC."""
        labels, probs, groups, weights = [], [], [], []
        gcol = self.config.data.group_column
        for s in self.score_chunks(path, need_labels=True, skip_bad_rows=skip_bad_rows, progress=progress,
                                   weights=True):
            assert s.labels is not None
            labels.append(s.labels)
            probs.append(s.probs)
            if s.weights is not None:
                weights.append(s.weights)
            if gcol is not None:
                if gcol not in s.chunk.frame.columns:
                    raise DataError(f"group column '{gcol}' (for gAUC) is missing", path=path, field=gcol)
                groups.append(s.chunk.frame[gcol].cast(pl.Utf8).to_numpy())
        if not labels:
            raise DataError("no rows to evaluate", path=path)
        y, p = np.concatenate(labels), np.concatenate(probs)
        out = summarize(y, p, weights=np.concatenate(weights) if weights else None)
        if groups:
            out["gauc"] = group_auc(y, p, np.concatenate(groups))
        return out

    def predict_file(self, path: str, output: str, *, id_columns: list[str] | None = None,
                     skip_bad_rows: bool = False, progress: bool = True, explain: bool = False) -> int:
        """Write ``id columns + probability`` for every row of ``path`` to ``output`` (.csv or .parquet); ``explain``:
        with the per-row attributions ``attr_bias`` + ``attr_<field>`` (``deepfm.explain``) too."""
        ids = list(id_columns if id_columns is not None else self.config.data.id_columns)
        out_path = Path(output)
        fmt = output_format(out_path)
        rows = 0
        writer = None
        bad = BadRows(out_path.with_name(out_path.name + ".bad_rows.txt")) if skip_bad_rows else None
        try:
            with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
                for s in self.score_chunks(path, skip_bad_rows=skip_bad_rows, bad=bad, progress=progress):
                    missing = [c for c in ids if c not in s.chunk.frame.columns]
                    if missing:
                        raise DataError(f"id column(s) {missing} not found; columns are "
                                        f"{s.chunk.frame.columns}", path=path)
                    if not ids and rows == 0:  # the file was found readable: its first data row's line
                        first_row_line = 2 if has_header(infer_data_config(self.config.data, s.chunk.path)[0]) else 1
                    cols = {c: s.chunk.frame[c] for c in ids} if ids else \
                        {"row": pl.Series(s.chunk.lines - first_row_line)}
                    if not ids and inputs.names_several(path):  # rows are numbered within their file
                        cols = {"file": pl.Series([str(s.chunk.path)] * len(s.probs), dtype=pl.Utf8), **cols}
                    out = pl.DataFrame(cols).with_columns(pl.Series("probability", s.probs))
                    if explain:
                        out = out.with_columns(**self._attributions(s))
                    if fmt == "csv":
                        out.write_csv(fh, include_header=rows == 0)
                    else:
                        table = out.to_arrow()
                        if writer is None:
                            writer = pq.ParquetWriter(fh, table.schema)
                        writer.write_table(table)
                    rows += out.height
                if writer is not None:
                    writer.close()
                elif fmt == "parquet":
                    pq.write_table(pa.table({"probability": pa.array([], pa.float64())}), fh)
        finally:
            if bad is not None:
                bad.close()
        return rows

    def _attributions(self, s: Scored) -> dict[str, np.ndarray]:
        from deepfm.explain import attribute_input, attribution_columns

        assert s.inputs is not None
        return attribution_columns(attribute_input(self.loaded, s.inputs))
