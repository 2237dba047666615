"""How the embedding table is held across ranks: one object per way, behind one interface.

``Replicated`` (``train.embedding_sharding: replicated``, and every one-process run): each rank holds the whole
table; after backward its gradient is averaged over ranks (the sparse rows a batch touched, gathered by
``distributed.allreduce_sparse_grad``, or with ``train.sparse: false`` the dense gradient all-reduced) and every
rank steps it alike.

``RowSharded`` (``embedding_sharding: row`` over several ranks): each rank holds a contiguous shard of the rows
and their optimiser state; a ``sharding.RowExchange`` fetches a batch's rows from their owners and sends their
gradients back; checkpoints are written per rank, and the model directory gets the whole table streamed to rank
0 block by block.

Everything that differs between the two lives here: which rows this rank builds, where a lookup's rows come
from (``rows_from``), the optimiser step after backward, checkpoint parts and how a rank resumes from them (also
on machines that share no folder: ``deepfm.train.folders``), the best weights, evaluation's extra lookups,
writing the model directory, what a warm start (``--init-from``) may do. The trainer and the pipeline call a
placement and never ask which one it is; ``placement_for`` is the one place that chooses. In both, the table
stays out of the module DDP wraps (``Trainer``): its gradient is sparse, or travels by the row exchange.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from deepfm.config import TrainConfig
from deepfm.data.loader import num_batches
from deepfm.errors import ConfigError
from deepfm.io import StreamedTensor, atomic_directory, atomic_save_tensors
from deepfm.model.embedding import RowSource, embedding_table
from deepfm.train import distributed as ddp
from deepfm.train import folders, sharding
from deepfm.train.optim import clip_grad_norm

# what ``write_model`` hands to its writer: nothing, or the streamed table and optimiser state (see save_model)
ModelWriter = Callable[..., None]
# what a rank resumes from: the folder of its weights and optimiser state, and rank 0's state.json
Found = tuple[Path, str] | None


class TablePlacement:
    """The interface; see the module docstring. ``rows_from`` is None where the model reads its own table."""

    rows_from: RowSource | None = None

    def __init__(self, ctx: ddp.DistContext) -> None:
        self.ctx = ctx
        self._sent = 0
        self.folders = folders.one_folder(ctx)
        self.run = ""  # the run's name in stamps (ranks apart): drawn afresh, or rank 0's on resume

    def use_folders(self, share: folders.FolderShare) -> None:
        """Which ranks see this rank's checkpoint folder (``folders.probe``), before training starts."""
        self.folders = share
        self.run = share.token

    @property
    def sent_bytes(self) -> int:
        """What this rank has sent to the others for the table (see ``Trainer._comm_record``)."""
        return self._sent

    # the first way out where the table and its optimiser state do not fit on a rank (``deepfm.train.memory``)
    fewer_rows_advice = "train over more ranks"

    def table_rows(self, num_rows: int) -> tuple[int, int] | None:
        """The rows of the table this rank builds; None: all of them."""
        return None

    def rows_held(self, num_rows: int) -> int:
        """How many of the table's ``num_rows`` rows this rank holds (with their optimiser state)."""
        rows = self.table_rows(num_rows)
        return num_rows if rows is None else rows[1] - rows[0]

    def check_init_from(self, init_from: str | Path | None) -> None:
        """Refuse a warm start this placement cannot do, before any rank joins the others."""

    def attach(self, model: nn.Module) -> None:
        """Make the model's table ready for training on this rank (called once the model is on its device)."""

    def describe(self, model: nn.Module) -> str | None:
        """A line for the training log, or None."""
        return None

    def step(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], clip_norm: float | None) -> None:
        """After backward: move the table's gradient where it belongs, clip, and step every optimiser."""
        raise NotImplementedError

    def write_checkpoint(self, final: Path, fill_weights: Callable[[Path], None],
                         fill_main: Callable[[Path], None], step: int) -> None:
        """Swap in ``final``: ``fill_weights(folder)`` writes this rank's weights and optimiser state,
        ``fill_main(folder)`` what only rank 0 writes (``state.json``); ``step``: the step it holds."""
        raise NotImplementedError

    def rank_parts(self, own: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The ranks' ``own`` parts (what only that rank knows: its RNG state, its share of the running loss) that
        this rank's ``fill_weights`` keeps, by rank as a string (a JSON key). Every rank calls it before every
        checkpoint (it may be a collective); each rank resumes from its own entry."""
        raise NotImplementedError

    @contextmanager
    def open_checkpoint(self, last: Path) -> Iterator[Found]:
        """What this rank resumes from (``Found``), or None on every rank where there is nothing to resume."""
        yield self._local_checkpoint(last)

    def _local_checkpoint(self, last: Path) -> Found:
        """The checkpoint as every rank reads it where all see one folder (one process, one machine)."""
        if not (last / "state.json").is_file():
            return None
        return self.weights_dir(last), (last / "state.json").read_text()

    def load_best(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """After training: the best epoch's weights into ``model`` on every rank, where ``save_best`` wrote any."""
        best = self.best_weights(run_dir)
        if best.is_file():
            model.load_state_dict(load_file(str(best), device=str(device)))

    def weights_dir(self, directory: Path) -> Path:
        """Where this rank's weights of a checkpoint directory are; a clear error for another placement's."""
        raise NotImplementedError

    def save_best(self, run_dir: Path, state: Callable[[], dict[str, torch.Tensor]], step: int) -> None:
        raise NotImplementedError

    def best_weights(self, run_dir: Path) -> Path:
        """This rank's weights of the best epoch (``save_best``)."""
        raise NotImplementedError

    def scoring_model(self, model: nn.Module) -> nn.Module:
        """What evaluation runs on this rank's rows of a split."""
        return model

    def join_evaluation(self, split_rows: int, batch_size: int) -> None:
        """After this rank scored its share of a split (``ddp.shard_bounds``) in batches of ``batch_size``."""

    def write_model(self, model: nn.Module, optimizers: list[torch.optim.Optimizer] | None,
                    write: ModelWriter) -> bool:
        """Rank 0 calls ``write(**streamed)`` (``streamed``: keyword arguments of ``save_model`` for a table it
        does not hold whole); the other ranks do their part. Returns whether ``write`` ran here."""
        raise NotImplementedError


class Replicated(TablePlacement):
    fewer_rows_advice = "train over more ranks with train.embedding_sharding: row (each holds 1/N of it)"

    def __init__(self, ctx: ddp.DistContext, sparse: bool) -> None:
        super().__init__(ctx)
        self.sparse = sparse

    def attach(self, model: nn.Module) -> None:
        table = embedding_table(model)
        if self.ctx.enabled and table is not None:  # rank 0's initial values (DDP syncs the dense layers)
            dist.broadcast(table.data, src=0)

    def step(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], clip_norm: float | None) -> None:
        table = embedding_table(model)
        if self.ctx.enabled and table is not None:
            if self.sparse:
                self._sent += ddp.allreduce_sparse_grad(table, self.ctx.world_size)
            else:
                self._sent += self._allreduce_dense_grad(table)
        if clip_norm is not None:
            clip_grad_norm(list(model.parameters()), clip_norm)
        for opt in optimizers:
            opt.step()

    def _allreduce_dense_grad(self, table: nn.Parameter) -> int:
        """Average the table's dense gradient over ranks, in place (DDP would, were the table in the module it
        wraps). Returns the bytes a ring all-reduce makes each rank send (``2 (N - 1) / N`` of the gradient), as
        the trainer counts DDP's. A rank whose gradient is None (no backward reached the table) joins with
        zeros: every rank must join every all-reduce."""
        grad = table.grad if table.grad is not None else torch.zeros_like(table)
        table.grad = ddp.sum_over_ranks(grad, self.ctx) / self.ctx.world_size
        world = self.ctx.world_size
        return round(2 * (world - 1) / world * grad.numel() * grad.element_size())

    def write_checkpoint(self, final: Path, fill_weights: Callable[[Path], None],
                         fill_main: Callable[[Path], None], step: int) -> None:
        """Rank 0 writes it whole (every rank holds the same), in its own folder, whoever else sees it."""
        def fill(tmp: Path) -> None:
            fill_weights(tmp)
            fill_main(tmp)

        if self.ctx.is_main:
            atomic_directory(final, fill)

    def rank_parts(self, own: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Rank 0 writes the checkpoint for every rank: every rank's part, gathered (a few KiB each)."""
        return {str(r): part for r, part in enumerate(ddp.gather_objects(own, self.ctx))}

    @contextmanager
    def open_checkpoint(self, last: Path) -> Iterator[Found]:
        """Ranks apart: rank 0 sends its checkpoint's files to every rank; one that cannot see rank 0's folder
        reads them from a temporary folder beside its own ``last`` (whatever ``last`` holds there is ignored)."""
        if not self.folders.apart:
            yield self._local_checkpoint(last)
            return
        found = self._local_checkpoint(last) if self.ctx.is_main else None
        sent = ddp.from_main(None if found is None else {p.name: p.read_bytes() for p in sorted(found[0].iterdir())
                                                         if p.is_file()}, self.ctx)
        if sent is None:
            yield None
        elif self.folders.with_main:
            yield self.weights_dir(last), sent["state.json"].decode()
        else:
            with tempfile.TemporaryDirectory(dir=last.parent, prefix=".from-rank-0-") as tmp:
                for name, blob in sent.items():
                    (Path(tmp) / name).write_bytes(blob)
                yield Path(tmp), sent["state.json"].decode()

    def load_best(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """Ranks apart: rank 0 loads its best weights and sends them to the others (only it wrote them)."""
        if not self.folders.apart:
            super().load_best(model, run_dir, device)
            return
        if not ddp.from_main(self.best_weights(run_dir).is_file() if self.ctx.is_main else None, self.ctx):
            return
        if self.ctx.is_main:
            super().load_best(model, run_dir, device)
        for t in model.state_dict().values():
            out = t.to(ddp.comm_device())
            dist.broadcast(out, src=0)
            t.copy_(out)

    def weights_dir(self, directory: Path) -> Path:
        return sharding.checkpoint_part(directory, self.ctx, sharded=False)

    def save_best(self, run_dir: Path, state: Callable[[], dict[str, torch.Tensor]], step: int) -> None:
        if self.ctx.is_main:
            atomic_save_tensors(state(), self.best_weights(run_dir))

    def best_weights(self, run_dir: Path) -> Path:
        return run_dir / "best.safetensors"

    def write_model(self, model: nn.Module, optimizers: list[torch.optim.Optimizer] | None,
                    write: ModelWriter) -> bool:
        if self.ctx.is_main:
            write()
        return self.ctx.is_main


class RowSharded(TablePlacement):
    def __init__(self, ctx: ddp.DistContext) -> None:
        super().__init__(ctx)
        self.exchange: sharding.RowExchange | None = None

    def table_rows(self, num_rows: int) -> tuple[int, int] | None:
        return ddp.shard_bounds(num_rows, self.ctx)

    def check_init_from(self, init_from: str | Path | None) -> None:
        if init_from is not None:
            raise ConfigError(f"--init-from {init_from}: training further with train.embedding_sharding: row is "
                              "not supported yet (it would load the whole parent table on every rank); train "
                              "further with embedding_sharding: replicated")

    def attach(self, model: nn.Module) -> None:
        self.exchange = sharding.RowExchange(model.embedding, self.ctx)
        self.rows_from = self.exchange

    def _exchange(self) -> sharding.RowExchange:
        if self.exchange is None:
            raise RuntimeError("RowSharded placement used before attach(model)")
        return self.exchange

    @property
    def sent_bytes(self) -> int:
        return 0 if self.exchange is None else self.exchange.sent_bytes

    def describe(self, model: nn.Module) -> str | None:
        emb = model.embedding
        return (f"Embedding table row-sharded over {self.ctx.world_size} ranks: rank 0 holds rows "
                f"{emb.rows[0]:,}-{emb.rows[1]:,} of {emb.num_rows:,}")

    def step(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], clip_norm: float | None) -> None:
        """The dense layers' optimiser steps while the table's gradients travel to their owners (unless clipping
        needs every gradient first), then the table's."""
        finish_gradients = self._exchange().push_gradients()
        table = embedding_table(model)
        holds_table = [any(p is table for g in o.param_groups for p in g["params"]) for o in optimizers]
        if clip_norm is not None:
            finish_gradients()
            clip_grad_norm(list(model.parameters()), clip_norm, sharded=[table])
        else:
            for opt, has_table in zip(optimizers, holds_table, strict=True):
                if not has_table:
                    opt.step()
            finish_gradients()
        for opt, has_table in zip(optimizers, holds_table, strict=True):
            if has_table or clip_norm is not None:
                opt.step()

    def write_checkpoint(self, final: Path, fill_weights: Callable[[Path], None],
                         fill_main: Callable[[Path], None], step: int) -> None:
        """Each rank's weights (its shard) and optimiser state go to ``final/rank-R/``; the directory is swapped in
        once every rank has written (ranks apart: in each folder, each part stamped, the one before kept)."""
        def fill(tmp: Path) -> None:
            own = sharding.rank_dir(tmp, self.ctx)
            own.mkdir()
            fill_weights(own)
            self._stamp(own, step)
            if self.ctx.is_main:
                fill_main(tmp)

        keep = final.parent / folders.PREVIOUS if self.folders.apart else None
        sharding.write_directory(final, fill, self.ctx, leader=self.folders.is_leader, keep=keep)

    def rank_parts(self, own: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each rank writes its own part of a checkpoint (``rank-R/``): its own."""
        return {str(self.ctx.rank): own}

    def _stamp(self, part: Path, step: int) -> None:
        if self.folders.apart:
            folders.stamp(part, self.ctx, self.run, step)

    def weights_dir(self, directory: Path) -> Path:
        return sharding.checkpoint_part(directory, self.ctx, apart=self.folders.apart)

    @contextmanager
    def open_checkpoint(self, last: Path) -> Iterator[Found]:
        """Ranks apart: each rank's shard from its own folder (``last``, or the ``previous`` one), at the newest
        step every rank holds (else an error naming the rank: ``folders.choose_part``); rank 0's ``state.json``
        of that step sent to every rank."""
        if not self.folders.apart:
            yield self._local_checkpoint(last)
            return
        places = [last, last.parent / folders.PREVIOUS]
        chosen = folders.choose_part("checkpoint", folders.gather_parts(
            [sharding.rank_dir(p, self.ctx) for p in places], self.ctx))
        if chosen is None:
            if ddp.from_main(self.ctx.is_main and (last / "state.json").is_file(), self.ctx):
                raise ConfigError(f"{last} on rank 0 has no stamped part ({folders.STAMP}): it was written where "
                                  "the ranks shared one folder; resume it there, or start again without --resume")
            yield None
            return
        main, picks = chosen
        state = ddp.from_main((places[picks[0]] / "state.json").read_text() if self.ctx.is_main else None, self.ctx)
        self.run = main["run"]
        yield self.weights_dir(places[picks[self.ctx.rank]]), state

    def save_best(self, run_dir: Path, state: Callable[[], dict[str, torch.Tensor]], step: int) -> None:
        def fill(tmp: Path) -> None:
            own = sharding.rank_dir(tmp, self.ctx)
            atomic_save_tensors(state(), own / "model.safetensors")
            self._stamp(own, step)

        sharding.write_directory(run_dir / "best", fill, self.ctx, leader=self.folders.is_leader)

    def load_best(self, model: nn.Module, run_dir: Path, device: torch.device) -> None:
        """Ranks apart: each rank's best shard from its own folder, once every part's stamp matches rank 0's."""
        if self.folders.apart and folders.choose_part(
                "best epoch's weights", folders.gather_parts([self.best_weights(run_dir).parent], self.ctx)) is None:
            return
        super().load_best(model, run_dir, device)

    def best_weights(self, run_dir: Path) -> Path:
        return sharding.rank_dir(run_dir / "best", self.ctx) / "model.safetensors"

    def scoring_model(self, model: nn.Module) -> nn.Module:
        return _FetchingRows(model, self._exchange())

    def join_evaluation(self, split_rows: int, batch_size: int) -> None:
        """Every rank joins as many lookups as rank 0, which has the most rows."""
        longest = ddp.shard_bounds(split_rows, ddp.DistContext(0, self.ctx.world_size))[1]
        lo, hi = ddp.shard_bounds(split_rows, self.ctx)
        for _ in range(num_batches(longest, batch_size) - num_batches(hi - lo, batch_size)):
            self._exchange().join_empty()

    def write_model(self, model: nn.Module, optimizers: list[torch.optim.Optimizer] | None,
                    write: ModelWriter) -> bool:
        """The table and its optimiser state reach rank 0 block by block, as it writes them; meanwhile the other
        ranks send their rows."""
        streamed: dict[str, Any] = {"table_blocks": sharding.table_blocks(model.embedding, self.ctx)}
        if optimizers is not None:
            streamed["optimizer_streams"] = sharding.optimizer_streams(optimizers, model.embedding, self.ctx)
        if self.ctx.is_main:
            write(**streamed)
            return True
        for blocks in _every_block(streamed):
            for _ in blocks:  # sends this rank's rows
                pass
        return False


def _every_block(streamed: dict[str, Any]) -> Iterator[Iterator[torch.Tensor]]:
    """The block iterators of ``write_model``'s streams, in the order rank 0 consumes them."""
    yield streamed["table_blocks"]
    for stream in streamed.get("optimizer_streams", []):
        assert isinstance(stream, StreamedTensor)
        yield iter(stream.blocks)


class _FetchingRows(nn.Module):
    """A row-sharded model for scoring: its forward fetches the batch's rows from their owners."""

    def __init__(self, model: nn.Module, exchange: RowSource) -> None:
        super().__init__()
        self.model = model
        self.exchange = exchange

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs, rows_from=self.exchange)


def placement_for(cfg: TrainConfig, ctx: ddp.DistContext) -> TablePlacement:
    """The placement this config asks for on these ranks: the one place that chooses."""
    if ctx.enabled and cfg.embedding_sharding == "row":
        return RowSharded(ctx)
    return Replicated(ctx, sparse=cfg.sparse)
