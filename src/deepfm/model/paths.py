"""Which forward pass runs: decided here, and nowhere else.

The model has one plain graph (split the looked-up rows, linear sum, ``BiInteraction``, the DNN's modules,
``nn.Dropout``): export traces it, and every other path computes the same values and gradients, only faster
(``tests/test_paths.py`` checks each against it, in float32 and under bf16 autocast). The choices, first match
wins:

    decision      condition                                                        path
    ------------  ---------------------------------------------------------------  --------------------------------
    every one     tracing, scripting or compiling (export), or ``plain_graph()``   the plain graph
    head          ``model.fuse`` off, head "project", or linear / FM / DNN off     Head.PLAIN
    (DeepFM)      no gradient, no penalty, the model's own table, single-valued    Head.TABLE: the fused head reads
                  fields only, and ``head_gather_kernel``                          the table (no looked-up rows)
                  otherwise                                                        Head.FUSED (``fused_head``)
    fused head    ``head_kernel`` (forward) / ``head_backward_kernel`` (backward)   native kernel, else torch ops
    DNN layers    off the CPU                                                      Layers.MODULES
                  bf16 autocast, oneDNN's fused linear + pointwise op              Layers.ONEDNN_BF16
                  float32 without gradient or autocast (scoring)                   Layers.FLOAT32_SCORING: GEMM,
                                                                                   then bias + ReLU natively where
                                                                                   ``bias_relu_kernel``
                  otherwise (a float32 training pass: hooks kept)                  Layers.MODULES
    dropout       not training, p = 0, or off the CPU                              Drop.TORCH (``nn.Dropout``)
                  ``dropout_kernel``                                               Drop.NATIVE
                  otherwise                                                        Drop.TORCH_BITS (16-bit draws)
    FM term       a gradient is needed                                             one-pass autograd Function
                  otherwise                                                        plain operations

The ``*_kernel`` predicates say where a native kernel (``deepfm.native``) takes its tensors; the kernels'
wrappers check nothing more, so nothing calls them without asking here first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch

from deepfm import native
from deepfm.model.embedding import embedding_table

HEAD_MAX_DIM = 1024  # MAX_DIM in fused_head.c
_HAS_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_plain = False  # set by plain_graph()


class Head(Enum):
    PLAIN = "plain graph"
    FUSED = "fused head"
    TABLE = "table-direct scoring"


class Layers(Enum):
    MODULES = "modules"
    ONEDNN_BF16 = "oneDNN Linear+ReLU in bf16"
    FLOAT32_SCORING = "float32 scoring"


class Drop(Enum):
    TORCH = "nn.Dropout"
    NATIVE = "native kernel"
    TORCH_BITS = "16-bit torch draws"


def plain() -> bool:
    """Whether every decision takes the plain graph: under export (tracing, scripting, compiling), or asked for
    with ``plain_graph()``."""
    return _plain or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()


@contextmanager
def plain_graph() -> Iterator[None]:
    """Run the plain graph inside this block: the reference every other path is tested against."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes in on ``t``'s device, or ``t``'s own outside autocast."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def head_path(model: Any, num_values: torch.Tensor | None = None, *, with_penalty: bool = False,
              sharded: bool = False) -> Head:
    """The DeepFM head for this pass. ``model``: a ``DeepFM``; ``num_values``: the batch's numeric values (None:
    the rows are already looked up); ``sharded``: the rows come from other ranks."""
    cfg = model.cfg
    if plain() or not model.fuse or not (cfg.head == "sum" and cfg.use_linear and cfg.use_fm
                                         and model.dnn is not None):
        return Head.PLAIN
    table = embedding_table(model)
    if (num_values is not None and not torch.is_grad_enabled() and not with_penalty and not sharded
            and not model.embedding.num_multi and (num_values.dtype == table.dtype or not num_values.shape[1])
            and head_gather_kernel(table, compute_dtype(table))):
        return Head.TABLE
    return Head.FUSED


def layers_path(x: torch.Tensor) -> Layers:
    """How the DNN runs its Linear + ReLU pairs on input ``x``."""
    if x.device.type != "cpu" or plain():
        return Layers.MODULES
    if _HAS_LINEAR_POINTWISE and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return Layers.ONEDNN_BF16
    if not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32:
        return Layers.FLOAT32_SCORING
    return Layers.MODULES


def dropout_path(x: torch.Tensor, training: bool, p: float) -> Drop:
    if not training or p == 0.0 or x.device.type != "cpu" or plain():
        return Drop.TORCH
    return Drop.NATIVE if dropout_kernel(x) else Drop.TORCH_BITS


def fm_function(fields: torch.Tensor) -> bool:
    """Whether the FM term runs as its one-pass autograd Function (a gradient is needed), else plain ops."""
    return fields.requires_grad and torch.is_grad_enabled() and not plain()


# ---------------------------------------------------------------- where the native kernels take their tensors
def _built() -> bool:
    return native.load() is not None


def head_kernel(rows: torch.Tensor, dtype: torch.dtype) -> bool:
    """``native.head_forward``: contiguous float32 CPU rows ``[B, F, D + 1]``, D <= 1024, output in f32/bf16."""
    return (rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.is_contiguous() and rows.dim() == 3
            and dtype in (torch.float32, torch.bfloat16) and rows.shape[2] - 1 <= HEAD_MAX_DIM and _built())


def head_gather_kernel(table: torch.Tensor, dtype: torch.dtype) -> bool:
    """``native.head_gather_forward`` on this table (its ids are int64 and its values float32 by construction:
    ``FieldEmbedding.single_ids``)."""
    return (table.device.type == "cpu" and table.dtype == torch.float32 and table.is_contiguous()
            and table.dim() == 2 and dtype in (torch.float32, torch.bfloat16)
            and table.shape[1] - 1 <= HEAD_MAX_DIM and _built())


def head_backward_kernel(rows: torch.Tensor, grad_x: torch.Tensor | None, grad_logit: torch.Tensor) -> bool:
    """``native.head_backward``: as ``head_kernel``'s rows, gradients f32/bf16 (DNN input) and f32 (logit)."""
    if rows.device.type != "cpu" or rows.dtype != torch.float32 or not rows.is_contiguous() or rows.dim() != 3:
        return False
    if grad_x is not None and (grad_x.dtype not in (torch.float32, torch.bfloat16) or grad_x.device.type != "cpu"):
        return False
    return grad_logit.dtype == torch.float32 and grad_logit.device.type == "cpu" and _built()


def dropout_kernel(x: torch.Tensor) -> bool:
    """``native.dropout_forward`` / ``dropout_backward``: a contiguous float32 or bfloat16 CPU tensor."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and _built())


def bias_relu_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """``native.bias_relu_`` after ``x @ weight.T``: 2-D float32 CPU input, contiguous float32 parameters."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype == weight.dtype == bias.dtype == torch.float32
            and weight.is_contiguous() and bias.is_contiguous() and _built())
