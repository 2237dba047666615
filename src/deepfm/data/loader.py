"""Batches by slicing memory-mapped arrays, shuffled in blocks, prefetched on a background thread.

Shuffling permutes blocks of ``block_rows`` consecutive rows (seeded by ``(seed, epoch)``), so a batch
reads a hundred or so contiguous runs instead of thousands of random rows: near random-order statistics at
sequential-read speed. A split larger than ``MAP_BELOW_BYTES`` is read with ``pread`` into each batch's
arrays instead of through its memory map, so a dataset larger than RAM trains with bounded memory (mapped
pages would count in the process's resident memory; with large page-cache folios one row maps 2 MB).
The order depends only on ``(seed, epoch)``, so a resumed run can skip exactly the batches it already did.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import numpy as np

from deepfm.data.batch import (ModelInput, OpenFiles, SplitArrays, input_from_chunk,  # noqa: F401 (re-exported)
                               make_input)
from deepfm.layout import rank_share


def runs_of(rows: np.ndarray | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices (or a ``(lo, hi)`` slice) -> the ``[start, stop)`` runs of consecutive rows."""
    if isinstance(rows, tuple):
        return np.array([rows[0]], np.int64), np.array([rows[1]], np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    return rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, rows.size - 1]] + 1


def take_runs(arr: np.ndarray, starts: np.ndarray, stops: np.ndarray, files: OpenFiles | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of every run, concatenated, as a new array.

    For a memory-mapped array the rows are read with ``pread`` (through a descriptor of ``files``, the
    split's) into the new array rather than touched through the mapping: mapped pages count in the process's
    resident memory (with large page-cache folios one touched row can map 2 MB), pread's do not, so a file
    larger than RAM trains in bounded memory.
    """
    count = int((stops - starts).sum())
    out = np.empty((count, *arr.shape[1:]), dtype=arr.dtype)
    path = getattr(arr, "filename", None)
    if count == 0:
        return out
    if path is None or files is None:
        np.concatenate([arr[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)], out=out)
        return out
    row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    fd, base = files.fd(path), int(arr.offset)
    buf = memoryview(out.reshape(-1)).cast("B")
    pos = 0
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        size = (b - a) * row_bytes
        if os.preadv(fd, [buf[pos:pos + size]], base + a * row_bytes) != size:
            raise OSError(f"{path}: short read (was the prepared data changed while training?)")
        pos += size
    return out


def _take_csr(ids: np.ndarray, weights: np.ndarray, offsets: np.ndarray, starts: np.ndarray,
              stops: np.ndarray, files: OpenFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tags of the rows in the runs: (ids, weights, lengths per row)."""
    offs = take_runs(offsets, starts, stops + 1, files)  # each run's offsets, one more than its rows
    run_len = stops - starts + 1
    first = np.concatenate(([0], np.cumsum(run_len)[:-1]))
    lengths = np.diff(offs)
    keep = np.ones(lengths.size, dtype=bool)
    keep[first[1:] - 1] = False  # the differences that straddle two runs
    tag_starts, tag_stops = offs[first], offs[first + run_len - 1]
    return (take_runs(ids, tag_starts, tag_stops, files), take_runs(weights, tag_starts, tag_stops, files),
            lengths[keep])


def batch_rows(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, block_rows: int,
               rank: int = 0, world_size: int = 1) -> list[np.ndarray | tuple[int, int]]:
    """The rows of each batch of an epoch: ``(lo, hi)`` slices in order, or sorted row arrays when shuffled.

    With ``world_size > 1`` every global batch is cut into ``world_size`` contiguous parts and this rank
    gets part ``rank``: the ranks together see exactly the batches one process would.
    """
    if not shuffle:
        plan: list = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng([seed, epoch])
        n_blocks = -(-n // block_rows)
        order = (rng.permutation(n_blocks)[:, None] * block_rows + np.arange(block_rows)).ravel()
        order = order[order < n]
        plan = [np.sort(order[lo:lo + batch_size]) for lo in range(0, n, batch_size)]
        if len(plan) > 1 and len(plan[-1]) < 2 * world_size:
            plan.pop()  # a training batch needs >= 2 rows per rank (batch norm); drop a tiny remainder
    if world_size == 1:
        return plan
    out: list[np.ndarray | tuple[int, int]] = []
    for rows in plan:
        if isinstance(rows, tuple):
            lo, hi = rows
            a, b = rank_share(hi - lo, rank, world_size)
            out.append((lo + a, lo + b))
        else:
            out.append(np.array_split(rows, world_size)[rank])
    return out


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# Splits up to this size are read through their memory maps (fastest: fancy indexing, no syscalls); their
# pages then count in the process's resident memory, bounded by this size. Larger splits are read with pread.
MAP_BELOW_BYTES = min(4 << 30, _ram_bytes() // 4)


def _gather_csr(ids: np.ndarray, weights: np.ndarray, offsets: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, ids.dtype), np.zeros(0, np.float32), lengths
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    pos = first + np.arange(total)
    return ids[pos], weights[pos], lengths


def load_batch(split: SplitArrays, rows: np.ndarray | tuple[int, int]) -> ModelInput:
    """The batch of the given rows (sorted indices or a ``(lo, hi)`` slice)."""
    if split.nbytes <= MAP_BELOW_BYTES:
        if isinstance(rows, tuple):
            rows = np.arange(rows[0], rows[1], dtype=np.int64)
        multi = [_gather_csr(i, w, o, rows) for i, w, o in split.multi]
        group = None if split.group is None else split.group[rows]
        weights = None if split.weights is None else split.weights[rows]
        return make_input(split.cat_ids[rows], split.num_values[rows], multi, split.labels[rows], group, weights)
    starts, stops = runs_of(rows)

    def take(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else take_runs(arr, starts, stops, split.files)

    multi = [_take_csr(i, w, o, starts, stops, split.files) for i, w, o in split.multi]
    return make_input(take(split.cat_ids), take(split.num_values), multi, take(split.labels), take(split.group),
                      take(split.weights))


def iterate_batches(split: SplitArrays, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, block_rows: int = 32, start_batch: int = 0, prefetch: int = 4,
                    pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                    rows: tuple[int, int] | None = None, plan: list | None = None) -> Iterator[ModelInput]:
    """Yield the batches of one epoch from ``start_batch`` on, loaded by a background thread.

    ``rank``/``world_size`` give this rank its part of every batch (training); ``rows`` restricts an
    unshuffled pass to the rows ``[lo, hi)`` (a rank's shard for evaluation); ``plan``: the epoch's batches as
    rows already chosen (``deepfm.train.rowshare``).
    """
    if plan is not None:
        plan = plan[start_batch:]
    elif rows is not None:
        lo, hi = rows
        plan: list = [(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)][start_batch:]
    else:
        plan = batch_rows(len(split), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                          block_rows=block_rows, rank=rank, world_size=world_size)[start_batch:]
    if not plan:
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for k, rows in enumerate(plan):
                if stop.is_set():
                    return
                batch = load_batch(split, rows)
                q.put(batch.pin_memory() if pin_memory else batch)
            q.put(done)
        except BaseException as err:  # hand the error to the consumer
            q.put(err)

    thread = threading.Thread(target=work, name="deepfm-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
