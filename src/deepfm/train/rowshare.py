"""Which training rows each rank steps through: the rows every rank maps alike, or the rows only it holds.

``SharedRows`` (preparation on rank 0, one shared cache): every global batch is cut into one part per rank, so
the ranks together see exactly the batches one process would.

``LocalRows`` (``data.prepare_on: every_rank``, ``deepfm.data.ranked``): each rank holds its own rows, as many
as its files gave. Steps per epoch come from the global row count (the ranks' counts summed), so they agree
however unevenly the rows fell; at each step a rank takes its part of the global batch (``rank_share`` of the
batch size) from an endless stream of its rows: a seeded permutation of its rows per pass (seed, rank, pass),
one pass after another (wrap-around). A rank with fewer rows than its steps need starts its next pass early; one
with more reaches them in a later epoch. The stream position is a function of (epoch, batch), so a run resumed
mid-epoch takes exactly the rows it had left.
"""

from __future__ import annotations

import numpy as np

from deepfm.config import TrainConfig
from deepfm.data.loader import batch_rows, num_batches
from deepfm.layout import rank_share


class SharedRows:
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    def total(self, local_rows: int) -> int:
        return local_rows

    def steps(self, local_rows: int, batch_size: int) -> int:
        return num_batches(local_rows, batch_size)

    def plan(self, local_rows: int, batch_size: int, cfg: TrainConfig, epoch: int) -> list:
        return batch_rows(local_rows, batch_size, shuffle=cfg.shuffle, seed=cfg.seed, epoch=epoch,
                          block_rows=cfg.shuffle_block_rows, rank=self.rank, world_size=self.world_size)


class LocalRows(SharedRows):
    def __init__(self, rank: int, world_size: int, rows_per_rank: list[int]) -> None:
        super().__init__(rank, world_size)
        self.rows_per_rank = list(rows_per_rank)

    def total(self, local_rows: int) -> int:
        return sum(self.rows_per_rank)

    def steps(self, local_rows: int, batch_size: int) -> int:
        return num_batches(self.total(local_rows), batch_size)

    def plan(self, local_rows: int, batch_size: int, cfg: TrainConfig, epoch: int) -> list:
        steps = self.steps(local_rows, batch_size)
        lo, hi = rank_share(batch_size, self.rank, self.world_size)
        take = hi - lo
        if local_rows == 0 or take == 0:
            return [np.zeros(0, dtype=np.int64)] * steps
        first = epoch * steps * take  # stream position of this epoch's first row
        positions = first + np.arange(steps * take, dtype=np.int64)
        passes = positions // local_rows
        rows = np.empty_like(positions)
        for p in np.unique(passes):
            order = self._order(local_rows, cfg, int(p))
            sel = passes == p
            rows[sel] = order[positions[sel] % local_rows]
        return [np.sort(rows[k * take:(k + 1) * take]) for k in range(steps)]

    def _order(self, n: int, cfg: TrainConfig, pass_index: int) -> np.ndarray:
        if not cfg.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([cfg.seed, self.rank, pass_index]).permutation(n).astype(np.int64)


def row_share(manifest: dict, rank: int, world_size: int) -> SharedRows:
    """The share the prepared data calls for: its manifest says whether each rank holds its own rows."""
    ranks = manifest.get("ranks")
    if ranks is None or world_size == 1:
        return SharedRows(rank, world_size)
    return LocalRows(rank, world_size, ranks["train_rows"])
