"""Optimisers: Adam (default), Adagrad and proximal Adagrad with L1/L2, each with sparse embedding updates.

With ``sparse: true`` the embedding table gets sparse gradients and its own optimiser that touches only the
rows in the batch (``RowwiseAdam``: SparseAdam's lazy Adam, fused; Adagrad's sparse path; or
``ProximalAdagrad``); the dense layers use the dense variant. Dense Adam would read and write every row of
the table each step, however few a batch touched (bench/FIGURES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepfm import native as kernels
from deepfm.config import TrainConfig
from deepfm.model.embedding import embedding_table
from deepfm.train import distributed as ddp


class ProximalAdagrad(torch.optim.Optimizer):
    """Adagrad with a proximal L1/L2 step, as TensorFlow's ``ProximalAdagradOptimizer`` (the seed's choice).

    ``accum += g^2; lr_t = lr / sqrt(accum); v = w - lr_t * g;
    w = sign(v) * max(|v| - lr_t * l1, 0) / (1 + lr_t * l2)``.
    L1 drives unused weights to exactly zero. Sparse gradients update only their rows.
    """

    def __init__(self, params, lr: float = 0.01, l1: float = 0.0, l2: float = 0.0,
                 initial_accumulator_value: float = 0.1) -> None:
        defaults = {"lr": lr, "l1": l1, "l2": l2, "initial_accumulator_value": initial_accumulator_value}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, l1, l2 = group["lr"], group["l1"], group["l2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "accum" not in state:
                    state["accum"] = torch.full_like(p, group["initial_accumulator_value"],
                                                     memory_format=torch.preserve_format)
                accum = state["accum"]
                grad = p.grad
                if grad.is_sparse:
                    rows, values = sparse_rows(grad)
                    acc_rows = accum[rows] + values * values
                    accum[rows] = acc_rows
                    p[rows] = self._prox(p[rows], values, lr / acc_rows.sqrt(), l1, l2)
                else:
                    accum.addcmul_(grad, grad)
                    p.copy_(self._prox(p, grad, lr / accum.sqrt(), l1, l2))
        return loss

    @staticmethod
    def _prox(w: torch.Tensor, g: torch.Tensor, lr_t: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
        v = w - lr_t * g
        if l1 > 0:
            v = torch.sign(v) * torch.clamp(v.abs() - lr_t * l1, min=0.0)
        return v / (1.0 + lr_t * l2) if l2 > 0 else v


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row-sparse gradient -> (unique row ids ``[U]``, summed gradient rows ``[U, D]``).

    ``torch.unique`` sorts only the row ids; ``index_add`` sums duplicates. Cheaper than
    ``Tensor.coalesce()``, which sorts and moves the whole value matrix.
    """
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)
    values = grad._values()
    summed = torch.zeros((rows.numel(), *values.shape[1:]), dtype=values.dtype, device=values.device)
    summed.scatter_add_(0, inverse.view(-1, *([1] * (values.dim() - 1))).expand_as(values), values)
    return rows, summed


class RowwiseAdam(torch.optim.Optimizer):
    """Adam for embedding tables with sparse gradients: only the rows in the batch are read and written.

    Same update as ``torch.optim.SparseAdam`` ("lazy Adam": moments of untouched rows are not decayed), but
    fused into a few gathers and scatters of the touched rows, where SparseAdam builds and coalesces several
    sparse tensors per step (bench/FIGURES.md). Bias correction uses one step count for the table, as SparseAdam does.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, native: bool = True) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.native = native
        self._scratch: dict[torch.Tensor, kernels.Scratch] = {}  # the native kernel's, per table

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowwiseAdam takes sparse gradients; use Adam for dense parameters")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                g = p.grad
                if self.native and p.device.type == "cpu":
                    if p not in self._scratch:
                        self._scratch[p] = kernels.Scratch()
                    if kernels.rowwise_adam(p, state["exp_avg"], state["exp_avg_sq"], self._scratch[p],
                                            g._indices()[0], g._values(), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                            bias1=bias1, bias2=bias2):
                        continue
                rows, grad = sparse_rows(g)
                # index_select / index_copy_: several times faster on CPU than advanced indexing
                m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = v.div_(bias2).sqrt_().add_(eps)
                w = p.index_select(0, rows).addcdiv_(m, denom, value=-lr / bias1)
                p.index_copy_(0, rows, w)
        return loss


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, *, sharded: list[torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm``; returns the norm.

    As ``torch.nn.utils.clip_grad_norm_``, but a sparse gradient (the embedding table's) counts with its
    duplicate rows summed: it is coalesced in place, which the row-wise optimisers then use as it is.
    ``sharded``: those of ``params`` of which each rank holds a different part (a row-sharded table): their
    squares are summed over ranks (every rank then scales by the same norm).
    """
    own = {id(p) for p in sharded or []}
    squares, shard_squares = [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            square = p.grad._values().float().pow(2).sum()
        else:
            square = p.grad.float().pow(2).sum()
        (shard_squares if id(p) in own else squares).append(square)
    if sharded:
        part = torch.stack(shard_squares).sum() if shard_squares else torch.zeros(())
        part = part.to(ddp.comm_device())
        dist.all_reduce(part)
        squares.append(part.to(params[0].device))
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            (p.grad._values() if p.grad.is_sparse else p.grad).mul_(scale.to(p.grad.dtype))
    return total


def _adam(params, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused into one kernel per tensor where torch has that for the device (CPU from torch
    2.4, CUDA): the same update in one pass over each tensor instead of one per operation (bench/FIGURES.md)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device/dtype without the fused kernel
        return torch.optim.Adam(params, **kwargs)


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimiser for the embedding table (sparse when ``cfg.sparse``) and one for the dense layers."""
    weight = embedding_table(model)
    table = [] if weight is None else [weight]
    dense = [p for p in model.parameters() if p is not weight]
    opts: list[torch.optim.Optimizer] = []
    # whole-table L2 (embedding_l2 / 2 * ||W||^2) has the gradient embedding_l2 * W: coupled weight decay
    table_decay = cfg.embedding_l2 if cfg.embedding_l2_scope == "table" else 0.0
    if cfg.optimizer == "adam":
        if cfg.sparse:
            opts.append(RowwiseAdam(table, lr=cfg.lr))
            opts.append(_adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))
        else:
            opts.append(_adam([{"params": table, "weight_decay": table_decay},
                                          {"params": dense, "weight_decay": cfg.weight_decay}], lr=cfg.lr))
    elif cfg.optimizer == "adagrad":
        opts.append(torch.optim.Adagrad(table, lr=cfg.lr, weight_decay=table_decay))
        opts.append(torch.optim.Adagrad(dense, lr=cfg.lr, weight_decay=cfg.weight_decay))
    else:
        opts.append(ProximalAdagrad(table + dense, lr=cfg.lr, l1=cfg.l1, l2=cfg.l2))
    return opts


class LearningRateOnPlateau:
    """The learning rate times ``lr_plateau_factor`` (not below ``min_lr``) when the monitored validation score
    has not improved by more than ``min_delta`` for more than ``lr_plateau_patience`` epochs: torch's
    ``ReduceLROnPlateau``, one per optimiser (each scheduler drives one), all given the same score. ``say`` gets
    a line only when the rate changed (a factor of 1.0, or a rate already at ``min_lr``, changes nothing)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, say: Callable[[str], None],
                 monitor: str = "AUC") -> None:
        self.optimizers = optimizers
        self.say = say
        self.monitor = monitor
        # torch refuses a factor of 1.0, which here means "never reduce"
        self.schedulers = [] if cfg.lr_plateau_factor >= 1.0 else [
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="max", factor=cfg.lr_plateau_factor, patience=cfg.lr_plateau_patience,
                threshold=cfg.min_delta, threshold_mode="abs", min_lr=cfg.min_lr, eps=0.0)
            for opt in optimizers]

    def step(self, score: float) -> None:
        """After an epoch's validation, with its monitored score."""
        before = self.optimizers[0].param_groups[0]["lr"]
        for scheduler in self.schedulers:
            scheduler.step(score)
        after = self.optimizers[0].param_groups[0]["lr"]
        if after != before:
            self.say(f"Validation {self.monitor} did not improve: learning rate {before:.2e} -> {after:.2e}")

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for scheduler, state in zip(self.schedulers, states, strict=True):
            scheduler.load_state_dict(state)
