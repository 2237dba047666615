"""Warm start: a model trained further on new data (``deepfm train --init-from MODEL_DIR``).

The new model's vocabularies are the parent's grown by the new data (``deepfm.data.vocab``), so its embedding
table has the parent's rows for every token it kept, new rows for new tokens, and none for evicted ones. Every
kept row moves with its token, bitwise, together with its optimiser state (Adam moments / Adagrad accumulators);
a new row starts as a fresh model's rows do (the seeded initialisation, zero optimiser state). The dense layers
and their optimiser state carry over unchanged, since the fields and the model shape are the parent's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from deepfm.config import Config
from deepfm.data.vocab import Vocabulary, growth
from deepfm.errors import ConfigError
from deepfm.layout import TableLayout
from deepfm.model.embedding import TABLE_KEY, layout_buffer_keys

def check_compatible(parent: Config, child: Config) -> None:
    """The new config must describe the parent's model: the same fields (``min_count`` and ``max_size`` may
    change) and the same ``model`` section; data and training settings are free."""
    def fields(cfg: Config) -> list[dict]:
        return [f.model_dump(mode="json", exclude={"names", "min_count", "max_size"}) for f in cfg.fields]

    problems = []
    if fields(parent) != fields(child):
        problems.append("its fields differ from the parent model's (only min_count and max_size may change)")
    if parent.model != child.model:
        diff = sorted(k for k in type(child.model).model_fields
                      if getattr(parent.model, k) != getattr(child.model, k))
        problems.append(f"model settings differ from the parent's: {', '.join(diff)}")
    if problems:
        raise ConfigError("cannot train further from the parent model: " + "; ".join(problems)
                          + ". Use the parent's config (deepfm inspect PARENT shows it), changing only the data "
                            "and training settings")


def table_source(parent: TableLayout, child: TableLayout, parent_vocabs: dict[str, Vocabulary],
                 child_vocabs: dict[str, Vocabulary]) -> np.ndarray:
    """For each row of the child's table, the parent row it continues, or -1 for a new row (int64 [rows])."""
    source = np.full(child.num_rows, -1, dtype=np.int64)
    for name, (first, size) in child.vocab_blocks.items():
        rows = growth(parent_vocabs[name], child_vocabs[name]).source
        assert len(rows) == size, (name, len(rows), size)
        parent_first = parent.vocab_blocks[name][0]
        source[first:first + size] = np.where(rows >= 0, parent_first + rows, -1)
    for name, first in zip(child.num_fields, child.num_offsets, strict=True):
        parent_first = parent.num_offsets[parent.num_fields.index(name)]
        source[first:first + 2] = [parent_first, parent_first + 1]  # value row, missing row
    return source


def _moved(old: torch.Tensor, source: np.ndarray, fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` with the rows that continue a parent row replaced by that row of ``old``."""
    out = fresh.detach().clone()
    keep = torch.from_numpy(np.flatnonzero(source >= 0)).to(out.device)
    out[keep] = old.to(out.device, out.dtype)[torch.from_numpy(source[source >= 0]).to(out.device)]
    return out


def warm_start(model: nn.Module, parent_state: dict[str, torch.Tensor], source: np.ndarray) -> None:
    """Load the parent's weights into ``model`` (freshly initialised for the grown layout): table rows by
    ``source``, every other parameter and buffer (batch-norm statistics) as it is, except the embedding's
    layout buffers (field offsets), which describe the new table."""
    state = model.state_dict()
    layout_buffers = layout_buffer_keys(model)
    new = {}
    for name, tensor in state.items():
        if name in layout_buffers:
            new[name] = tensor
            continue
        if name not in parent_state:
            raise ConfigError(f"the parent model has no '{name}': it was built by another model shape")
        old = parent_state[name]
        if name == TABLE_KEY:
            new[name] = _moved(old, source, tensor)
        else:
            if old.shape != tensor.shape:
                raise ConfigError(f"the parent's '{name}' has shape {tuple(old.shape)}, this model "
                                  f"{tuple(tensor.shape)}")
            new[name] = old.to(tensor.device, tensor.dtype)
    model.load_state_dict(new)


def carry_optimizer_state(optimizers: list[torch.optim.Optimizer], parent_states: list[dict[str, Any]],
                          table: torch.Tensor, source: np.ndarray, parent_rows: int) -> None:
    """Load the parent's optimiser states, moving the table's per-row state with its rows (zeros for new rows:
    a fresh row's state)."""
    if len(parent_states) != len(optimizers):
        raise ConfigError(f"the parent saved {len(parent_states)} optimiser state(s), this run builds "
                          f"{len(optimizers)}: train with the parent's optimiser settings, or --reset-optimizer")
    for opt, saved in zip(optimizers, parent_states, strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        state = {int(k): dict(v) for k, v in saved["state"].items()}
        for index, p in enumerate(params):
            if p is not table or index not in state:
                continue
            for key, value in state[index].items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == parent_rows:
                    state[index][key] = _moved(value, source, torch.zeros_like(table, dtype=value.dtype))
        # the parent's per-parameter state, this run's hyperparameters (lr, betas, ...)
        groups = [{**old, **{k: v for k, v in new.items() if k != "params"}}
                  for old, new in zip(saved["param_groups"], opt.param_groups, strict=True)]
        opt.load_state_dict({"state": state, "param_groups": groups})
