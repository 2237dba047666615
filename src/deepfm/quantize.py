"""Row-wise int8 embedding tables for serving (``deepfm serve --quantize int8``, ``deepfm export --quantize int8``).

Each row of the table ``[R, D + 1]`` is stored as ``D + 1`` signed 8-bit codes in [-127, 127] and one float16
scale: ``row ≈ codes * scale``, ``scale`` the row's largest magnitude / 127 (rounded up to the next float16,
so no code leaves the range and every value is within half a step). The table shrinks to
(D + 1 + 2) / (4 (D + 1)) of its float32 size: 0.28 at D = 16. FBGEMM's fused layout (uint8 codes with a
scale and a bias per row) uses all 256 levels of a row whatever its centre, but its two numbers cost 4
(float16) or 8 (float32) bytes a row, 0.31 or 0.37 at D = 16; on the benchmark data the symmetric codes
moved the test AUC by as little (bench/SERVING.md). The dense layers stay float32. A lookup dequantizes only
the rows a batch touches (``QuantizedTable.rows``), through the model's ``rows_from`` hook, the same one a
row-sharded table uses.

A model directory can hold the quantized table as ``model.int8.safetensors`` (the codes and scales and every
other weight), so that loading it never reads the float32 table; its codes and scales are memory-mapped and
shared by every worker, like the float32 table (``deepfm.artifact.mapped_tensor``). The file's metadata names
its layout (``LAYOUT``): a file of another layout (the earlier uint8 + float32 scale and bias one) or made
from other weights is never read as this one; the table is quantized again at load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepfm.artifact import LoadedModel, mapped_table, mapped_tensor
from deepfm.errors import ArtifactError
from deepfm.io import atomic_save_tensors
from deepfm.model import TABLE_KEY
from deepfm.tensorfile import read_header

INT8_FILE = "model.int8.safetensors"
CODES, SCALE = "embedding.codes", "embedding.scale"
FORMAT = "deepfm-model-int8"
LAYOUT = "rowwise-symmetric-int8-fp16-scale"  # the earlier files (uint8 codes, float32 scale + bias) have none
LEVELS = 127
BLOCK_ROWS = 1 << 18  # rows quantized at a time: bounds the float temporaries for a table of any size


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, >= 0) as float16, rounded up where the nearest float16 is below it."""
    half = x.half()
    low = half.float() < x
    return torch.where(low, torch.nextafter(half, torch.full_like(half, float("inf"))), half)


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` float -> (codes int8 ``[R, C]`` in [-127, 127], scale float16 ``[R]``), block by block."""
    rows = table.shape[0]
    codes = torch.empty(table.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float16)
    for lo in range(0, rows, BLOCK_ROWS):
        block = table[lo:lo + BLOCK_ROWS].float()
        step = _float16_at_least(block.abs().amax(dim=1) / LEVELS)
        safe = torch.where(step > 0, step.float(), torch.ones(step.shape))  # an all-zero row: every code 0
        codes[lo:lo + BLOCK_ROWS] = (block / safe[:, None]).round_().clamp_(-LEVELS, LEVELS).to(torch.int8)
        scale[lo:lo + BLOCK_ROWS] = step
    return codes, scale


class QuantizedTable(nn.Module):
    """The int8 table; ``rows`` is a ``RowSource``: id tensors -> their dequantized float32 rows."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def rows(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.codes[i].float() * self.scale[i].float().unsqueeze(-1) for i in ids]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))


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
    ``model.safetensors`` but the table, and the table's codes and scales."""
    weights = loaded.path / "model.safetensors"
    codes, scale = quantize_rows(mapped_table(weights))
    state = {k: v for k, v in loaded.model.state_dict().items() if k != TABLE_KEY}
    state.update({CODES: codes, SCALE: scale})
    out = loaded.path / INT8_FILE
    atomic_save_tensors(state, out, metadata={"format": FORMAT, "layout": LAYOUT, "source": _fingerprint(weights)})
    return out


def _fingerprint(weights: Path) -> str:
    st = weights.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def stored_int8(model_dir: Path) -> tuple[QuantizedTable | None, str]:
    """The table of ``model.int8.safetensors`` (codes and scales memory-mapped) when the directory holds one of
    this layout made from its current weights; else None and why not."""
    stored, weights = model_dir / INT8_FILE, model_dir / "model.safetensors"
    if not stored.is_file():
        return None, "quantized at load"
    try:
        entries, meta = read_header(stored)
    except ArtifactError as err:  # a derived file: the float32 weights are still there to quantize
        return None, f"quantized at load ({err})"
    if meta.get("format") != FORMAT or meta.get("layout") != LAYOUT:
        return None, f"quantized at load ({INT8_FILE} has another layout: deepfm export --quantize int8 rewrites it)"
    if meta.get("source") != _fingerprint(weights):
        return None, f"quantized at load ({INT8_FILE} was made from other weights)"
    if CODES not in entries or SCALE not in entries:
        return None, f"quantized at load ({INT8_FILE} does not hold int8 codes and float16 scales)"
    codes, scale = mapped_tensor(stored, CODES), mapped_tensor(stored, SCALE)
    if codes is None or codes.dtype != torch.int8 or scale is None or scale.dtype != torch.float16:
        return None, f"quantized at load ({INT8_FILE} does not hold int8 codes and float16 scales)"
    return QuantizedTable(codes, scale), str(stored)


def int8_model(loaded: LoadedModel) -> tuple[QuantizedDeepFM, str]:
    """The loaded model with an int8 table: from ``model.int8.safetensors`` when the directory holds one of
    this layout made from its current weights (memory-mapped), else quantized now. Also says which."""
    table, source = stored_int8(loaded.path)
    if table is None:
        table = QuantizedTable(*quantize_rows(loaded.model.embedding.weight.detach()))
    return QuantizedDeepFM(loaded.model, table), source
