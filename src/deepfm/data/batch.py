"""The typed arrays between the engines and the model, apart from the readers: the encoded rows of a chunk
(``EncodedChunk``), a prepared split on disk (``SplitArrays``) and a batch of model inputs (``ModelInput``).
Importing this module pulls in numpy and torch only, so the model, the runtime and the server can use it.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MultiValues:
    ids: np.ndarray  # int64 [nnz]
    weights: np.ndarray  # float32 [nnz]
    lengths: np.ndarray  # int64 [N]


@dataclass
class EncodedChunk:
    labels: np.ndarray | None
    cat_ids: np.ndarray
    num_values: np.ndarray
    multi: list[MultiValues]
    kept: np.ndarray  # bool [N_raw]: rows of the raw chunk that were encoded (all True unless skipping)
    weights: np.ndarray | None = None  # float32 [N]: sample weights (data.weight_column), else None

    def __len__(self) -> int:
        return int(self.cat_ids.shape[0])


class OpenFiles:
    """Read-only descriptors of one split's files, opened on first use (the loader's ``pread`` of a large
    split) and closed with the split that owns them: by ``close``, or when it is garbage-collected. Nothing is
    kept per process, so repeated fits in one process (``deepfm tune``, a notebook) do not accumulate them."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, OpenFiles._close_all, self._fds, self._lock)

    def fd(self, path: str) -> int:
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError(f"{path}: the split was closed")
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _close_all(fds: dict[str, int], lock: threading.Lock) -> None:
        with lock:
            for fd in fds.values():
                os.close(fd)
            fds.clear()


@dataclass
class SplitArrays:
    """Memory-mapped arrays of one prepared split (``deepfm.data.store`` writes them), and the descriptors
    its reads opened (``files``): closed by ``close`` or a ``with`` block, else when the split is collected.

    labels float32 [N]; cat_ids int32/int64 [N, Fc]; num_values float32 [N, Fn]; per multi-valued field
    (ids [nnz], weights float32 [nnz], offsets int64 [N+1]); group int64 [N] or None; sample weights float32
    [N] (``data.weight_column``) or None."""

    labels: np.ndarray
    cat_ids: np.ndarray
    num_values: np.ndarray
    multi: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (ids, weights, offsets)
    group: np.ndarray | None = None
    weights: np.ndarray | None = None
    files: OpenFiles = field(default_factory=OpenFiles, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def close(self) -> None:
        """Close the descriptors reads opened (the memory maps go with the arrays, when they are collected)."""
        self.files.close()

    def __enter__(self) -> SplitArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        arrays = [self.labels, self.cat_ids, self.num_values, self.group, self.weights] + \
            [a for m in self.multi for a in m]
        return sum(int(a.nbytes) for a in arrays if a is not None)


@dataclass
class ModelInput:
    """The model's inputs for a batch of ``B`` rows (``nnz`` = tags over all multi-valued fields).

    cat_ids       int64   [B, Fc]   local ids of single-valued categorical fields
    num_values    float32 [B, Fn]   scaled numeric values, NaN = missing
    multi_ids     int64   [nnz]     local ids of the tags of multi-valued fields
    multi_weights float32 [nnz]     their weights (values)
    multi_bags    int64   [nnz]     bag of each tag: field_index * B + row
    labels        float32 [B]       (None when predicting)
    group         int64   [B]       hashed group column (gAUC), or None
    weights       float32 [B]       sample weights (data.weight_column; training only), or None
    """

    cat_ids: torch.Tensor
    num_values: torch.Tensor
    multi_ids: torch.Tensor
    multi_weights: torch.Tensor
    multi_bags: torch.Tensor
    labels: torch.Tensor | None = None
    group: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.cat_ids.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of ``DeepFM.forward``."""
        return self.cat_ids, self.num_values, self.multi_ids, self.multi_weights, self.multi_bags

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ModelInput:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return ModelInput(*(mv(t) for t in (self.cat_ids, self.num_values, self.multi_ids,  # type: ignore
                                            self.multi_weights, self.multi_bags, self.labels, self.group,
                                            self.weights)))

    def slice(self, lo: int, hi: int) -> ModelInput:
        """Rows ``lo:hi`` (multi-valued bags re-based; labels, group and weights are not carried)."""
        if lo == 0 and hi == len(self):
            return self
        b = len(self)
        field = torch.div(self.multi_bags, b, rounding_mode="floor")
        row = self.multi_bags - field * b
        keep = (row >= lo) & (row < hi)
        bags = field[keep] * (hi - lo) + (row[keep] - lo)
        order = torch.argsort(bags, stable=True)
        return ModelInput(self.cat_ids[lo:hi], self.num_values[lo:hi], self.multi_ids[keep][order],
                          self.multi_weights[keep][order], bags[order])

    def pin_memory(self) -> ModelInput:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return ModelInput(*(pin(t) for t in (self.cat_ids, self.num_values, self.multi_ids,  # type: ignore
                                             self.multi_weights, self.multi_bags, self.labels, self.group,
                                             self.weights)))


def _bags(lengths_per_field: list[np.ndarray], batch: int) -> np.ndarray:
    if not lengths_per_field:
        return np.zeros(0, dtype=np.int64)
    lengths = np.concatenate(lengths_per_field)
    return np.repeat(np.arange(len(lengths_per_field) * batch, dtype=np.int64), lengths)


def make_input(cat_ids: np.ndarray, num_values: np.ndarray, multi: list[tuple[np.ndarray, np.ndarray,
               np.ndarray]], labels: np.ndarray | None = None, group: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> ModelInput:
    """Build a ``ModelInput`` from numpy arrays; ``multi`` holds (ids, tag weights, lengths) per field, ``weights``
    the rows' sample weights."""
    b = cat_ids.shape[0]
    if multi:
        ids = np.concatenate([m[0] for m in multi]).astype(np.int64, copy=False)
        tag_weights = np.concatenate([m[1] for m in multi]).astype(np.float32, copy=False)
    else:
        ids, tag_weights = np.zeros(0, np.int64), np.zeros(0, np.float32)
    bags = _bags([m[2] for m in multi], b)
    return ModelInput(
        _tensor(cat_ids, np.int64), _tensor(num_values, np.float32), _tensor(ids, np.int64),
        _tensor(tag_weights, np.float32), torch.from_numpy(bags),
        None if labels is None else _tensor(labels, np.float32),
        None if group is None else _tensor(group, np.int64),
        None if weights is None else _tensor(weights, np.float32),
    )


def _tensor(arr: np.ndarray, dtype: type) -> torch.Tensor:
    """A tensor owning its memory (slices of read-only memory maps are copied once, converted as needed)."""
    if arr.dtype == dtype and arr.flags.c_contiguous and arr.flags.writeable:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr, dtype=dtype, order="C"))


def input_from_chunk(enc: EncodedChunk) -> ModelInput:
    return make_input(enc.cat_ids, enc.num_values, [(m.ids, m.weights, m.lengths) for m in enc.multi],
                      enc.labels)
