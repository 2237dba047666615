"""Prepared data: typed arrays on disk plus a manifest, memory-mapped for training, cached by fingerprint.

One folder per (data files, field schema) fingerprint under ``data.cache_dir``::

    manifest.json          rows per split, dtypes, shapes, table layout, bad-row count, fingerprint
    encoder.json           fitted vocabularies and numeric statistics
    <split>/labels.bin     float32 [N]
    <split>/cat_ids.bin    int32 [N, Fc] (int64 when the table has >= 2^31 rows): local ids, never floats
    <split>/num_values.bin float32 [N, Fn], NaN = missing
    <split>/multi<k>_ids.bin int32 [nnz], multi<k>_weights.bin float32 [nnz], multi<k>_offsets.bin int64 [N+1]
    <split>/group.bin      int64 [N] (hash of the group column, for gAUC; only when data.group_column is set)
    <split>/weights.bin    float32 [N] (sample weights; only when data.weight_column is set)

The folder is written under a temporary name and renamed when complete (``deepfm.io.atomic_path``), so a crash
never leaves a half-written cache that a later run would trust; the next preparation removes the temporary
folders of processes of this host that are gone. Where a split goes row by row is ``deepfm.data.routing``; the
split files themselves are ``deepfm.data.splitfiles``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import Config
from deepfm.data import fastpath, inputs
from deepfm.data.batch import SplitArrays
from deepfm.data.encoder import Encoder
from deepfm.data.hashing import fnv1a64
from deepfm.data.readers import BadRows, RawChunk
from deepfm.data.routing import (kept_by_sampling, route_rows, split_of_rows,  # noqa: F401 (re-exported)
                                 time_split_of_chunk, train_chunks)
from deepfm.data.splitfiles import SplitWriter, id_dtype, open_split, select_rows
from deepfm.errors import DataError
from deepfm.io import atomic_path, remove_dead_temporaries
from deepfm.layout import TableLayout
from deepfm.progress import progress_bar

STORE_VERSION = 1
SPLITS = ("train", "valid", "test")
# A training file up to this size is parsed once and its chunks kept in memory between the fitting and the
# encoding pass; a larger one is read twice: parsed text takes several times its file size, so keeping it
# trades peak memory for one parse less (bench/FIGURES.md).
KEEP_PARSED_BELOW_FILE_BYTES = 256 << 20


@dataclass
class PreparedData:
    """A prepared data folder: its manifest, the fitted encoder, the table layout and the splits' arrays.
    ``close`` (or a ``with`` block) closes the descriptors the splits' reads opened."""

    path: Path
    manifest: dict
    encoder: Encoder
    layout: TableLayout
    splits: dict[str, SplitArrays]
    reused: bool = False

    def close(self) -> None:
        for split in self.splits.values():
            split.close()

    def __enter__(self) -> PreparedData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fingerprint(cfg: Config, parent: Encoder | None = None, files: inputs.SplitFiles | None = None) -> str:
    data = cfg.data.model_dump(mode="json", exclude={"cache_dir", "chunk_rows", "id_columns", "s3_endpoint_url",
                                                     "prepare_on"})
    files = inputs.split_files(cfg.data) if files is None else files
    stamps = {k: inputs.stamp_of(getattr(cfg.data, k), v) for k, v in files.items()}
    grown_from = None if parent is None else \
        hashlib.sha256(json.dumps(parent.to_json(), sort_keys=True).encode()).hexdigest()
    payload = {"store_version": STORE_VERSION, "data": data, "grown_from": grown_from,
               "fields": [f.model_dump(mode="json", exclude={"names"}) for f in cfg.fields], "files": stamps}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def load_prepared(path: Path, cfg: Config, parent: Encoder | None = None) -> PreparedData:
    manifest = json.loads((path / "manifest.json").read_text())
    encoder = Encoder.from_json(cfg.fields, cfg.data, json.loads((path / "encoder.json").read_text()))
    encoder.parent = parent
    layout = TableLayout.from_json(manifest["layout"])
    ids_dtype = np.dtype(manifest["id_dtype"])
    splits = {name: open_split(path / name, meta, ids_dtype, len(layout.multi_fields))
              for name, meta in manifest["splits"].items()}
    return PreparedData(path, manifest, encoder, layout, splits, reused=True)


def prepare(cfg: Config, progress: bool = True, log=print, parent: Encoder | None = None) -> PreparedData:
    """Fit the encoder on the training split and write every split as typed arrays (or reuse the cache).
    With ``parent`` (a trained model's encoder) the vocabularies grow from the parent's (see ``deepfm.data.vocab``)."""
    files = inputs.split_files(cfg.data)
    fp = fingerprint(cfg, parent, files)
    root = Path(cfg.data.cache_dir)
    final = root / fp
    if root.is_dir():
        remove_dead_temporaries(root)
    if (final / "manifest.json").is_file():
        log(f"Reusing prepared data {final}")
        data = load_prepared(final, cfg, parent)
        _report_bad_rows(data, log)
        return data
    with atomic_path(final, directory=True, keep_existing=True) as tmp:  # another process may finish first
        _prepare_into(tmp, cfg, fp, progress, log, parent, files)
    data = load_prepared(final, cfg, parent)
    data.reused = False
    _report_bad_rows(data, log)
    return data


def _report_bad_rows(data: PreparedData, log) -> None:
    """The skipped-row count kept in the manifest, said on every run that uses the prepared data."""
    if data.manifest["bad_rows"]:
        log(f"Skipped {data.manifest['bad_rows']} bad row(s); they are listed in {data.path / 'bad_rows.txt'} "
            f"(first: {data.manifest['bad_row_examples'][0][:200]})")


def _prepare_fast(folder: Path, cfg: Config, log, parent: Encoder | None,
                  files: inputs.SplitFiles) -> tuple[Encoder, dict[str, SplitWriter]] | None:
    """The fast path (``deepfm.data.fastpath``) where it applies and the data is clean; else None."""
    why = fastpath.why_not(cfg) or fastpath.why_not_files(files)
    if why is not None:
        if cfg.data.format in ("csv", "tsv"):
            log(f"Preparing with the general path ({why})")
        return None
    encoder = Encoder(cfg.fields, cfg.data, parent=parent)
    writers: dict[str, SplitWriter] = {}

    def writer_for(name: str) -> SplitWriter:
        if name not in writers:  # ids are int32 until renumbered (the table's size is known only then)
            writers[name] = SplitWriter(folder / name, np.dtype(np.int32), len(encoder.bag_codecs), False,
                                         cfg.data.weight_column is not None)
        return writers[name]

    try:
        fastpath.prepare_splits(cfg, encoder, writer_for, files)
    except fastpath.Unsupported as err:
        log(f"Fast preparation stopped ({str(err)[:200]}); preparing with the general path, which reports "
            "bad rows by file, line and field")
        for name, w in writers.items():  # leave the folder as the general path expects it
            w.close()
            shutil.rmtree(folder / name, ignore_errors=True)
        return None
    return encoder, writers


def _prepare_into(folder: Path, cfg: Config, fp: str, progress: bool, log, parent: Encoder | None,
                  files: inputs.SplitFiles) -> None:
    t0 = time.perf_counter()
    fast = _prepare_fast(folder, cfg, log, parent, files)
    if fast is not None:
        encoder, writers = fast
        finish_store(folder, cfg, fp, encoder, writers, None, sum(w.rows for w in writers.values()), t0,
                     fast_path=True)
        return
    bad = BadRows(folder / "bad_rows.txt") if cfg.data.skip_bad_rows else None
    encoder = Encoder(cfg.fields, cfg.data, parent=parent)
    # vocabularies see the training rows once; bad rows are reported by the encoding pass, not twice
    # The training file is read once when its parsed chunks fit in memory (kept for the encoding pass),
    # twice otherwise. Bad rows are reported by whichever pass is the last to see them.
    small = inputs.parsed_bytes(files["train"]) <= KEEP_PARSED_BELOW_FILE_BYTES and cfg.data.split is None \
        and cfg.data.negative_sampling_rate == 1.0
    kept_chunks: list[RawChunk] | None = [] if small else None

    def remember(chunks: Iterator[RawChunk]) -> Iterator[RawChunk]:
        for chunk in chunks:
            if kept_chunks is not None:
                kept_chunks.append(chunk)
            yield chunk

    fit_bad = BadRows() if bad is not None else None
    encoder.fit(progress_bar(remember(train_chunks(cfg, fit_bad, files["train"])), desc="fit vocabularies",
                             enabled=progress, unit="chunk"), bad=fit_bad)
    parts = []
    for split_name, split_files in files.items():
        reuse = split_name == "train" and kept_chunks is not None
        if reuse and bad is not None and fit_bad is not None:  # report what the reading pass skipped
            for entry in fit_bad.entries:
                bad.add(*entry)
        parts.append((split_name, iter(kept_chunks) if reuse else inputs.read_files(split_files, cfg.data, bad),
                      reuse))
    writers, total_rows, dropped = encode_splits(folder, cfg, encoder, parts, bad, progress)
    if bad is not None:
        bad.close()
    finish_store(folder, cfg, fp, encoder, writers, bad, total_rows, t0, negatives_dropped=dropped)


def encode_splits(folder: Path, cfg: Config, encoder: Encoder, parts: Iterable[tuple[str, Iterable[RawChunk], bool]],
                  bad: BadRows | None, progress: bool) -> tuple[dict[str, SplitWriter], int, int]:
    """Encode chunks with a fitted ``encoder`` into split files under ``folder``. ``parts``: (split name, its
    chunks, whether they are chunks kept from the fitting pass, already reported and routed); the chunks of
    ``train`` are routed to train / valid / test by ``data.split`` and downsampled. Returns the writers, rows
    read and negatives dropped."""
    layout = encoder.layout()
    ids_dtype = id_dtype(layout)
    n_multi = len(layout.multi_fields)
    with_group = cfg.data.group_column is not None
    with_weights = cfg.data.weight_column is not None
    writers: dict[str, SplitWriter] = {}

    def writer(name: str) -> SplitWriter:
        if name not in writers:
            writers[name] = SplitWriter(folder / name, ids_dtype, n_multi, with_group, with_weights)
        return writers[name]

    total_rows = dropped = 0
    for split_name, split_chunks, reuse in parts:
        for chunk in progress_bar(split_chunks, desc=f"encode {split_name}", enabled=progress, unit="chunk"):
            total_rows += len(chunk)
            routed = split_name == "train" and not reuse
            if routed:
                chunk, assign, n_dropped = route_rows(chunk, cfg.data, bad)
                dropped += n_dropped
            # a kept chunk is re-validated against a throwaway sink: its bad rows were reported above
            enc = encoder.transform(chunk, weights=with_weights,
                                    bad=(BadRows() if bad is not None else None) if reuse else bad)
            group = None
            if with_group:
                gcol = chunk.frame[cfg.data.group_column].filter(pl.Series(enc.kept))
                group = fnv1a64(gcol.cast(pl.Utf8).to_arrow()).view(np.int64)
            if routed and cfg.data.split is not None:
                assign = assign[enc.kept]
                for code, name in enumerate(SPLITS):
                    m = assign == code
                    writer(name).append(select_rows(enc, m), group[m] if group is not None else None)
            else:
                writer(split_name).append(enc, group)
    return writers, total_rows, dropped


def finish_store(folder: Path, cfg: Config, fp: str, encoder: Encoder, writers: dict[str, SplitWriter],
                 bad: BadRows | None, total_rows: int, t0: float, fast_path: bool = False,
                 negatives_dropped: int = 0, require_train: bool = True,
                 extra: dict[str, Any] | None = None) -> None:
    """The last step of every preparation (one process's, or each rank's: ``deepfm.data.ranked``): close the
    split files and write the encoder and the manifest (with ``extra`` entries, such as a rank's share)."""
    layout = encoder.layout()
    splits = {name: w.close() for name, w in writers.items()}
    if require_train and splits.get("train", {}).get("rows", 0) == 0:
        raise DataError("no training rows left after preparation", path=inputs.describe(cfg.data.train))
    manifest = {
        "store_version": STORE_VERSION, "fingerprint": fp, "id_dtype": id_dtype(layout).name,
        "layout": layout.to_json(), "splits": splits, "rows_read": total_rows,
        "bad_rows": bad.count if bad is not None else 0,
        "seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "fast_path": fast_path, "negatives_dropped": negatives_dropped, **(extra or {}),
    }
    (folder / "encoder.json").write_text(json.dumps(encoder.to_json()))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if bad is not None and bad.count:
        manifest["bad_row_examples"] = bad.examples
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
