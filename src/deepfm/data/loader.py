"""Batches by slicing memory-mapped arrays, shuffled in blocks, prefetched on a background thread.

Shuffling permutes blocks of ``block_rows`` consecutive rows (seeded by ``(seed, epoch)``), so a batch
gathers a handful of contiguous runs from the memory maps instead of thousands of random rows: near
random-order statistics at sequential-read speed, and a dataset larger than RAM trains with bounded memory.
The order depends only on ``(seed, epoch)``, so a resumed run can skip exactly the batches it already did.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from deepfm.data.encoder import EncodedChunk
from deepfm.data.store import SplitArrays

RELEASE_EVERY = 64  # batches between drops of the touched memory-mapped pages


@dataclass
class ModelInput:
    """The model's inputs for a batch of ``B`` rows (``nnz`` = tags over all multi-valued fields).

    cat_ids       int64   [B, Fc]   local ids of single-valued categorical fields
    num_values    float32 [B, Fn]   scaled numeric values, NaN = missing
    multi_ids     int64   [nnz]     local ids of the tags of multi-valued fields
    multi_weights float32 [nnz]     their weights (values)
    multi_bags    int64   [nnz]     bag of each tag: field_index * B + row
    labels        float32 [B]       (None when predicting)
    """

    cat_ids: torch.Tensor
    num_values: torch.Tensor
    multi_ids: torch.Tensor
    multi_weights: torch.Tensor
    multi_bags: torch.Tensor
    labels: torch.Tensor | None = None
    group: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.cat_ids.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of ``DeepFM.forward``."""
        return self.cat_ids, self.num_values, self.multi_ids, self.multi_weights, self.multi_bags

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ModelInput:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return ModelInput(*(mv(t) for t in (self.cat_ids, self.num_values, self.multi_ids,  # type: ignore
                                            self.multi_weights, self.multi_bags, self.labels, self.group)))

    def pin_memory(self) -> ModelInput:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return ModelInput(*(pin(t) for t in (self.cat_ids, self.num_values, self.multi_ids,  # type: ignore
                                             self.multi_weights, self.multi_bags, self.labels, self.group)))


def _bags(lengths_per_field: list[np.ndarray], batch: int) -> np.ndarray:
    if not lengths_per_field:
        return np.zeros(0, dtype=np.int64)
    lengths = np.concatenate(lengths_per_field)
    return np.repeat(np.arange(len(lengths_per_field) * batch, dtype=np.int64), lengths)


def make_input(cat_ids: np.ndarray, num_values: np.ndarray, multi: list[tuple[np.ndarray, np.ndarray,
               np.ndarray]], labels: np.ndarray | None = None, group: np.ndarray | None = None) -> ModelInput:
    """Build a ``ModelInput`` from numpy arrays; ``multi`` holds (ids, weights, lengths) per field."""
    b = cat_ids.shape[0]
    if multi:
        ids = np.concatenate([m[0] for m in multi]).astype(np.int64, copy=False)
        weights = np.concatenate([m[1] for m in multi]).astype(np.float32, copy=False)
    else:
        ids, weights = np.zeros(0, np.int64), np.zeros(0, np.float32)
    bags = _bags([m[2] for m in multi], b)
    return ModelInput(
        _tensor(cat_ids, np.int64), _tensor(num_values, np.float32), _tensor(ids, np.int64),
        _tensor(weights, np.float32), torch.from_numpy(bags),
        None if labels is None else _tensor(labels, np.float32),
        None if group is None else _tensor(group, np.int64),
    )


def _tensor(arr: np.ndarray, dtype: type) -> torch.Tensor:
    """A tensor owning its memory (slices of read-only memory maps are copied once, converted as needed)."""
    if arr.dtype == dtype and arr.flags.c_contiguous and arr.flags.writeable:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, dtype=dtype, order="C"))


def input_from_chunk(enc: EncodedChunk) -> ModelInput:
    return make_input(enc.cat_ids, enc.num_values, [(m.ids, m.weights, m.lengths) for m in enc.multi],
                      enc.labels)


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


def _slice_csr(ids: np.ndarray, weights: np.ndarray, offsets: np.ndarray, lo: int,
               hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = int(offsets[lo]), int(offsets[hi])
    return ids[a:b], weights[a:b], np.diff(offsets[lo:hi + 1])


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
            per = -(-(hi - lo) // world_size)
            out.append((min(lo + rank * per, hi), min(lo + (rank + 1) * per, hi)))
        else:
            out.append(np.array_split(rows, world_size)[rank])
    return out


def load_batch(split: SplitArrays, rows: np.ndarray | tuple[int, int]) -> ModelInput:
    if isinstance(rows, tuple):
        lo, hi = rows
        multi = [_slice_csr(i, w, o, lo, hi) for i, w, o in split.multi]
        group = None if split.group is None else split.group[lo:hi]
        return make_input(split.cat_ids[lo:hi], split.num_values[lo:hi], multi, split.labels[lo:hi], group)
    multi = [_gather_csr(i, w, o, rows) for i, w, o in split.multi]
    group = None if split.group is None else split.group[rows]
    return make_input(split.cat_ids[rows], split.num_values[rows], multi, split.labels[rows], group)


def iterate_batches(split: SplitArrays, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, block_rows: int = 32, start_batch: int = 0, prefetch: int = 4,
                    pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                    rows: tuple[int, int] | None = None) -> Iterator[ModelInput]:
    """Yield the batches of one epoch from ``start_batch`` on, loaded by a background thread.

    ``rank``/``world_size`` give this rank its part of every batch (training); ``rows`` restricts an
    unshuffled pass to the rows ``[lo, hi)`` (a rank's shard for evaluation).
    """
    if rows is not None:
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
                if k % RELEASE_EVERY == RELEASE_EVERY - 1:
                    split.release_pages()  # bounded memory on data larger than RAM
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
