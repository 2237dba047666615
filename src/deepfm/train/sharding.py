"""Row sharding of the one embedding table (``train.embedding_sharding: row``): model parallelism for the table,
data parallelism (DDP) for the dense layers.

Rank ``r`` of ``N`` holds the contiguous rows ``ddp.shard_bounds(rows, r)`` of the table and their optimiser
state (the same ``RowwiseAdam`` / sparse Adagrad as one process, applied to the shard). A step:

1. each rank takes the unique global row ids of its part of the batch (sorted, hence already grouped by owner),
2. sends each id to its owner and gets the row back (two ``all_to_all_single``: ids out, rows back),
3. runs the model on those rows (a small dense leaf tensor, one row per unique id),
4. after backward, sends each row's gradient back to its owner (a third all-to-all), which sets a sparse
   gradient on its shard, divided by ``N`` as DDP averages, and steps its row-wise optimiser.

Contiguous rather than modulo ownership: the sorted unique ids of a batch are then already grouped by owner
(no permutation on the way out or back), an owner's shard is one slice of the table, so writing the model
directory is a walk over ranks in order and each rank's checkpoint is a plain tensor. The price is balance:
how many of a batch's unique ids a rank serves depends on which fields' rows it holds (modulo ownership
would spread them evenly); ``bench/sharding.py`` measures it, per rank, from ``sent_bytes``: what each
rank sends to the others.

gloo has ``all_to_all_single`` on CPU (checked with torch 2.13), so no send/recv fallback is needed; NCCL has it
on GPUs. Every rank must join every exchange, so a rank with no rows in a batch (or fewer evaluation batches) still
calls the lookup with no ids (``join_empty``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepfm.errors import ConfigError
from deepfm.io import StreamedTensor, replace_directory, state_key
from deepfm.layout import rows_per_rank
from deepfm.model.embedding import FieldEmbedding
from deepfm.train import distributed as ddp

SAVE_BLOCK_BYTES = 64 << 20  # the most of the table rank 0 holds at once while writing the model directory


class RowExchange:
    """Where a row-sharded ``FieldEmbedding``'s lookups get their rows (``rows_from``, given by the
    ``RowSharded`` placement): fetches a batch's rows from their owners and sends their gradients back. Counts the bytes this rank sends to the others (``sent_bytes``)."""

    def __init__(self, embedding: FieldEmbedding, ctx: ddp.DistContext) -> None:
        self.embedding = embedding
        self.ctx = ctx
        self.per = rows_per_rank(embedding.num_rows, ctx.world_size)
        self.lo = embedding.rows[0]
        if embedding.rows != ddp.shard_bounds(embedding.num_rows, ctx):
            raise ValueError(f"rank {ctx.rank} holds rows {embedding.rows}, not its shard "
                             f"{ddp.shard_bounds(embedding.num_rows, ctx)}")
        self.sent_bytes = 0
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int], list[int]] | None = None

    def _all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int], *, async_op: bool = False
                    ) -> tuple[torch.Tensor, dist.Work | None]:
        """Rows ``x`` (``send[r]`` of them for rank r, in rank order) out; ``recv[r]`` rows from rank r back."""
        out = x.new_empty((sum(recv), *x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), recv, send, async_op=async_op)
        self.sent_bytes += (sum(send) - send[self.ctx.rank]) * x.shape[1:].numel() * x.element_size()
        return out, work

    def __call__(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([i.reshape(-1) for i in ids])
        uniq, inverse = torch.unique(flat, return_inverse=True)
        world = self.ctx.world_size
        send_counts = torch.bincount(torch.div(uniq, self.per, rounding_mode="floor"), minlength=world)
        recv_counts, _ = self._all_to_all(send_counts, [1] * world, [1] * world)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wanted, _ = self._all_to_all(uniq, send, recv)  # ids other ranks want from this shard
        table = self.embedding.weight.detach()
        rows, _ = self._all_to_all(table.index_select(0, wanted - self.lo), recv, send)  # [U, D + 1], uniq order
        if torch.is_grad_enabled():
            rows.requires_grad_(True)
            self._pending = (rows, wanted, send, recv)
        looked_up = F.embedding(inverse, rows)
        return [part.reshape(*i.shape, rows.shape[1]) for part, i in
                zip(looked_up.split([i.numel() for i in ids]), ids, strict=True)]

    def join_empty(self) -> None:
        """Serve the other ranks' lookups without asking for any row (this rank has no batch left)."""
        with torch.no_grad():
            self([torch.zeros(0, dtype=torch.long, device=self.embedding.weight.device)])

    def push_gradients(self) -> Callable[[], None]:
        """Start sending the gradients of the rows fetched by the last forward pass to their owners; the
        returned ``finish()`` waits for them and sets this shard's (uncoalesced) sparse gradient: every rank's
        contribution, divided by the number of ranks. In between, the caller can step the dense layers'
        optimiser: the transfer runs on the backend's own thread (gloo) or stream (NCCL) meanwhile."""
        if self._pending is None:
            raise RuntimeError("push_gradients without a forward pass that fetched rows")
        rows, wanted, send, recv = self._pending
        self._pending = None
        grad = rows.grad if rows.grad is not None else torch.zeros_like(rows)
        received, work = self._all_to_all(grad, send, recv, async_op=True)

        def finish() -> None:
            assert work is not None
            work.wait()
            weight = self.embedding.weight
            weight.grad = torch.sparse_coo_tensor((wanted - self.lo).unsqueeze(0), received / self.ctx.world_size,
                                                  weight.shape, check_invariants=False)

        return finish


def shard_blocks(local: torch.Tensor, num_rows: int, ctx: ddp.DistContext, block_bytes: int = SAVE_BLOCK_BYTES
                 ) -> Iterator[torch.Tensor]:
    """A row-sharded tensor (``local``: this rank's rows of ``num_rows``) whole, in row order, block by block,
    on rank 0 (each block sent by its owner; at most one block held at a time). On the other ranks: send this
    shard's blocks to rank 0 and yield nothing. Every rank must consume it to the end."""
    local = local.detach()
    width = local.shape[1:].numel()
    step = max(1, block_bytes // max(width * local.element_size(), 1))
    device = ddp.comm_device()
    for owner in range(ctx.world_size):
        lo, hi = ddp.shard_bounds(num_rows, ddp.DistContext(owner, ctx.world_size))
        for start in range(lo, hi, step):
            n = min(step, hi - start)
            if owner == ctx.rank:
                block = local[start - lo: start - lo + n]
                if ctx.is_main:
                    yield block.cpu()
                else:
                    dist.send(block.to(device).contiguous(), dst=0)
            elif ctx.is_main:
                block = torch.empty(n, *local.shape[1:], dtype=local.dtype, device=device)
                dist.recv(block, src=owner)
                yield block.cpu()


def table_blocks(embedding: FieldEmbedding, ctx: ddp.DistContext) -> Iterator[torch.Tensor]:
    """The whole embedding table, block by block, on rank 0 (see ``shard_blocks``)."""
    return shard_blocks(embedding.weight, embedding.num_rows, ctx)


def optimizer_streams(optimizers: list[torch.optim.Optimizer], embedding: FieldEmbedding, ctx: ddp.DistContext
                      ) -> list[StreamedTensor]:
    """The table's row-wise optimiser state (Adam's moments, Adagrad's sums) whole, as ``save_state`` names it
    in ``{"optimizers": [o.state_dict() ...]}``, each streamed block by block to rank 0 (``shard_blocks``).
    Every rank must consume every stream, in list order."""
    weight = embedding.weight
    streams = []
    for i, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]
        index = next((j for j, p in enumerate(params) if p is weight), None)
        if index is None:
            continue
        for name, value in sorted(opt.state.get(weight, {}).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape == weight.shape:
                streams.append(StreamedTensor(state_key("optimizers", i, "state", index, name),
                                              (embedding.num_rows, *value.shape[1:]), value.dtype,
                                              shard_blocks(value, embedding.num_rows, ctx)))
    return streams


def write_directory(final: Path, fill: Callable[[Path], None], ctx: ddp.DistContext, leader: bool | None = None,
                    keep: Path | None = None) -> None:
    """A directory every rank writes its part of (``fill(tmp)``), swapped in for ``final`` by the ``leader`` of
    the ranks that see this folder (rank 0 where all do; see ``deepfm.train.folders``) once all have written:
    readers see the old directory or the complete new one, never a mix of steps. On machines that share no
    folder each machine's swap is its own: ``keep`` is where the leader moves the directory it replaces (the
    one before, which a write cut short between two machines' swaps leaves the machines in common)."""
    leader = ctx.is_main if leader is None else leader
    pending = final.parent / f".{final.name}.pending"
    if leader:
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir(parents=True)
    ctx.barrier()
    fill(pending)
    ctx.barrier()
    if leader:
        if keep is not None and final.exists():
            shutil.rmtree(keep, ignore_errors=True)
            os.rename(final, keep)  # a moment without final: resuming then finds the previous one in keep
        replace_directory(pending, final)
    ctx.barrier()


def rank_dir(directory: Path, ctx: ddp.DistContext) -> Path:
    """This rank's part of a directory written by ``write_directory``."""
    return directory / f"rank-{ctx.rank}"


def checkpoint_part(directory: Path, ctx: ddp.DistContext, sharded: bool = True, apart: bool = False) -> Path:
    """Where this rank's weights and optimiser state of a checkpoint directory are: its ``rank-R`` part when
    ``sharded``, else the directory itself. A clear error when the checkpoint was written by another number of
    row-sharded ranks (a shard's rows depend on it), or with the other ``embedding_sharding``. ``apart``: the
    ranks' folders are on machines that share none, so only this rank's part is here (its stamp names the
    number of ranks: ``deepfm.train.folders.check_parts``)."""
    world = ctx.world_size
    if not sharded:
        if (directory / "rank-0").is_dir():
            raise ConfigError(f"{directory}: a checkpoint of row-sharded ranks; resume with "
                              "train.embedding_sharding: row and the number of ranks it was written with")
        return directory
    own = rank_dir(directory, ctx)
    if apart:
        return own
    if not (own.is_dir() and (directory / f"rank-{world - 1}").is_dir()) or (directory / f"rank-{world}").exists():
        raise ConfigError(f"{directory}: not a checkpoint of {world} row-sharded ranks; resume with the number "
                          "of ranks (and the embedding_sharding) it was written with")
    return own
