"""What the embedding table and its optimiser state take on a rank, and a clear error where that does not fit.

How many rows a rank holds is its placement's business (``deepfm.train.placement``): the whole table when
replicated, a 1/N shard when row-sharded. This module asks the placement and never which one it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from deepfm.config import Config, TrainConfig
from deepfm.errors import OutOfMemory
from deepfm.model.embedding import embedding_table
from deepfm.train import distributed as ddp
from deepfm.train.placement import TablePlacement


def table_state_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of this rank's table (``embedding_table(model)``) and of the optimiser state kept for it (moments,
    accumulators)."""
    weight = embedding_table(model)
    if weight is None:
        return 0
    total = weight.numel() * weight.element_size()
    for opt in optimizers:
        for value in opt.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def table_state_bytes_needed(cfg: TrainConfig, rows_held: int, embed_dim: int) -> int:
    """What a rank's ``rows_held`` rows of the table and their optimiser state take (the shape
    ``table_state_bytes`` measures)."""
    copies = {"adam": 3, "adagrad": 2, "proximal_adagrad": 2}[cfg.optimizer]  # weights + moments / accumulator
    return rows_held * (embed_dim + 1) * 4 * copies


def _address_space() -> tuple[int | None, int | None]:
    """(this process's address-space limit, the address space it uses now), None where unknown or unset."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return (None if soft == resource.RLIM_INFINITY else soft), used


def _out_of_memory(cfg: Config, num_rows: int, ctx: ddp.DistContext, placement: TablePlacement,
                   cause: str) -> OutOfMemory:
    cap, _ = _address_space()
    limit = (f"this process's address-space limit (RLIMIT_AS) of {cap / 2**20:,.0f} MiB" if cap is not None
             else "the memory this machine has (no address-space limit set)")
    need = table_state_bytes_needed(cfg.train, placement.rows_held(num_rows), cfg.model.embed_dim)
    return OutOfMemory(
        f"rank {ctx.rank} of {ctx.world_size} ran out of memory under {limit}: the embedding table "
        f"({num_rows:,} rows x {cfg.model.embed_dim + 1}) and its {cfg.train.optimizer} state take "
        f"{need / 2**20:,.0f} MiB on each rank with embedding_sharding: {cfg.train.embedding_sharding}. "
        f"Ways out: {placement.fewer_rows_advice}, cap the big fields with hash_buckets / a higher min_count, "
        f"or raise the limit ({cause})")


@contextmanager
def explain_out_of_memory(cfg: Config, num_rows: int, ctx: ddp.DistContext, placement: TablePlacement
                          ) -> Iterator[None]:
    """Fail early, and clearly, where the table (the rows ``placement`` holds on this rank) and its optimiser
    state cannot fit in what is left of this process's address-space limit; turn a failed allocation later on
    into the same ``OutOfMemory`` error, naming the cap and what the table needs, with the ways out, instead of
    an allocator traceback. (Checked before allocating: a process that fills its limit can fail anywhere after,
    in a lazy import say.)"""
    cap, used = _address_space()
    need = table_state_bytes_needed(cfg.train, placement.rows_held(num_rows), cfg.model.embed_dim)
    if cap is not None and used is not None and need > cap - used:
        raise _out_of_memory(cfg, num_rows, ctx, placement, f"{max(cap - used, 0) / 2**20:,.0f} MiB of the limit "
                                                            "left before the table was allocated")
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        text = str(err).strip()
        if not (isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text):
            raise
        raise _out_of_memory(cfg, num_rows, ctx, placement,
                             text.splitlines()[0][:200] if text else type(err).__name__) from None
