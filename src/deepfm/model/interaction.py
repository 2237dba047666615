"""The factorization machine's second-order term, as a bi-interaction vector."""

from __future__ import annotations

import torch
from torch import nn


class BiInteraction(nn.Module):
    """``0.5 * ((sum_i x_i v_i)^2 - sum_i (x_i v_i)^2)`` -> ``[B, D]``.

    Summed over D it equals ``sum_{i<j} <v_i, v_j> x_i x_j`` (Rendle 2010), in O(F * D) instead of O(F^2 * D).
    ``fields [B, F, D]`` are the per-field vectors; ``self_square [B, D]`` is the sum of squares of every
    individual feature vector (which differs from ``(fields ** 2).sum(1)`` when a field pools several tags).
    """

    def forward(self, fields: torch.Tensor, self_square: torch.Tensor) -> torch.Tensor:
        sum_then_square = fields.sum(dim=1).pow(2)
        return 0.5 * (sum_then_square - self_square)
