"""DeepFM (Guo et al., 2017): linear + FM + DNN over one shared embedding, plus a global bias -> logit.

    y = bias + linear(x) + fm(x) + dnn(x)                      head: "sum"      (the paper; default)
    y = bias + dense([w_f x_f]_f) + dense(bi(x)) + dnn(x)       head: "project"  (the seed note)

The default is the paper's plain sum: it keeps the FM a true factorization machine (the second-order
term is exactly sum_{i<j} <v_i, v_j> x_i x_j, comparable with published DeepFM results), and the seed's
projection adds only a per-field rescaling of first-order weights that the embedding can learn itself.
``project`` is kept for compatibility with models trained after the seed note.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm import native
from deepfm.config import ModelConfig
from deepfm.layout import TableLayout
from deepfm.model.dnn import DNN
from deepfm.model.embedding import FieldEmbedding, RowSource
from deepfm.model import paths
from deepfm.model.interaction import BiInteraction, fused_head


class DeepFM(nn.Module):
    """Inputs of a batch (``ModelInput.tensors()``) -> logits ``[B]``. Pure: no data, device or optimiser.

    ``logit_shift`` (``DataConfig.logit_shift``: log of the negative downsampling rate) is added by ``forward``,
    the scoring entry that evaluation, prediction, serving and export all go through, and not by
    ``forward_with_penalty``, which training calls: the model learns the click rate of its downsampled
    training rows and scores the calibrated one. It is a constant of the config, not a weight."""

    def __init__(self, layout: TableLayout, cfg: ModelConfig, *, sparse: bool = False,
                 logit_shift: float = 0.0, table_rows: tuple[int, int] | None = None) -> None:
        """``table_rows``: hold only these rows of the embedding table (a rank's shard under row sharding)."""
        super().__init__()
        self.cfg = cfg
        self.logit_shift = float(logit_shift)
        num_fields = layout.num_fields_total
        self.embedding = FieldEmbedding(layout, cfg.embed_dim, init_std=cfg.init_std, sparse=sparse,
                                        rows=table_rows)
        self.fm = BiInteraction()
        self.bias = nn.Parameter(torch.zeros(1))
        self.fuse = True  # the fused head where it applies (``paths.head_path``); False: the plain graph
        self.linear_proj = nn.Linear(num_fields, 1, bias=False) if cfg.head == "project" else None
        self.fm_proj = nn.Linear(cfg.embed_dim, 1, bias=False) if cfg.head == "project" else None
        self.dnn = DNN(num_fields * cfg.embed_dim, list(cfg.hidden_units), dropout=cfg.dropout,
                       batch_norm=cfg.batch_norm, init=cfg.dnn_init, init_std=cfg.dnn_init_std) if cfg.use_deep else None

    def forward_with_penalty(self, cat_ids: torch.Tensor, num_values: torch.Tensor, multi_ids: torch.Tensor,
                             multi_weights: torch.Tensor, multi_bags: torch.Tensor, with_penalty: bool = True,
                             rows_from: RowSource | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B]`` and the embedding L2 penalty of the rows this batch looked up (0 unless asked).
        ``rows_from``: where the table's rows come from when this model holds only a shard of it. Which path
        computes them: ``deepfm.model.paths``."""
        path = paths.head_path(self, num_values, with_penalty=with_penalty, sharded=rows_from is not None)
        if path is paths.Head.TABLE:
            return self._score_from_table(cat_ids, num_values), self.bias.new_zeros(())
        rows, square_excess, penalty = self.embedding.lookup(cat_ids, num_values, multi_ids, multi_weights,
                                                             multi_bags, with_penalty, rows_from)
        return self.head(rows, square_excess, path), penalty

    def head(self, rows: torch.Tensor, square_excess: torch.Tensor | None, path: paths.Head | None = None
             ) -> torch.Tensor:
        """Logits ``[B]`` (without ``logit_shift``) from the looked-up ``rows [B, F, D + 1]``: everything after the
        table, which the trainer hands to DDP while the table's rows and gradients travel their own way.
        ``path``: ``paths.head_path``'s choice when the caller has made it."""
        if (path or paths.head_path(self)) is paths.Head.FUSED:
            x, first_second = fused_head(rows, paths.compute_dtype(rows))
            if square_excess is not None:  # pooled multi-valued fields: their tags' own squares (FieldEmbedding)
                first_second = first_second - 0.5 * square_excess.sum(dim=1)
            return self.bias + first_second + self.dnn(x).float()  # type: ignore[misc]
        fields, linear = rows.split([self.cfg.embed_dim, 1], dim=-1)
        linear = linear.squeeze(-1)
        logit = self.bias.expand(fields.shape[0])
        if self.cfg.use_linear:
            logit = logit + (linear.sum(1) if self.linear_proj is None
                             else self.linear_proj(linear).squeeze(-1))
        if self.cfg.use_fm:
            bi = self.fm(fields, square_excess)
            logit = logit + (bi.sum(1) if self.fm_proj is None else self.fm_proj(bi).squeeze(-1))
        if self.dnn is not None:
            logit = logit + self.dnn(fields.flatten(1)).float()
        return logit

    def _score_from_table(self, cat_ids: torch.Tensor, num_values: torch.Tensor) -> torch.Tensor:
        """Logits of a scoring pass over single-valued fields, the fused head reading the embedding table
        directly (``native.head_gather_forward``): the looked-up rows, which only a backward needs, are never
        written."""
        emb = self.embedding
        x, first_second = native.head_gather_forward(emb.weight, *emb.single_ids(cat_ids, num_values),
                                                     paths.compute_dtype(emb.weight))
        return self.bias + first_second + self.dnn(x).float()  # type: ignore[misc]

    def forward(self, cat_ids: torch.Tensor, num_values: torch.Tensor, multi_ids: torch.Tensor,
                multi_weights: torch.Tensor, multi_bags: torch.Tensor, rows_from: RowSource | None = None
                ) -> torch.Tensor:
        logit = self.forward_with_penalty(cat_ids, num_values, multi_ids, multi_weights, multi_bags, False,
                                          rows_from)[0]
        return logit + self.logit_shift if self.logit_shift else logit
