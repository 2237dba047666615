"""The encoder's per-record path: a few rows of plain Python values -> the same arrays as ``Encoder.transform``.

``Encoder.transform`` runs vectorised polars expressions, whose fixed cost per call (~ms for 39 fields)
dominates at batch 1. ``RecordEncoder`` applies the same fitted state (vocabularies, numeric statistics,
log buckets, ``log1p``, ``max_len``) in plain Python for a handful of rows, where the server needs it for
latency. Values must already be plain: numbers (or None) for numeric fields, text (or None) for categorical
fields, ``(tags, weights)`` for multi-valued fields. tests/test_serve.py checks it array for array against
``Encoder.transform``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm.data.encoder import MISSING, Encoder
from deepfm.data.hashing import bucketize


def log_bucket_token(v: float) -> str:
    """``floor(ln(x)^2)`` for ``x > 2``, else ``int(x)``, as text: one value of the encoder's ``_bucket_expr``."""
    b = math.floor(math.log(v) ** 2) if v > 2 else v
    if not math.isfinite(b) or not (-(2.0 ** 63) <= b < 2.0 ** 63):
        return MISSING
    return str(int(b))


class RecordEncoder:
    """``Encoder.transform`` for a few rows of plain values (see the module docstring)."""

    def __init__(self, encoder: Encoder) -> None:
        vocabs, stats = encoder.fitted_state()
        self.cat_fields = list(encoder.cat_fields)
        self.num_fields = list(encoder.num_fields)
        self.multi_fields = list(encoder.multi_fields)
        self.lookups: dict[str, dict[str, int] | int] = {}
        for f in self.cat_fields + self.multi_fields:
            v = vocabs[f.vocab_name]
            if f.vocab_name not in self.lookups:
                self.lookups[f.vocab_name] = v.hash_buckets if v.hash_buckets else \
                    {t: i + 1 for i, t in enumerate(v.tokens)}
        self.stats = {name: (s.mean, s.std) for name, s in stats.items()}

    def _ids(self, vocab: str, tokens: list[str]) -> np.ndarray:
        lookup = self.lookups[vocab]
        if isinstance(lookup, int):
            return bucketize(pa.array(tokens, pa.string()), lookup)
        return np.fromiter((lookup.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def encode(self, rows: list[dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """``(cat_ids int64 [N, Fc], num_values float32 [N, Fn], [(ids, weights, lengths)] per multi field)``."""
        n = len(rows)
        cat = np.empty((n, len(self.cat_fields)), dtype=np.int64)
        for j, f in enumerate(self.cat_fields):
            name = str(f.name)
            if f.kind == "numeric":  # log_bucket
                tokens = []
                for r in rows:
                    v = r.get(name)
                    if v is None:
                        tokens.append(MISSING)
                        continue
                    if f.log1p:
                        v = math.log(max(v, 0.0) + 1.0)
                    tokens.append(log_bucket_token(v))
            else:
                tokens = [r.get(name) or MISSING for r in rows]
            cat[:, j] = self._ids(f.vocab_name, tokens)
        num = np.empty((n, len(self.num_fields)), dtype=np.float64)
        for j, f in enumerate(self.num_fields):
            name = str(f.name)
            for i, r in enumerate(rows):
                v = r.get(name)
                if v is None:
                    num[i, j] = math.nan
                    continue
                if f.log1p:
                    v = math.log(max(v, 0.0) + 1.0)
                if f.numeric == "standardize":
                    mean, std = self.stats[name]
                    v = (v - mean) / std
                num[i, j] = v
        multi = []
        for f in self.multi_fields:
            name = str(f.name)
            tags: list[str] = []
            weights: list[float] = []
            lengths = np.zeros(n, dtype=np.int64)
            for i, r in enumerate(rows):
                cell = r.get(name)
                if cell is None:
                    continue
                cell_tags, cell_weights = cell
                k = len(cell_tags) if f.max_len is None else min(len(cell_tags), f.max_len)
                tags += list(cell_tags[:k])
                weights += list(cell_weights[:k])
                lengths[i] = k
            ids = self._ids(f.vocab_name, tags) if tags else np.zeros(0, np.int64)
            multi.append((ids, np.asarray(weights, dtype=np.float64).astype(np.float32), lengths))
        return cat, num.astype(np.float32), multi
