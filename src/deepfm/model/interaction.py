"""The factorization machine's second-order term, as a bi-interaction vector."""

from __future__ import annotations

import torch
from torch import nn

from deepfm import native
from deepfm.model import paths


class _BiInteractionFn(torch.autograd.Function):
    """``0.5 * ((sum_f v_f)^2 - sum_f v_f^2)`` with its gradient in one pass: d/dv_f = (sum_g v_g - v_f) * grad.

    Autograd's version of the same formula runs pow, sum and their backwards as separate passes; this one saves
    only ``fields`` and their sum.
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


class _FusedHeadFn(torch.autograd.Function):
    """``rows [B, F, D + 1]`` -> (the DNN's input ``[B, F * D]`` in ``dtype``, linear + FM logit ``[B]``).

    The fusion (training and inference; export traces the plain graph) of what the paper's diagram draws
    apart: the first-order sum over fields, the FM term summed over D, and the DNN's flattened input, all read
    from the same looked-up rows; backward:
    ``d rows[..., :D] = g_dnn + (S - v_f) g``, ``d rows[..., D] = g``, with ``S`` the sum of the field vectors
    and ``g`` the gradient of the logit part. On CPU each direction is one pass of a native kernel
    (``deepfm.native``), where autograd's graph of the same (split, FM, flatten, cast, their
    backwards and the gradient sums) makes about nine passes over strided views; elsewhere, torch operations.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.native = paths.head_kernel(rows, dtype)  # the backward takes the same path where it can
        if ctx.native:
            x, total, first_second = native.head_forward(rows, dtype)
        else:
            d = rows.shape[-1] - 1
            fields = rows[..., :d]
            total = fields.sum(dim=1)  # [B, D]
            first_second = rows[..., d].sum(dim=1) + 0.5 * (total.square().sum(dim=1)
                                                             - fields.square().sum(dim=(1, 2)))
            x = fields.to(dtype).reshape(rows.shape[0], -1)
        ctx.save_for_backward(rows, total)
        return x, first_second

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None, grad_logit: torch.Tensor | None  # type: ignore[override]
                 ) -> tuple[torch.Tensor, None]:
        rows, total = ctx.saved_tensors
        batch, n_fields, d = rows.shape[0], rows.shape[1], rows.shape[2] - 1
        if grad_logit is None:
            grad_logit = rows.new_zeros(batch)
        if ctx.native and paths.head_backward_kernel(rows, grad_x, grad_logit):
            out = native.head_backward(rows, total, grad_x, grad_logit)
        else:
            g = grad_logit.view(batch, 1, 1)
            vectors = (total.unsqueeze(1) - rows[..., :d]) * g
            if grad_x is not None:
                vectors = vectors + grad_x.view(batch, n_fields, d)
            out = torch.cat([vectors, g.expand(batch, n_fields, 1)], dim=-1)
        return out, None


def fused_head(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(DNN input ``[B, F * D]`` in ``dtype``, first-order + FM logit ``[B]``) from ``rows``; see
    ``_FusedHeadFn``. Equal to splitting ``rows`` and applying the linear sum, ``BiInteraction`` summed over D and
    a flatten."""
    return _FusedHeadFn.apply(rows, dtype)


class BiInteraction(nn.Module):
    """``0.5 * ((sum_i x_i v_i)^2 - sum_i (x_i v_i)^2)`` -> ``[B, D]``.

    Summed over D it equals ``sum_{i<j} <v_i, v_j> x_i x_j`` (Rendle 2010), in O(F * D) instead of O(F^2 * D).
    ``fields [B, F, D]`` are the per-field vectors; ``square_excess [B, D]`` (optional) is what the sum of
    squares of every individual feature vector exceeds ``(fields ** 2).sum(1)`` by, which happens when a field
    pools several tags (see ``FieldEmbedding``).
    """

    def forward(self, fields: torch.Tensor, square_excess: torch.Tensor | None = None) -> torch.Tensor:
        if paths.fm_function(fields):
            bi = _BiInteractionFn.apply(fields)
        else:  # inference and export: plain operations
            total = fields.sum(dim=1)
            bi = 0.5 * (total * total - (fields * fields).sum(dim=1))
        return bi if square_excess is None else bi - 0.5 * square_excess
