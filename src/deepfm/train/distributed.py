"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``): gloo on CPU, NCCL on GPU.

The dense layers are wrapped in ``DistributedDataParallel``. The embedding table is not: DDP's bucketed
all-reduce cannot take sparse gradients ("Cannot access storage of SparseTensorImpl"), and a dense all-reduce
would ship the whole table every step. Its sparse gradient is all-reduced here instead, by gathering every
rank's (row, gradient) pairs: traffic grows with the rows a batch touches, not with the table. With
``train.embedding_sharding: row`` the table is not replicated at all: see ``deepfm.train.sharding``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepfm.layout import rank_share


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()
_comm_device = torch.device("cpu")  # where collectives put their tensors (the GPU under NCCL)


def comm_device() -> torch.device:
    """Where tensors given to collectives must live: the GPU under NCCL, else the CPU."""
    return _comm_device


def from_env() -> DistContext:
    """The rank and world size torchrun put in the environment (one process: rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ctx: DistContext, device: torch.device, timeout_s: float) -> None:
    """Join the process group (idempotent). A rank that waits longer than ``timeout_s`` fails, never hangs."""
    if not ctx.enabled or dist.is_initialized():
        return
    global _comm_device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _comm_device = device if device.type == "cuda" else torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx: DistContext, spec: str) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and ctx.enabled and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    return device


def allreduce_sparse_grad(param: torch.Tensor, world_size: int) -> int:
    """Average a sparse (row-wise) gradient over ranks, in place: all-gather indices and values, sum, divide.
    Returns the bytes this rank sent (its padded part, to each of the other ranks)."""
    grad = param.grad
    if grad is None:
        grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=param.device),
                                       torch.zeros(0, *param.shape[1:], device=param.device), param.shape)
    grad = grad.coalesce()
    idx, val = grad.indices()[0], grad.values()
    count = torch.tensor([idx.numel()], device=param.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    longest = int(max(int(c.item()) for c in counts))
    padded_idx = torch.full((longest,), -1, dtype=idx.dtype, device=idx.device)
    padded_idx[: idx.numel()] = idx
    padded_val = torch.zeros((longest, *val.shape[1:]), dtype=val.dtype, device=val.device)
    padded_val[: idx.numel()] = val
    all_idx = [torch.empty_like(padded_idx) for _ in range(world_size)]
    all_val = [torch.empty_like(padded_val) for _ in range(world_size)]
    dist.all_gather(all_idx, padded_idx)
    dist.all_gather(all_val, padded_val)
    cat_idx, cat_val = torch.cat(all_idx), torch.cat(all_val)
    keep = cat_idx >= 0
    param.grad = torch.sparse_coo_tensor(cat_idx[keep].unsqueeze(0), cat_val[keep] / world_size,
                                         param.shape, check_invariants=False).coalesce()
    part = count.element_size() + padded_idx.numel() * padded_idx.element_size() \
        + padded_val.numel() * padded_val.element_size()
    return (world_size - 1) * part


def shard_bounds(n: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n`` rows."""
    return rank_share(n, ctx.rank, ctx.world_size)


def gather_rows(local: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate every rank's rows in rank order (each rank held a contiguous shard): the whole set."""
    if not ctx.enabled:
        return local
    t = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float64)).to(_comm_device)
    sizes = [torch.zeros(1, dtype=torch.long, device=_comm_device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=_comm_device))
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64, device=_comm_device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]).cpu().numpy()


def gather_objects(obj: Any, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; what the others pass is ignored."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over every rank, on ``t``'s device, without leaving it for the CPU (``t`` for one process)."""
    if not ctx.enabled:
        return t
    out = t.detach().to(_comm_device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def allreduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device)
    dist.all_reduce(t)
    return t.cpu().tolist()
