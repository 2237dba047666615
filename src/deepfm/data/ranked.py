"""Preparation on every rank (``data.prepare_on: every_rank`` under ``torchrun``): no shared filesystem needed.

Each rank reads and encodes a disjoint share of the input files (``assign_files``: largest first to the least
loaded rank, so the shares' bytes are balanced and the same on every rank). Vocabulary counts are exchanged
with ``torch.distributed`` collectives and merged; numeric aggregations travel per chunk and are folded in the
order one process would read the chunks, so every rank builds the vocabularies and statistics one process
builds from the same files, bit for bit. The seeded split and negative sampling draw per global row index:
when either is on, ranks first count the rows of their files and exchange the counts (one extra read).

Every rank keeps its encoded training rows in its own cache folder (``<fingerprint>-r<rank>of<world>``) and
trains on them (``deepfm.train.rowshare.LocalRows``). The validation and test rows are few by comparison and
are gathered onto every rank, so that evaluation stays exact and unchanged.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from deepfm.config import Config, SplitConfig
from deepfm.data import inputs
from deepfm.data.batch import EncodedChunk, MultiValues
from deepfm.data.encoder import Encoder, fold_stats
from deepfm.data.readers import BadRows
from deepfm.data.routing import route_rows, subset_rows
from deepfm.data.sources import Source
from deepfm.data.splitfiles import SplitWriter, id_dtype, open_split
from deepfm.data.store import PreparedData, encode_splits, finish_store, fingerprint, load_prepared, prepare
from deepfm.errors import DataError
from deepfm.io import atomic_path
from deepfm.train import distributed as ddp


def assign_files(sizes: list[int], world_size: int) -> list[list[int]]:
    """Which files (indices, in order) each rank reads: the largest first, each to the rank with the fewest bytes
    so far (the lowest rank on a tie). Deterministic, so every rank computes the same shares."""
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda j: (load[j], j))
        shares[r].append(k)
        load[r] += sizes[k]
    return [sorted(s) for s in shares]


def _needs_row_index(cfg: Config) -> bool:
    return isinstance(cfg.data.split, SplitConfig) or cfg.data.negative_sampling_rate < 1.0


def _offsets(cfg: Config, files: list[Source], mine: list[int], dist: ddp.DistContext) -> list[int]:
    """The global index of each file's first row (what one process reading every file in order would number)."""
    counts = np.zeros(len(files), dtype=np.int64)
    if _needs_row_index(cfg):
        for k in mine:
            for chunk in inputs.read_files([files[k]], cfg.data, BadRows() if cfg.data.skip_bad_rows else None):
                counts[k] = chunk.row_start + len(chunk)
        counts = np.sum(ddp.gather_objects(counts, dist), axis=0)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()


def _fit(cfg: Config, encoder: Encoder, files: list[Source], mine: list[int], offsets: list[int],
         dist: ddp.DistContext) -> None:
    """Count and aggregate this rank's training rows, then merge with every rank's (same result on each)."""
    counters = encoder.counters()
    stats: list[tuple[int, int, list]] = []  # (file, chunk, that chunk's aggregations)
    rows = 0
    fit_bad = BadRows() if cfg.data.skip_bad_rows else None
    for k in mine:
        for c, chunk in enumerate(inputs.read_files([files[k]], cfg.data, fit_bad, offsets=[offsets[k]])):
            chunk, assign, _ = route_rows(chunk, cfg.data, fit_bad, sample=False)
            if not (assign == 0).all():
                chunk = subset_rows(chunk, assign == 0)
            chunk, _ = encoder.validate(chunk, fit_bad, check_weight=True)  # as Encoder.fit does
            rows += len(chunk)
            encoder.count(chunk, counters)
            stats.append((k, c, encoder.chunk_stats(chunk)))
    if sum(ddp.gather_objects(rows, dist)) == 0:
        raise DataError("the training split has no rows to fit vocabularies on")
    mine_counts = {name: _ipc(counter.counts()) for name, counter in counters.items()}
    merged = encoder.counters()
    for theirs in ddp.gather_objects(mine_counts, dist):
        for name, blob in theirs.items():
            frame = pl.read_ipc(io.BytesIO(blob))
            merged[name].add_counts(frame["token"], frame["count"].to_numpy())
    acc: dict = {}
    for _, _, chunk_stats in sorted((s for part in ddp.gather_objects(stats, dist) for s in part), key=lambda s: s[:2]):
        fold_stats(acc, chunk_stats)
    encoder.set_fitted(merged, acc)


def _ipc(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc(buf)
    return buf.getvalue()


def _gather_split(folder: Path, name: str, meta: dict, id_dtype: np.dtype, n_multi: int, dist: ddp.DistContext,
                  writer: SplitWriter) -> None:
    """Every rank's rows of a held-out split, in rank order, written by ``writer`` on every rank."""
    local = open_split(folder / f"{name}.local", meta, id_dtype, n_multi) if meta["rows"] else None
    payload = None if local is None else {
        "labels": np.asarray(local.labels), "cat_ids": np.asarray(local.cat_ids),
        "num_values": np.asarray(local.num_values),
        "multi": [(np.asarray(i), np.asarray(w), np.diff(np.asarray(o))) for i, w, o in local.multi],
        "group": None if local.group is None else np.asarray(local.group),
        "weights": None if local.weights is None else np.asarray(local.weights)}
    for part in ddp.gather_objects(payload, dist):
        if part is None:
            continue
        enc = EncodedChunk(part["labels"], part["cat_ids"], part["num_values"],
                           [MultiValues(i, w, n) for i, w, n in part["multi"]], np.ones(len(part["labels"]), bool),
                           part["weights"])
        writer.append(enc, part["group"])
    if local is not None:
        local.close()
        shutil.rmtree(folder / f"{name}.local")


def prepare_for_ranks(cfg: Config, dist: ddp.DistContext, progress: bool = True, log=print,
                      parent: Encoder | None = None) -> PreparedData:
    """This rank's prepared data, as ``data.prepare_on`` says: one process prepares alone; under ``torchrun``
    rank 0 prepares the shared cache the others then map, or every rank prepares its share."""
    if dist.enabled and cfg.data.prepare_on == "every_rank":
        return prepare_on_ranks(cfg, dist, progress, log, parent)
    if dist.is_main:
        data = prepare(cfg, progress=progress, log=log, parent=parent)
    dist.barrier()  # the others wait for rank 0's preparation, then map the same files
    if not dist.is_main:
        data = prepare(cfg, progress=False, log=lambda _m: None, parent=parent)
    return data


def prepare_on_ranks(cfg: Config, dist: ddp.DistContext, progress: bool = True, log=print,
                     parent: Encoder | None = None) -> PreparedData:
    """This rank's prepared data: the merged encoder, its own training rows, every rank's held-out rows."""
    files = inputs.split_files(cfg.data)
    fp = fingerprint(cfg, parent, files)
    root = Path(cfg.data.cache_dir)
    final = root / f"{fp}-r{dist.rank}of{dist.world_size}"
    if min(ddp.gather_objects(int((final / "manifest.json").is_file()), dist)):  # all ranks have theirs: reuse
        log(f"Reusing prepared data {final} (each rank its own)")
        return load_prepared(final, cfg, parent)
    with atomic_path(final, directory=True) as tmp:  # this rank's folder, complete or absent
        _prepare_into(tmp, cfg, fp, files, dist, progress, log, parent)
    data = load_prepared(final, cfg, parent)
    data.reused = False
    return data


def _prepare_into(folder: Path, cfg: Config, fp: str, files: inputs.SplitFiles, dist: ddp.DistContext,
                  progress: bool, log, parent: Encoder | None) -> None:
    t0 = time.perf_counter()
    shares = {name: assign_files([f.size for f in fs], dist.world_size)[dist.rank] for name, fs in files.items()}
    train_files = files["train"]
    mine = shares["train"]
    log(f"Preparing on {dist.world_size} ranks: this rank reads {len(mine)} of {len(train_files)} training file(s), "
        f"{sum(train_files[k].size for k in mine):,} of {sum(f.size for f in train_files):,} bytes")
    offsets = _offsets(cfg, train_files, mine, dist)
    encoder = Encoder(cfg.fields, cfg.data, parent=parent)
    _fit(cfg, encoder, train_files, mine, offsets, dist)
    bad = BadRows(folder / "bad_rows.txt") if cfg.data.skip_bad_rows else None
    parts = [("train", inputs.read_files([train_files[k] for k in mine], cfg.data, bad,
                                         offsets=[offsets[k] for k in mine]), False)]
    parts += [(name, inputs.read_files([files[name][k] for k in shares[name]], cfg.data, bad), False)
              for name in ("valid", "test") if name in files]
    writers, total_rows, dropped = encode_splits(folder, cfg, encoder, parts, bad, progress and dist.is_main)
    if bad is not None:
        bad.close()
    held_out = {name: writers.pop(name) for name in ("valid", "test") if name in writers}
    layout = encoder.layout()
    n_multi = len(layout.multi_fields)

    def new_writer(name: str) -> SplitWriter:
        return SplitWriter(folder / name, id_dtype(layout), n_multi, cfg.data.group_column is not None,
                            cfg.data.weight_column is not None)

    for name in ("valid", "test"):  # every rank writes the same gathered split (every rank must take part)
        if name not in files and cfg.data.split is None:
            continue
        meta = {"rows": 0}
        if name in held_out:
            meta = held_out[name].close()
            os.rename(folder / name, folder / f"{name}.local")
        writers[name] = new_writer(name)
        _gather_split(folder, name, meta, id_dtype(layout), n_multi, dist, writers[name])
    if "train" not in writers:  # no training rows here: an empty split (the steps per epoch still agree)
        writers["train"] = new_writer("train")
    rows = [int(x) for x in ddp.gather_objects(writers["train"].rows, dist)]
    if sum(rows) == 0:
        raise DataError("no training rows left after preparation", path=inputs.describe(cfg.data.train))
    share = {"rank": dist.rank, "world_size": dist.world_size, "train_rows": rows,
             "train_files": [str(train_files[k]) for k in mine]}
    finish_store(folder, cfg, fp, encoder, writers, bad, total_rows, t0, negatives_dropped=dropped,
                 require_train=False, extra={"ranks": share})
