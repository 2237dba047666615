"""The training loop, apart from the model: batches, optimisers, mixed precision, evaluation, early
stopping, learning-rate reduction on plateau, checkpoints and resume.

Checkpoints live in ``run_dir``: ``last/`` (written every ``checkpoint_every_steps`` steps and after each
epoch: weights, optimiser state, each rank's RNG state and running loss, position in the epoch) and ``best/``
(weights of the best validation AUC). Each is a folder swapped in atomically. Batch order depends only on
``(seed, epoch)`` and each rank resumes its own random-number stream (its dropout masks), so a run killed
mid-epoch and resumed replays exactly the batches it had left, ends with the same model as an uninterrupted
run and logs the same training loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from deepfm.config import TrainConfig, auto_batch_size
from deepfm.data.batch import ModelInput, SplitArrays
from deepfm.data.loader import iterate_batches
from deepfm.errors import ConfigError
from deepfm.io import (atomic_save_tensors, atomic_write_text, load_state,
                       optimizer_state_from_json, save_state)
from deepfm.metrics import summarize
from deepfm.model.embedding import embedding_table
from deepfm.progress import progress_bar
from deepfm.runtime import autocast, predict_logits, resolve_precision, sigmoid
from deepfm.train import distributed as ddp
from deepfm import native
from deepfm.train.optim import LearningRateOnPlateau, build_optimizers
from deepfm.train.placement import TablePlacement, placement_for
from deepfm.train.rowshare import SharedRows


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0  # next batch of ``epoch`` to run
    step: int = 0
    best_auc: float = -math.inf  # validation AUC of the best epoch
    best_score: float = -math.inf  # the monitored value (train.monitor) of the best epoch
    best_epoch: int = -1
    bad_epochs: int = 0
    # this rank's share of the epoch's running loss (state.json: rank 0's; each rank's in its own part)
    loss_sum: float = 0.0  # this epoch's sum of (weighted) training losses so far
    loss_count: int = 0  # rows in it
    loss_weight: float = 0.0  # their total sample weight (= loss_count without data.weight_column)
    epoch_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


class _DenseLayers(nn.Module):
    """Everything of the model after its table lookup, as one module for DDP to synchronise: its forward is the
    model's ``head``. The table is not part of it (its gradient is sparse, or travels by the row exchange: see
    ``deepfm.train.placement``), so DDP never sees it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        table = embedding_table(model)
        self.parts = nn.ModuleList([m for m in model.children() if all(p is not table for p in m.parameters())])
        self.own = nn.ParameterList(list(model.parameters(recurse=False)))
        self.head = model.head  # a bound method: not registered, so the model (and its table) stay outside

    def forward(self, rows: torch.Tensor, square_excess: torch.Tensor | None) -> torch.Tensor:
        return self.head(rows, square_excess)


class Trainer:
    """Trains a model on prepared splits. ``callbacks`` get ``(trainer, state)`` after every step.

    Under ``torchrun`` (``dist`` with several ranks) each rank trains on its part of every global batch; the
    dense layers are synchronised by DDP and the embedding table by its placement (``deepfm.train.placement``:
    replicated, or row-sharded over the ranks). Rank 0 writes metrics and checkpoints (under row sharding every
    rank writes its shard's part); every rank evaluates its part of a split and all see the exact AUC.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, run_dir: Path, *, log: Callable[[str], None] = print,
                 callbacks: list[Callable[[Trainer, TrainState], None]] | None = None,
                 dist: ddp.DistContext = ddp.SINGLE, placement: TablePlacement | None = None,
                 rows: SharedRows | None = None) -> None:
        self.cfg = cfg
        self.rows = rows or SharedRows(dist.rank, dist.world_size)  # deepfm.train.rowshare
        self.dist = dist
        self.device = ddp.device_for(dist, cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir)
        self.log = log if dist.is_main else (lambda _msg: None)
        self.callbacks = callbacks or []
        self.optimizers = build_optimizers(self.model, cfg)
        self.plateau = LearningRateOnPlateau(self.optimizers, cfg, self.log, _MONITOR[cfg.monitor])
        self.state = TrainState()
        self._batch_l2 = cfg.embedding_l2 if cfg.embedding_l2_scope == "batch" else 0.0  # "table": in the optimiser
        self._table = embedding_table(self.model)
        self.placement = placement or placement_for(cfg, dist)
        self.placement.attach(self.model)
        self._comm_from_step, self._comm_from_bytes = 0, 0  # where this epoch's count started
        self._dense: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = self.model.head
        if dist.enabled:
            self._dense = torch.nn.parallel.DistributedDataParallel(
                _DenseLayers(self.model), device_ids=[self.device] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        """``last/``: weights, optimiser state and every rank's own part (``_own_part``: where, the placement
        decides), and rank 0's ``state.json``, swapped in as one directory."""
        ranks = self.placement.rank_parts(self._own_part())  # on every rank: it may gather them to rank 0

        def fill_weights(folder: Path) -> None:
            atomic_save_tensors(self.model.state_dict(), folder / "model.safetensors")
            save_state(folder / "optimizers", {"optimizers": [o.state_dict() for o in self.optimizers],
                                               "plateau": self.plateau.state_dict(),
                                               "world_size": self.dist.world_size, "ranks": ranks})

        def fill_main(folder: Path) -> None:
            atomic_write_text(folder / "state.json", json.dumps(self.state.__dict__.copy()))

        self.placement.write_checkpoint(self.run_dir / "last", fill_weights, fill_main, self.state.step)

    def _own_part(self) -> dict[str, Any]:
        """What only this rank knows and gets back on ``--resume``: its RNG state (each rank draws its own dropout
        masks) and its share of the epoch's running loss (``_end_epoch`` sums the ranks'; state.json is rank 0's)."""
        st = self.state
        part: dict[str, Any] = {"rng": torch.get_rng_state(), "loss": [st.loss_sum, st.loss_count, st.loss_weight]}
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's generator
            part["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return part

    def _load_checkpoint(self) -> bool:
        """Every rank resumes from the same step (the placement sees to it, also on machines that share no
        folder) or none does."""
        with self.placement.open_checkpoint(self.run_dir / "last") as found:
            if found is None:
                return False
            self._load_from(*found)
        return True

    def _load_from(self, weights: Path, state_json: str) -> None:
        self.model.load_state_dict(load_file(str(weights / "model.safetensors"), device=str(self.device)))
        saved = load_state(weights / "optimizers")
        for opt, st in zip(self.optimizers, saved["optimizers"], strict=True):
            opt.load_state_dict(optimizer_state_from_json(st))
        if "plateau" in saved:  # (checkpoints written before the scheduler start it afresh)
            self.plateau.load_state_dict(saved["plateau"])
        saved_state = json.loads(state_json)
        saved_state.setdefault("best_score", saved_state.get("best_auc", -math.inf))  # checkpoints before monitor
        saved_state.setdefault("loss_weight", float(saved_state.get("loss_count", 0)))  # before weight_column
        self.state = TrainState(**saved_state)
        part = own_part(saved, self.dist, weights)
        if part is None:  # written before each rank's part was kept: every rank takes rank 0's, as it did then
            if self.dist.enabled:
                self.log(f"Warning: {weights} holds rank 0's RNG state and running loss only (written before "
                         "checkpoints kept every rank's): with dropout the resumed run differs from an "
                         "uninterrupted one, and this epoch's logged training log loss is off")
            part = {"rng": saved["rng"], "cuda_rng": saved.get("cuda_rng")}
        else:
            st = self.state
            st.loss_sum, st.loss_count, st.loss_weight = part["loss"]
        torch.set_rng_state(part["rng"])
        if self.device.type == "cuda" and part.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(part["cuda_rng"], self.device)

    # ------------------------------------------------------------------ loop
    def fit(self, train: SplitArrays, valid: SplitArrays | None = None, *, resume: bool = False) -> TrainState:
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and self._load_checkpoint():
            self.log(f"Resuming from {self.run_dir / 'last'}: epoch {self.state.epoch + 1}, "
                     f"batch {self.state.batch}, step {self.state.step}")
        else:
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout masks differ per rank
        ranks = f" x {self.dist.world_size} ranks" if self.dist.enabled else ""
        n_train = self.rows.total(len(train))
        self.batch_size = auto_batch_size(n_train) if cfg.batch_size == "auto" else cfg.batch_size
        auto = " (auto)" if cfg.batch_size == "auto" else ""
        kernels = ""
        if self.device.type == "cpu":
            kernels = (", native kernels" if native.load() is not None
                       else ", torch path (native kernels off or not built; see DEEPFM_NATIVE)")
        self.log(f"Training on {self.device}{ranks} ({self.precision}), {n_train:,} rows, "
                 f"batch {self.batch_size}{auto}, optimiser {cfg.optimizer}"
                 f"{' (sparse embeddings)' if cfg.sparse else ''}{kernels}")
        placed = self.placement.describe(self.model)
        if placed:
            self.log(placed)
        per_epoch = self.rows.steps(len(train), self.batch_size)
        st = self.state
        while st.epoch < cfg.epochs and not st.finished:
            self._train_epoch(train, per_epoch)
            if st.finished:
                break
            self._end_epoch(valid)
        st.finished = True
        self._save_checkpoint()
        self.dist.barrier()  # rank 0 has written best.safetensors
        self.placement.load_best(self.model, self.run_dir, self.device)
        return st

    def _train_epoch(self, train: SplitArrays, per_epoch: int) -> None:
        cfg, st = self.cfg, self.state
        self.model.train()
        self._comm_from_step = st.step
        self._comm_from_bytes = self.placement.sent_bytes
        t0 = time.perf_counter()
        batches = iterate_batches(train, self.batch_size, start_batch=st.batch, prefetch=cfg.prefetch_batches,
                                  pin_memory=self.device.type == "cuda",
                                  plan=self.rows.plan(len(train), self.batch_size, cfg, st.epoch))
        bar = progress_bar(batches, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                           enabled=cfg.progress and self.dist.is_main,
                           total=per_epoch - st.batch, unit="batch")
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        weight_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        n_acc = 0
        for batch in bar:
            loss_sum, weight = self._step(batch.to(self.device, non_blocking=True))
            loss_acc += loss_sum
            weight_acc += weight
            n_acc += len(batch)
            st.batch += 1
            st.step += 1
            for cb in self.callbacks:
                cb(self, st)
            if cfg.max_steps is not None and st.step >= cfg.max_steps:
                st.finished = True
            if st.step % cfg.checkpoint_every_steps == 0 or st.finished:
                st.loss_sum += float(loss_acc)
                st.loss_weight += float(weight_acc)
                st.loss_count += n_acc
                loss_acc.zero_()
                weight_acc.zero_()
                n_acc = 0
                st.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._save_checkpoint()
            if st.finished:
                break
        st.loss_sum += float(loss_acc)
        st.loss_weight += float(weight_acc)
        st.loss_count += n_acc
        st.epoch_seconds += time.perf_counter() - t0

    def _step(self, batch: ModelInput) -> tuple[torch.Tensor, torch.Tensor | float]:
        """One optimiser step on a batch (this rank's part of it). Returns, for the epoch's training log loss,
        this part's sum of losses (weighted by ``batch.weights`` when given) and its total weight."""
        with autocast(self.device, self.precision):
            rows, square_excess, penalty = self.model.embedding.lookup(
                *batch.tensors(), self._batch_l2 > 0, self.placement.rows_from)
            logits = self._dense(rows, square_excess)
        assert batch.labels is not None
        loss_sum, loss = self._loss(logits.float(), batch.labels, batch.weights)
        total = loss + self._batch_l2 * penalty if self._batch_l2 else loss
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        weight = float(len(batch)) if batch.weights is None else batch.weights.detach().double().sum()
        self.placement.step(self.model, self.optimizers, self.cfg.grad_clip_norm)
        return loss_sum.detach().double(), weight

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the rows' binary cross-entropies, weighted by ``weights`` [B] when given; the loss to
        minimise) for this rank's part of a batch.

        Without weights the loss is the part's sum / its rows (not torch's mean: a rank's part may be empty and
        must still join the step). With sample weights it is sum(w_i * l_i) / sum(w_i) over the whole batch
        (every rank divides by the batch's total weight over the number of ranks, as DDP averages the ranks'
        gradients). Normalising by the weights rather than the rows keeps the step size independent of the
        weights' scale (weights all 2 train exactly as no weights, and the learning rate means the same whatever
        the units of the weights) and makes a row of weight 0 contribute nothing, as if it were not in the
        batch. What weights do not reach: batch-norm statistics, the per-lookup ``embedding_l2`` penalty and,
        under lazy sparse Adam, which embedding rows are stepped (an embedding row looked up in a batch only by
        rows of weight 0 still moves by its momentum)."""
        if weights is None:
            loss_sum = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            return loss_sum, loss_sum / max(len(labels), 1)
        loss_sum = F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum")
        batch_weight = ddp.sum_over_ranks(weights.detach().sum(), self.dist) / self.dist.world_size
        # a batch whose weights are all 0 has a loss of 0: no gradient, not 0 / 0
        return loss_sum, loss_sum / batch_weight.clamp_min(torch.finfo(torch.float32).tiny)

    def _end_epoch(self, valid: SplitArrays | None) -> None:
        cfg, st = self.cfg, self.state
        loss_sum, loss_count, loss_weight = ddp.allreduce_sum([st.loss_sum, float(st.loss_count), st.loss_weight],
                                                              self.dist)
        record: dict[str, Any] = {
            "epoch": st.epoch + 1, "step": st.step,
            "train_logloss": loss_sum / loss_weight if loss_weight > 0 else 0.0,
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "seconds": round(st.epoch_seconds, 3),
            "samples_per_s": round(loss_count / st.epoch_seconds, 1) if st.epoch_seconds else None,
            **self._comm_record(),
        }
        improved, score = True, None
        if valid is not None and len(valid):
            m = self.evaluate(valid)
            record.update({f"valid_{k}": v for k, v in m.items() if k != "rows"})
            score = m["auc"] - m["logloss"] if cfg.monitor == "auc-logloss" else m["auc"]
            improved = score > st.best_score + cfg.min_delta
        self.log(_format_record(record))
        if score is not None:
            self.plateau.step(score)
        if improved:
            st.best_auc = record.get("valid_auc", st.best_auc)
            st.best_score = score if score is not None else st.best_score
            st.best_epoch = st.epoch + 1
            st.bad_epochs = 0
            self.placement.save_best(self.run_dir, self.model.state_dict, st.step)
        else:
            st.bad_epochs += 1
            if st.bad_epochs >= cfg.patience:  # as Keras / FuxiCTR: stop after `patience` epochs without gain
                self.log(f"Early stopping: no validation {_MONITOR[cfg.monitor]} gain for {st.bad_epochs} epoch(s); "
                         f"best was epoch {st.best_epoch} (AUC {st.best_auc:.5f})")
                st.finished = True
        st.history.append(record)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in st.history))
        st.epoch += 1
        st.batch = 0
        st.loss_sum, st.loss_count, st.loss_weight, st.epoch_seconds = 0.0, 0, 0.0, 0.0
        self._save_checkpoint()

    def _comm_record(self) -> dict[str, Any]:
        """Bytes each rank sent per step this epoch for the embedding table (as its placement counts them: the row
        exchange, the sparse gradient all-gather, or the dense gradient's all-reduce), and the dense layers'
        ring all-reduce (computed: DDP's own traffic is not observable). Empty for one process."""
        if not self.dist.enabled:
            return {}
        sent = self.placement.sent_bytes
        steps = max(self.state.step - self._comm_from_step, 1)
        per_rank = ddp.gather_rows(np.array([(sent - self._comm_from_bytes) / steps]), self.dist)
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters()
                    if p is not self._table)
        world = self.dist.world_size
        return {"table_sent_bytes_per_step": [round(float(b)) for b in per_rank],
                "dense_allreduce_bytes_per_step": round(2 * (world - 1) / world * dense)}

    def predict(self, split: SplitArrays) -> np.ndarray:
        """Probabilities for every row of a prepared split, in row order (every rank gets all of them)."""
        shard = ddp.shard_bounds(len(split), self.dist)
        batches = iterate_batches(split, self.cfg.eval_batch_size, prefetch=self.cfg.prefetch_batches,
                                  rows=shard)
        local = sigmoid(predict_logits(self.placement.scoring_model(self.model), batches, self.device,
                                       self.precision))
        self.placement.join_evaluation(len(split), self.cfg.eval_batch_size)
        return ddp.gather_rows(local, self.dist)

    def evaluate(self, split: SplitArrays, probs: np.ndarray | None = None) -> dict[str, float]:
        """The split's metrics (weighted by its sample weights, gAUC by its groups, where it has them), from
        ``probs`` when already predicted."""
        probs = self.predict(split) if probs is None else probs
        return summarize(np.asarray(split.labels), probs, None if split.group is None else np.asarray(split.group),
                         None if split.weights is None else np.asarray(split.weights))


_MONITOR = {"auc": "AUC", "auc-logloss": "AUC - logloss"}


def own_part(saved: dict[str, Any], ctx: ddp.DistContext, where: Path) -> dict[str, Any] | None:
    """This rank's own part (``Trainer._own_part``) of a checkpoint's saved optimiser state (``where``: its
    folder); None for a checkpoint written before every rank's part was kept. A checkpoint of another number of
    ranks is refused: no rank's random-number stream would continue an uninterrupted run's."""
    if "ranks" not in saved:
        return None
    if saved["world_size"] != ctx.world_size:
        raise ConfigError(f"{where}: a checkpoint of {saved['world_size']} rank(s), resumed on {ctx.world_size}; "
                          f"resume with {saved['world_size']} (each rank continues its own random-number stream: "
                          "its dropout masks), or start again without --resume")
    return saved["ranks"][str(ctx.rank)]


def _format_record(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"train logloss {r['train_logloss']:.5f}"]
    if "valid_auc" in r:
        parts += [f"valid AUC {r['valid_auc']:.5f}", f"valid logloss {r['valid_logloss']:.5f}"]
    if r.get("samples_per_s"):
        parts.append(f"{r['samples_per_s']:,.0f} samples/s")
    if "table_sent_bytes_per_step" in r:
        table = ", ".join(f"{b / 1024:,.1f}" for b in r["table_sent_bytes_per_step"])
        parts.append(f"sent per step and rank: table {table} KiB + dense {r['dense_allreduce_bytes_per_step'] / 1024:,.1f} KiB")
    return " | ".join(parts)
