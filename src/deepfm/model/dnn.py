"""The deep part: Linear -> (BatchNorm) -> ReLU -> Dropout blocks, then one output logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepfm import native as kernels
from deepfm.model import paths


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
            # in place: the Linear (or BatchNorm) before it keeps no output for its backward, so this saves a
            # [B, units] buffer and a pass over memory each layer, training and inference alike
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(Dropout(dropout))
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
        path = paths.layers_path(x)
        if path is paths.Layers.MODULES:
            return self.net(x).squeeze(-1)
        layers = list(self.net)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Linear) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
                x = linear_relu(x, layer.weight, layer.bias, path)
                i += 2
            else:
                x = layer(x)
                i += 1
        return x.squeeze(-1)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training pass draws fewer random bits (``dropout_cpu``); elsewhere the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if paths.dropout_path(x, self.training, self.p) is paths.Drop.TORCH:
            return super().forward(x)
        return dropout_cpu(x, self.p)


_LEVELS = 1 << 16


def dropout_cpu(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout from 16-bit uniform draws: each element is kept when its draw is >= round(p * 2^16), then
    scaled by 2^16 / (2^16 - that), so the output's expectation is exactly ``x``; the drop probability is ``p``
    to within 2^-17.  The native kernel (``native/dropout.c``) draws and applies the mask in one pass and masks
    the gradient in one more, from a seed taken from torch's generator (seeded runs repeat); without it the
    draws are 16-bit slices of torch's random int64 words, four elements a word, where ``bernoulli_`` spends a
    float draw on each (timings: bench/FIGURES.md)."""
    drop = round(p * _LEVELS)
    if drop >= _LEVELS:
        return x * 0.0
    scale = _LEVELS / (_LEVELS - drop)
    if paths.dropout_kernel(x):
        seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, generator=generator))
        return _NativeDropoutFn.apply(x, drop, scale, seed)
    n = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator)
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop - _LEVELS // 2  # int16 draw = u16 - 2^15
    return x * keep * scale


class _NativeDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: int, scale: float, seed: int) -> torch.Tensor:  # type: ignore[override]
        out, keep = kernels.dropout_forward(x, drop, scale, seed)  # dropout_cpu asked paths.dropout_kernel
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        grad = grad.contiguous()
        if grad.shape == keep.shape and paths.dropout_kernel(grad):
            return kernels.dropout_backward(grad, keep, ctx.scale), None, None, None
        return grad * keep * ctx.scale, None, None, None


class _LinearReLUFn(torch.autograd.Function):
    """``relu(x @ W.T + b)`` as one oneDNN call (the ReLU applied as the GEMM writes its output), with
    autograd's backward for the pair: one pass over the activations fewer each step and each inference."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight, y = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, y, 0)
        return g.mm(weight), g.t().mm(x), g.sum(0)


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, path: paths.Layers) -> torch.Tensor:
    """``relu(linear(x, weight, bias))`` on the CPU, fused where it pays:
    - under bf16 autocast, one oneDNN call, computed as autocast would (bf16 operands, gradients cast back to
      the float32 parameters);
    - a float32 scoring pass (no gradient): torch's GEMM without the bias, then the bias and ReLU in one native
      pass over its output (``native/linear_relu.c``), where ``addmm`` first copies the bias into every output
      row for the GEMM to accumulate onto and the ReLU makes a pass of its own;
    - elsewhere, torch's two modules (in a float32 training step the native pass, with a one-pass backward,
      measured no faster).
    """
    if path is paths.Layers.ONEDNN_BF16:
        dtype = torch.bfloat16
        return _LinearReLUFn.apply(x.to(dtype), weight.to(dtype), bias.to(dtype))
    if path is paths.Layers.FLOAT32_SCORING and paths.bias_relu_kernel(x, weight, bias):
        return kernels.bias_relu_(torch.mm(x, weight.t()), bias)
    return torch.relu_(F.linear(x, weight, bias))
