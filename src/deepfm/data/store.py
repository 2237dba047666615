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

The folder is written under a temporary name (``.<fingerprint>.tmp-<pid>@<host>``) and renamed when complete,
so a crash never leaves a half-written cache that a later run would trust; the next preparation removes the
temporary folders of processes of this host that are gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from deepfm.config import Config, DataConfig, TimeSplitConfig
from deepfm.data import fastpath
from deepfm.data.batch import EncodedChunk, MultiValues, SplitArrays
from deepfm.data.codecs import label_expr
from deepfm.data.encoder import Encoder
from deepfm.data.hashing import fnv1a64
from deepfm.data import inputs
from deepfm.data.readers import BadRows, RawChunk
from deepfm.data.sources import Source
from deepfm.errors import DataError
from deepfm.layout import TableLayout
from deepfm.progress import progress_bar

STORE_VERSION = 1
SPLITS = ("train", "valid", "test")
# A training file up to this size is parsed once and its chunks kept in memory between the fitting and the
# encoding pass (parsed text takes several times its file size); a larger one is read twice (measured on
# 5M Criteo rows: keeping 1 GB of chunks raised peak RSS from 1.7 to 3.9 GB and saved 15% of the time).
KEEP_PARSED_BELOW_FILE_BYTES = 256 << 20


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    encoder: Encoder
    layout: TableLayout
    splits: dict[str, SplitArrays]
    reused: bool = False


def fingerprint(cfg: Config, parent: Encoder | None = None, files: inputs.SplitFiles | None = None) -> str:
    data = cfg.data.model_dump(mode="json", exclude={"cache_dir", "chunk_rows", "id_columns", "s3_endpoint_url"})
    files = inputs.split_files(cfg.data) if files is None else files
    stamps = {k: inputs.stamp_of(getattr(cfg.data, k), v) for k, v in files.items()}
    grown_from = None if parent is None else \
        hashlib.sha256(json.dumps(parent.to_json(), sort_keys=True).encode()).hexdigest()
    payload = {"store_version": STORE_VERSION, "data": data, "grown_from": grown_from,
               "fields": [f.model_dump(mode="json", exclude={"names"}) for f in cfg.fields], "files": stamps}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


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
        chunk = _subset(chunk, ok)
        assign = assign[ok]
    return chunk, assign, dropped


def _subset(chunk: RawChunk, mask: np.ndarray) -> RawChunk:
    return RawChunk(chunk.path, chunk.frame.filter(pl.Series(mask)), chunk.lines[mask], chunk.row_start,
                    chunk.absent_is_missing)


class _SplitWriter:
    """Appends encoded chunks to the raw binary files of one split."""

    def __init__(self, folder: Path, id_dtype: np.dtype, n_multi: int, with_group: bool,
                 with_weights: bool = False) -> None:
        folder.mkdir(parents=True)
        self.folder, self.id_dtype = folder, id_dtype
        self.rows = 0
        self.nnz = [0] * n_multi
        self.cat_width = self.num_width = 0
        self.with_group, self.with_weights = with_group, with_weights
        self._fh: dict[str, object] = {}

    def _write(self, name: str, arr: np.ndarray) -> None:
        fh = self._fh.get(name)
        if fh is None:
            fh = self._fh[name] = open(self.folder / f"{name}.bin", "wb")  # noqa: SIM115
            if name.endswith("_offsets"):
                fh.write(np.zeros(1, np.int64).tobytes())  # type: ignore[attr-defined]
        fh.write(np.ascontiguousarray(arr).data)  # type: ignore[attr-defined]

    def append(self, enc: EncodedChunk, group: np.ndarray | None) -> None:
        assert enc.labels is not None
        self.cat_width, self.num_width = enc.cat_ids.shape[1], enc.num_values.shape[1]
        self._write("labels", enc.labels.astype(np.float32, copy=False))
        if self.with_weights:
            assert enc.weights is not None
            self._write("weights", enc.weights.astype(np.float32, copy=False))
        self._write("cat_ids", enc.cat_ids.astype(self.id_dtype, copy=False))
        self._write("num_values", enc.num_values.astype(np.float32, copy=False))
        for k, mv in enumerate(enc.multi):
            self._write(f"multi{k}_ids", mv.ids.astype(self.id_dtype))
            self._write(f"multi{k}_weights", mv.weights.astype(np.float32))
            self._write(f"multi{k}_offsets", self.nnz[k] + np.cumsum(mv.lengths, dtype=np.int64))
            self.nnz[k] += int(mv.lengths.sum())
        if self.with_group and group is not None:
            self._write("group", group.astype(np.int64))
        self.rows += len(enc)

    def renumber_ids(self, cat_luts: list[np.ndarray], multi_luts: list[np.ndarray]) -> None:
        """Map column j of the written ids through ``cat_luts[j]`` and the ids of multi-valued field k through
        ``multi_luts[k]``, in place (the fast path's provisional ids)."""
        self._renumber("cat_ids", self.rows, cat_luts)
        for k, lut in enumerate(multi_luts):
            self._renumber(f"multi{k}_ids", self.nnz[k], [lut])

    def _renumber(self, name: str, rows: int, luts: list[np.ndarray], block_rows: int = 1 << 20) -> None:
        fh = self._fh.pop(name, None)
        if fh is None or not rows:
            return
        fh.close()  # type: ignore[attr-defined]
        # read and write blocks through the file, not a memory map: the mapped pages of a multi-GB file would
        # count in this process's resident memory (9 GB at 45M rows)
        width = len(luts)
        row_bytes = width * self.id_dtype.itemsize
        with open(self.folder / f"{name}.bin", "r+b") as f:
            for lo in range(0, rows, block_rows):
                n = min(block_rows, rows - lo)
                f.seek(lo * row_bytes)
                block = np.fromfile(f, dtype=self.id_dtype, count=n * width).reshape(n, width)
                for j, lut in enumerate(luts):
                    block[:, j] = lut[block[:, j]]
                f.seek(lo * row_bytes)
                f.write(block.data)

    def close(self) -> dict:
        for fh in self._fh.values():
            fh.close()  # type: ignore[attr-defined]
        # a split without rows still gets its (empty) files
        for name in ["labels", "cat_ids", "num_values"] + (["weights"] if self.with_weights else []) + \
                [f"multi{k}_{s}" for k in range(len(self.nnz)) for s in ("ids", "weights", "offsets")]:
            p = self.folder / f"{name}.bin"
            if not p.exists():
                p.write_bytes(np.zeros(1, np.int64).tobytes() if name.endswith("_offsets") else b"")
        return {"rows": self.rows, "nnz": self.nnz, "cat_width": self.cat_width, "num_width": self.num_width,
                "group": self.with_group, "weights": self.with_weights}


def _open_split(folder: Path, meta: dict, id_dtype: np.dtype, n_multi: int) -> SplitArrays:
    n = meta["rows"]

    def mm(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=shape)

    multi = [(mm(f"multi{k}_ids", id_dtype, (meta["nnz"][k],)),
              mm(f"multi{k}_weights", np.dtype(np.float32), (meta["nnz"][k],)),
              np.memmap(folder / f"multi{k}_offsets.bin", dtype=np.int64, mode="r", shape=(n + 1,)))
             for k in range(n_multi)]
    return SplitArrays(
        labels=mm("labels", np.dtype(np.float32), (n,)),
        cat_ids=mm("cat_ids", id_dtype, (n, meta["cat_width"])),
        num_values=mm("num_values", np.dtype(np.float32), (n, meta["num_width"])),
        multi=multi,
        group=mm("group", np.dtype(np.int64), (n,)) if meta.get("group") and n else None,
        weights=mm("weights", np.dtype(np.float32), (n,)) if meta.get("weights") else None,
    )


def load_prepared(path: Path, cfg: Config, parent: Encoder | None = None) -> PreparedData:
    manifest = json.loads((path / "manifest.json").read_text())
    encoder = Encoder.from_json(cfg.fields, cfg.data, json.loads((path / "encoder.json").read_text()))
    encoder.parent = parent
    layout = TableLayout.from_json(manifest["layout"])
    id_dtype = np.dtype(manifest["id_dtype"])
    splits = {name: _open_split(path / name, meta, id_dtype, len(layout.multi_fields))
              for name, meta in manifest["splits"].items()}
    return PreparedData(path, manifest, encoder, layout, splits, reused=True)


def _train_chunks(cfg: Config, bad: BadRows | None, files: list[Source]) -> Iterator[RawChunk]:
    """The training rows of ``data.train`` (after the split, before negative downsampling): what vocabularies
    and numeric statistics are fitted on. Downsampling saves training steps; the vocabularies still see every
    training row, so a value is not dropped below ``min_count`` because its negatives were sampled away."""
    for chunk in inputs.read_files(files, cfg.data, bad):
        chunk, assign, _ = route_rows(chunk, cfg.data, bad, sample=False)
        yield chunk if (assign == 0).all() else _subset(chunk, assign == 0)


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{fp}.tmp-{os.getpid()}@{socket.gethostname()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _prepare_into(tmp, cfg, fp, progress, log, parent, files)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = load_prepared(final, cfg, parent)
    data.reused = False
    _report_bad_rows(data, log)
    return data


def _report_bad_rows(data: PreparedData, log) -> None:
    """The skipped-row count kept in the manifest, said on every run that uses the prepared data."""
    if data.manifest["bad_rows"]:
        log(f"Skipped {data.manifest['bad_rows']} bad row(s); they are listed in {data.path / 'bad_rows.txt'} "
            f"(first: {data.manifest['bad_row_examples'][0][:200]})")


_TEMPORARY = re.compile(r"\.[0-9a-f]+\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?")


def remove_dead_temporaries(root: Path) -> list[Path]:
    """Remove the temporary folders under ``root`` left by preparations killed on this host (their process is
    gone); a folder of a live process, or of another host sharing the cache, is kept. Returns those removed."""
    removed = []
    host = socket.gethostname()
    for entry in root.iterdir():
        m = _TEMPORARY.fullmatch(entry.name)
        if m is None or (m["host"] is not None and m["host"] != host) or _alive(int(m["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _prepare_fast(folder: Path, cfg: Config, log, parent: Encoder | None,
                  files: inputs.SplitFiles) -> tuple[Encoder, dict[str, _SplitWriter]] | None:
    """The fast path (``deepfm.data.fastpath``) where it applies and the data is clean; else None."""
    why = fastpath.why_not(cfg) or fastpath.why_not_files(files)
    if why is not None:
        if cfg.data.format in ("csv", "tsv"):
            log(f"Preparing with the general path ({why})")
        return None
    encoder = Encoder(cfg.fields, cfg.data, parent=parent)
    writers: dict[str, _SplitWriter] = {}

    def writer_for(name: str) -> _SplitWriter:
        if name not in writers:  # ids are int32 until renumbered (the table's size is known only then)
            writers[name] = _SplitWriter(folder / name, np.dtype(np.int32), len(encoder.bag_codecs), False,
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


def _id_dtype(layout: TableLayout) -> np.dtype:
    return np.dtype(np.int32 if layout.num_rows < 2**31 else np.int64)


def _prepare_into(folder: Path, cfg: Config, fp: str, progress: bool, log, parent: Encoder | None,
                  files: inputs.SplitFiles) -> None:
    t0 = time.perf_counter()
    fast = _prepare_fast(folder, cfg, log, parent, files)
    if fast is not None:
        encoder, writers = fast
        _finish(folder, cfg, fp, encoder, writers, None, sum(w.rows for w in writers.values()), t0, fast_path=True)
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
    encoder.fit(progress_bar(remember(_train_chunks(cfg, fit_bad, files["train"])), desc="fit vocabularies", enabled=progress,
                             unit="chunk"), bad=fit_bad)
    layout = encoder.layout()
    id_dtype = _id_dtype(layout)
    n_multi = len(layout.multi_fields)
    with_group = cfg.data.group_column is not None
    with_weights = cfg.data.weight_column is not None
    writers: dict[str, _SplitWriter] = {}

    def writer(name: str) -> _SplitWriter:
        if name not in writers:
            writers[name] = _SplitWriter(folder / name, id_dtype, n_multi, with_group, with_weights)
        return writers[name]

    total_rows = dropped = 0
    for split_name, split_files in files.items():
        reuse = split_name == "train" and kept_chunks is not None
        if reuse and bad is not None and fit_bad is not None:  # report what the reading pass skipped
            for entry in fit_bad.entries:
                bad.add(*entry)
        chunks = progress_bar(iter(kept_chunks) if reuse else inputs.read_files(split_files, cfg.data, bad),  # type: ignore
                              desc=f"encode {split_name}", enabled=progress, unit="chunk")
        for chunk in chunks:
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
                    writer(name).append(_select(enc, m), group[m] if group is not None else None)
            else:
                writer(split_name).append(enc, group)
    if bad is not None:
        bad.close()
    _finish(folder, cfg, fp, encoder, writers, bad, total_rows, t0, negatives_dropped=dropped)


def _finish(folder: Path, cfg: Config, fp: str, encoder: Encoder, writers: dict[str, _SplitWriter],
            bad: BadRows | None, total_rows: int, t0: float, fast_path: bool = False,
            negatives_dropped: int = 0) -> None:
    """Close the split files and write the encoder and the manifest."""
    layout = encoder.layout()
    splits = {name: w.close() for name, w in writers.items()}
    if splits.get("train", {}).get("rows", 0) == 0:
        raise DataError("no training rows left after preparation", path=inputs.describe(cfg.data.train))
    manifest = {
        "store_version": STORE_VERSION, "fingerprint": fp, "id_dtype": _id_dtype(layout).name,
        "layout": layout.to_json(), "splits": splits, "rows_read": total_rows,
        "bad_rows": bad.count if bad is not None else 0,
        "seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "fast_path": fast_path, "negatives_dropped": negatives_dropped,
    }
    (folder / "encoder.json").write_text(json.dumps(encoder.to_json()))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if bad is not None and bad.count:
        manifest["bad_row_examples"] = bad.examples
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _select(enc: EncodedChunk, mask: np.ndarray) -> EncodedChunk:
    multi = []
    for mv in enc.multi:
        row_of = np.repeat(np.arange(len(mv.lengths)), mv.lengths)
        keep = mask[row_of]
        multi.append(MultiValues(mv.ids[keep], mv.weights[keep], mv.lengths[mask]))
    assert enc.labels is not None
    return EncodedChunk(enc.labels[mask], enc.cat_ids[mask], enc.num_values[mask], multi, enc.kept,
                        None if enc.weights is None else enc.weights[mask])
