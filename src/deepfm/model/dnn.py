"""The deep part: Linear -> (BatchNorm) -> ReLU -> Dropout blocks, then one output logit."""

from __future__ import annotations

import torch
from torch import nn


class DNN(nn.Module):
    """``[B, in_features]`` -> logits ``[B]``."""

    def __init__(self, in_features: int, hidden_units: list[int], *, dropout: float = 0.0,
                 batch_norm: bool = False, init: str = "xavier_uniform", init_std: float = 1e-4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for units in hidden_units:
            layers.append(nn.Linear(width, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                if init == "normal":
                    nn.init.normal_(m.weight, std=init_std)
                elif init == "xavier_normal":
                    nn.init.xavier_normal_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
