"""One embedding store for the linear, FM and DNN parts.

A single table ``[rows, D + 1]``: columns ``:D`` are the latent vectors ``v`` (FM and DNN), column ``D`` is
the first-order weight ``w`` (linear part), so one gather yields both. Single-valued fields are looked up in
one gather of a ``[B, F_single]`` index tensor (local id + per-field offset); multi-valued fields in one
gather over all their tags, pooled per (field, row) bag with the field's combiner.

Under row sharding (``train.embedding_sharding: row``) a module holds only its rank's rows ``[lo, hi)`` of that
table, and a lookup is given ``rows_from`` (``deepfm.train.sharding.RowExchange``, handed over by the table's
placement, ``deepfm.train.placement``), which fetches the rows a batch needs from their owners; the rest of the
forward pass is the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepfm.layout import TableLayout

COMBINERS = {"sum": 0, "mean": 1, "sqrtn": 2}
INIT_BLOCK_ROWS = 65536  # rows drawn at a time when initialising the table: bounds the memory a shard's init needs

_MODULE = "embedding"  # the attribute of a model that holds its FieldEmbedding
TABLE_KEY = f"{_MODULE}.weight"  # the table's name in a model's state dict and in model.safetensors


def embedding_table(model: nn.Module) -> nn.Parameter | None:
    """The model's embedding table (``[rows held, D + 1]``), None for a model without one. The one place that
    knows where a model keeps it: optimisers, checkpoints, warm start, loading and sharding all ask here."""
    module = getattr(model, _MODULE, None)
    return None if module is None else module.weight


def replace_embedding_table(model: nn.Module, table: torch.Tensor) -> None:
    """Make ``table`` (a memory map, say) the model's embedding table, frozen, freeing the one it had; a
    ``ValueError`` when its shape is not the model's."""
    own = embedding_table(model)
    if own is None:
        raise ValueError("the model has no embedding table")
    if table.shape != own.shape:
        raise ValueError(f"its table is {tuple(table.shape)}, the layout says {tuple(own.shape)}")
    getattr(model, _MODULE).weight = nn.Parameter(table, requires_grad=False)


def layout_buffer_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the table's layout buffers (field offsets, combiners): they describe the table's
    layout, not anything learned."""
    module = getattr(model, _MODULE, None)
    return set() if module is None else {f"{_MODULE}.{name}" for name, _ in module.named_buffers()}


# global row ids of each lookup -> their rows [*ids.shape, D + 1], in one call (one exchange when sharded)
RowSource = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class FieldEmbedding(nn.Module):
    """Inputs (see ``ModelInput``) -> per-field vectors, first-order terms and the FM square term.

    Returns ``fields [B, F, D]`` (each field's value-scaled / pooled vector), ``linear [B, F]`` (each field's
    first-order term), ``square_excess [B, D]`` or None, and ``penalty`` (sum of squared looked-up vectors / B,
    for embedding L2; computed only when ``with_penalty``, else 0).

    The FM's self-square term sums ``(x_i v_i)^2`` over every individual feature; for a multi-valued field each
    tag counts as its own feature with value ``c_j``, its combiner-normalised weight, so the FM term stays
    exact. ``square_excess`` is that sum minus ``sum_f fields_f^2`` (the per-field squares the interaction
    computes itself): None when every field is single-valued.
    """

    def __init__(self, layout: TableLayout, embed_dim: int, *, init_std: float = 1e-4,
                 sparse: bool = False, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.sparse = sparse
        self.num_rows = layout.num_rows
        self.rows = rows or (0, layout.num_rows)  # the rows this module holds: all, or a rank's shard
        self.weight = nn.Parameter(torch.empty(self.rows[1] - self.rows[0], embed_dim + 1))
        self.register_buffer("cat_offsets", torch.tensor(layout.cat_offsets, dtype=torch.long))
        self.register_buffer("num_offsets", torch.tensor(layout.num_offsets, dtype=torch.long))
        self.register_buffer("multi_offsets", torch.tensor(layout.multi_offsets, dtype=torch.long))
        self.register_buffer("multi_combiners", torch.tensor([COMBINERS[c] for c in layout.multi_combiners],
                                                             dtype=torch.long))
        self.num_multi = len(layout.multi_fields)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the whole table's values block by block, in row order, keeping the rows this module holds.

        A shard thus gets exactly the values the one-process table has at those rows, and the generator ends
        in the same state (the DNN's initialisation that follows is the same too), without ever holding more
        than a block. Drawing into ``[rows, D + 1]`` views row by row gives the same stream as one draw over
        the whole table (torch draws element by element into a strided view); no block is a single row, whose
        view would be contiguous and drawn differently.
        """
        lo, hi, d, n = *self.rows, self.embed_dim, self.num_rows
        with torch.no_grad():
            self.weight[:, d].zero_()
            start = 0
            while start < n:
                end = min(start + INIT_BLOCK_ROWS, n)
                end = n if n - end == 1 else end
                block = torch.empty(end - start, d + 1)
                nn.init.normal_(block[:, :d], std=self.init_std)
                a, b = max(start, lo), min(end, hi)  # the part of this block that is ours (maybe none)
                if a < b:
                    self.weight[a - lo: b - lo, :d] = block[a - start: b - start, :d]
                start = end

    def forward(self, cat_ids: torch.Tensor, num_values: torch.Tensor, multi_ids: torch.Tensor,
                multi_weights: torch.Tensor, multi_bags: torch.Tensor, with_penalty: bool = False,
                rows_from: RowSource | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, square_excess, penalty = self.lookup(cat_ids, num_values, multi_ids, multi_weights, multi_bags,
                                                   with_penalty, rows_from)
        # split, not two slices: its backward is one concatenation instead of two zero-filled copies
        fields, linear = rows.split([self.embed_dim, 1], dim=-1)
        return fields, linear.squeeze(-1), square_excess, penalty

    def lookup(self, cat_ids: torch.Tensor, num_values: torch.Tensor, multi_ids: torch.Tensor,
               multi_weights: torch.Tensor, multi_bags: torch.Tensor, with_penalty: bool = False,
               rows_from: RowSource | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """As ``forward``, with each field's vector and first-order term still joined: ``rows [B, F, D + 1]``.
        ``rows_from``: where the rows come from when this module holds only a shard of the table (else its
        own ``weight``)."""
        d = self.embed_dim
        batch = cat_ids.shape[0]
        ids, values = self.single_ids(cat_ids, num_values)
        if self.num_multi:
            field_of_tag = torch.div(multi_bags, batch, rounding_mode="floor")
            rows, multi_rows = self._gather([ids, multi_ids + self.multi_offsets[field_of_tag]], rows_from)
        else:
            (rows,) = self._gather([ids], rows_from)  # [B, Fs, D+1]
        penalty = rows[..., :d].pow(2).sum() / max(batch, 1) if with_penalty else rows.new_zeros(())
        if values is not None:
            rows = rows * values.unsqueeze(-1)
        square_excess = None
        if self.num_multi:
            pooled, multi_square, multi_penalty = self._pool_multi(batch, multi_rows, multi_weights, multi_bags,
                                                                   field_of_tag, with_penalty)
            rows = torch.cat([rows, pooled], dim=1)
            square_excess = multi_square - pooled[..., :d].pow(2).sum(dim=1)
            penalty = penalty + multi_penalty
        return rows, square_excess, penalty

    def single_ids(self, cat_ids: torch.Tensor, num_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The single-valued fields' table rows ``[B, Fs]`` (categorical fields, then numeric ones: a numeric
        field's value row, or its missing row for NaN) and the value each row's vector is scaled by (None when
        there are no numeric fields: all 1)."""
        missing = torch.isnan(num_values)
        ids = torch.cat([cat_ids + self.cat_offsets, self.num_offsets + missing.long()], dim=1)
        if not num_values.shape[1]:
            return ids, None
        values = torch.cat([torch.ones_like(cat_ids, dtype=self.weight.dtype),
                            torch.where(missing, torch.ones_like(num_values), num_values)], dim=1)
        return ids, values

    def _gather(self, ids: list[torch.Tensor], rows_from: RowSource | None) -> list[torch.Tensor]:
        """The table rows of each id tensor: from this module's weight, or from ``rows_from`` when sharded."""
        if rows_from is not None:
            return rows_from(ids)
        return [F.embedding(i, self.weight, sparse=self.sparse) for i in ids]

    def _pool_multi(self, batch: int, rows: torch.Tensor, weights: torch.Tensor, bags: torch.Tensor,
                    field_of_tag: torch.Tensor, with_penalty: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # scatter_add with expanded indices rather than index_add: faster on CPU, and it exports to ONNX
        # correctly (index_add becomes a scatter that drops repeated indices)
        d, n_bags = self.embed_dim, self.num_multi * batch
        penalty = rows[:, :d].pow(2).sum() / max(batch, 1) if with_penalty else rows.new_zeros(())
        # combiner normalisation per bag: sum -> 1, mean -> sum(w), sqrtn -> sqrt(sum(w^2))
        zeros = torch.zeros(n_bags, dtype=weights.dtype, device=weights.device)
        w_sum = zeros.scatter_add(0, bags, weights)
        w2_sum = zeros.scatter_add(0, bags, weights * weights)
        combiner = self.multi_combiners.unsqueeze(1).expand(self.num_multi, batch).reshape(-1)  # [M*B]
        denom = torch.where(combiner == 1, w_sum, torch.where(combiner == 2, w2_sum.sqrt(),
                                                              torch.ones_like(w_sum)))
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        scaled = rows * (weights / denom[bags]).unsqueeze(-1)  # [nnz, D+1], c_j * (v_j, w_j)
        pooled = torch.zeros(n_bags, d + 1, dtype=rows.dtype, device=rows.device).scatter_add(
            0, bags.unsqueeze(1).expand(-1, d + 1), scaled)
        pooled = pooled.reshape(self.num_multi, batch, d + 1).transpose(0, 1)  # [B, M, D+1]
        row_of_tag = bags - field_of_tag * batch
        square = torch.zeros(batch, d, dtype=rows.dtype, device=rows.device).scatter_add(
            0, row_of_tag.unsqueeze(1).expand(-1, d), scaled[:, :d].pow(2))
        return pooled, square, penalty
