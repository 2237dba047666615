"""The factorization machine's second-order term, as a bi-interaction vector."""

from __future__ import annotations

import torch
from torch import nn


class _BiInteractionFn(torch.autograd.Function):
    """``0.5 * ((sum_f v_f)^2 - sum_f v_f^2)`` with its gradient in one pass: d/dv_f = (sum_g v_g - v_f) * grad.

    Autograd's version of the same formula (pow, sum, their backwards) cost ~5x more time on a 4096 x 39 x 16
    batch; this one saves only ``fields`` and their sum.
    """

    @staticmethod
    def forward(ctx, fields: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = fields.sum(dim=1)
        ctx.save_for_backward(fields, total)
        return 0.5 * (total * total - (fields * fields).sum(dim=1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        fields, total = ctx.saved_tensors
        return (total.unsqueeze(1) - fields).mul_(grad.unsqueeze(1))


def _tracing() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()


class BiInteraction(nn.Module):
    """``0.5 * ((sum_i x_i v_i)^2 - sum_i (x_i v_i)^2)`` -> ``[B, D]``.

    Summed over D it equals ``sum_{i<j} <v_i, v_j> x_i x_j`` (Rendle 2010), in O(F * D) instead of O(F^2 * D).
    ``fields [B, F, D]`` are the per-field vectors; ``square_excess [B, D]`` (optional) is what the sum of
    squares of every individual feature vector exceeds ``(fields ** 2).sum(1)`` by, which happens when a field
    pools several tags (see ``FieldEmbedding``).
    """

    def forward(self, fields: torch.Tensor, square_excess: torch.Tensor | None = None) -> torch.Tensor:
        if fields.requires_grad and torch.is_grad_enabled() and not _tracing():
            bi = _BiInteractionFn.apply(fields)
        else:  # inference and export: plain operations
            total = fields.sum(dim=1)
            bi = 0.5 * (total * total - (fields * fields).sum(dim=1))
        return bi if square_excess is None else bi - 0.5 * square_excess
