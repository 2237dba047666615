"""A prepared split's files: written chunk by chunk as raw typed arrays (``SplitWriter``) and opened as
memory maps (``open_split``). The layout of the files is in ``deepfm.data.store``'s docstring."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepfm.data.batch import EncodedChunk, MultiValues, SplitArrays
from deepfm.layout import TableLayout


class SplitWriter:
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

    def _renumber(self, name: str, rows: int, luts: list[np.ndarray], block_bytes: int = 8 << 20) -> None:
        fh = self._fh.pop(name, None)
        if fh is None or not rows:
            return
        fh.close()  # type: ignore[attr-defined]
        # read and write blocks through the file, not a memory map: the mapped pages of a multi-GB file would
        # count in this process's resident memory (bench/FIGURES.md). Blocks of a few MB, not of a fixed row
        # count: blocks of 2^20 rows (100 MB of Criteo ids) left the peak of preparation with the file's row
        # count, up to 300 MB above the rest of it (bench/INGEST.md, "Memory against rows").
        width = len(luts)
        row_bytes = width * self.id_dtype.itemsize
        block_rows = max(1, block_bytes // row_bytes)
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


def open_split(folder: Path, meta: dict, id_dtype: np.dtype, n_multi: int) -> SplitArrays:
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


def id_dtype(layout: TableLayout) -> np.dtype:
    return np.dtype(np.int32 if layout.num_rows < 2**31 else np.int64)


def select_rows(enc: EncodedChunk, mask: np.ndarray) -> EncodedChunk:
    multi = []
    for mv in enc.multi:
        row_of = np.repeat(np.arange(len(mv.lengths)), mv.lengths)
        keep = mask[row_of]
        multi.append(MultiValues(mv.ids[keep], mv.weights[keep], mv.lengths[mask]))
    assert enc.labels is not None
    return EncodedChunk(enc.labels[mask], enc.cat_ids[mask], enc.num_values[mask], multi, enc.kept,
                        None if enc.weights is None else enc.weights[mask])
