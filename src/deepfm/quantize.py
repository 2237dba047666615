"""Row-wise int8 embedding tables for serving (``deepfm serve --quantize int8``, ``deepfm export --quantize int8``).

Each row of the table ``[R, D + 1]`` is stored as ``D + 1`` unsigned 8-bit codes with its own float32 scale
and bias (FBGEMM's fused 8-bit row-wise layout, with the two numbers kept as tensors beside the codes
instead of appended to each row): ``row ≈ codes * scale + bias``, ``bias`` the row's minimum and ``scale``
its range / 255, so every row uses all 256 levels whatever its magnitude. The table shrinks to
(D + 1 + 8) / (4 (D + 1)) of its float32 size (0.37 at D = 16; 0.31 at D = 32). The dense layers stay
float32. A lookup dequantizes only the rows a batch touches (``QuantizedTable.rows``), through the model's
``rows_from`` hook, the same one a row-sharded table uses.

A model directory can hold the quantized table as ``model.int8.safetensors`` (the codes, scales and biases
and every other weight), so that loading it never reads the float32 table; its codes are memory-mapped and
shared by every worker, like the float32 table (``deepfm.artifact.mapped_tensor``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepfm.artifact import LoadedModel, mapped_table, mapped_tensor
from deepfm.io import atomic_save_tensors
from deepfm.model import TABLE_KEY

INT8_FILE = "model.int8.safetensors"
CODES, SCALE, BIAS = "embedding.codes", "embedding.scale", "embedding.bias"
FORMAT = "deepfm-model-int8"
BLOCK_ROWS = 1 << 18  # rows quantized at a time: bounds the float temporaries for a table of any size


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[R, C]`` float -> (codes uint8 ``[R, C]``, scale float32 ``[R]``, bias float32 ``[R]``), block by block."""
    rows = table.shape[0]
    codes = torch.empty(table.shape, dtype=torch.uint8)
    scale = torch.empty(rows, dtype=torch.float32)
    bias = torch.empty(rows, dtype=torch.float32)
    for lo in range(0, rows, BLOCK_ROWS):
        block = table[lo:lo + BLOCK_ROWS].float()
        low, high = block.min(dim=1).values, block.max(dim=1).values
        step = (high - low) / 255.0
        safe = torch.where(step > 0, step, torch.ones_like(step))  # a constant row: every code 0, the row = bias
        codes[lo:lo + BLOCK_ROWS] = ((block - low[:, None]) / safe[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        scale[lo:lo + BLOCK_ROWS] = torch.where(step > 0, step, torch.zeros_like(step))
        bias[lo:lo + BLOCK_ROWS] = low
    return codes, scale, bias


class QuantizedTable(nn.Module):
    """The int8 table; ``rows`` is a ``RowSource``: id tensors -> their dequantized float32 rows."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def rows(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.codes[i].float() * self.scale[i].unsqueeze(-1) + self.bias[i].unsqueeze(-1) for i in ids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.bias))


class QuantizedDeepFM(nn.Module):
    """A ``DeepFM`` whose table is int8: the same ``forward`` inputs, its rows from ``QuantizedTable``."""

    def __init__(self, model: nn.Module, table: QuantizedTable) -> None:
        super().__init__()
        self.model = model
        self.table = table
        # the float32 table is not needed any more: an empty one takes its place
        model.embedding.weight = nn.Parameter(torch.empty(0, model.embedding.weight.shape[1]), requires_grad=False)

    def forward(self, cat_ids, num_values, multi_ids, multi_weights, multi_bags) -> torch.Tensor:
        return self.model(cat_ids, num_values, multi_ids, multi_weights, multi_bags, rows_from=self.table.rows)


def save_int8(loaded: LoadedModel) -> Path:
    """Write ``model.int8.safetensors`` into the model directory (atomically): every weight of
    ``model.safetensors`` but the table, and the table's codes, scales and biases."""
    weights = loaded.path / "model.safetensors"
    codes, scale, bias = quantize_rows(mapped_table(weights))
    state = {k: v for k, v in loaded.model.state_dict().items() if k != TABLE_KEY}
    state.update({CODES: codes, SCALE: scale, BIAS: bias})
    out = loaded.path / INT8_FILE
    atomic_save_tensors(state, out, metadata={"format": FORMAT, "source": _fingerprint(weights)})
    return out


def _fingerprint(weights: Path) -> str:
    st = weights.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def int8_model(loaded: LoadedModel) -> tuple[QuantizedDeepFM, str]:
    """The loaded model with an int8 table: from ``model.int8.safetensors`` when the directory holds one made
    from its current weights (its codes memory-mapped), else quantized now. Also says which."""
    from safetensors import safe_open

    stored = loaded.path / INT8_FILE
    weights = loaded.path / "model.safetensors"
    if stored.is_file():
        with safe_open(str(stored), framework="pt") as f:
            fresh = (f.metadata() or {}).get("source") == _fingerprint(weights)
        if fresh:
            with safe_open(str(stored), framework="pt") as f:
                scale, bias = f.get_tensor(SCALE), f.get_tensor(BIAS)
            table = QuantizedTable(mapped_tensor(stored, CODES), scale, bias)
            return QuantizedDeepFM(loaded.model, table), str(stored)
    table = QuantizedTable(*quantize_rows(loaded.model.embedding.weight.detach()))
    return QuantizedDeepFM(loaded.model, table), "quantized at load"
