"""The per-record engine: a few rows of plain Python values -> the same arrays as ``Encoder.transform``.

``Encoder.transform`` runs vectorised polars expressions, whose fixed cost per call (~ms for 39 fields)
dominates at batch 1. ``RecordEncoder`` applies the same fitted state through the same codecs
(``deepfm.data.codecs``: each codec's ``record_*`` method is its columnar rule for one value) in plain Python,
where the server needs it for latency. Values must be plain: what a codec's ``request_value`` returns and its
``plain`` accepts (numbers or None for numeric fields, text or None for categorical ones, ``Multi`` cells for
multi-valued ones). tests/test_codecs.py checks it array for array against ``Encoder.transform``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from deepfm.data.encoder import Encoder
from deepfm.data.hashing import bucketize


class RecordEncoder:
    """``Encoder.transform`` for a few rows of plain values (see the module docstring)."""

    def __init__(self, encoder: Encoder) -> None:
        vocabs, self.stats = encoder.fitted_state()
        self.encoder = encoder
        self.lookups: dict[str, dict[str, int] | int] = {}
        for c in encoder.id_codecs + encoder.bag_codecs:
            name = str(c.vocab_name)
            if name not in self.lookups:
                v = vocabs[name]
                self.lookups[name] = v.hash_buckets if v.hash_buckets else {t: i + 1 for i, t in enumerate(v.tokens)}

    def plain(self, rows: list[dict[str, Any]]) -> bool:
        """Whether every value of ``rows`` can take this engine (else the columnar one must)."""
        codecs = {c.name: c for c in self.encoder.codecs}
        return all(codecs[k].plain(v) for r in rows for k, v in r.items() if k in codecs)

    def _ids(self, vocab: str, tokens: list[str]) -> np.ndarray:
        lookup = self.lookups[vocab]
        if isinstance(lookup, int):
            return bucketize(pa.array(tokens, pa.string()), lookup)
        return np.fromiter((lookup.get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def encode(self, rows: list[dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """``(cat_ids int64 [N, Fc], num_values float32 [N, Fn], [(ids, weights, lengths)] per multi field)``."""
        enc = self.encoder
        n = len(rows)
        cat = np.empty((n, len(enc.id_codecs)), dtype=np.int64)
        for j, c in enumerate(enc.id_codecs):
            cat[:, j] = self._ids(str(c.vocab_name), [c.record_token(r.get(c.name)) for r in rows])
        num = np.empty((n, len(enc.value_codecs)), dtype=np.float64)
        for j, vc in enumerate(enc.value_codecs):
            stats = self.stats.get(vc.name)
            num[:, j] = [vc.record_value(r.get(vc.name), stats) for r in rows]
        multi = []
        for bc in enc.bag_codecs:
            tags: list[str] = []
            weights: list[float] = []
            lengths = np.zeros(n, dtype=np.int64)
            for i, r in enumerate(rows):
                cell_tags, cell_weights = bc.record_bag(r.get(bc.name))
                tags += cell_tags
                weights += cell_weights
                lengths[i] = len(cell_tags)
            ids = self._ids(str(bc.vocab_name), tags) if tags else np.zeros(0, np.int64)
            multi.append((ids, np.asarray(weights, dtype=np.float64).astype(np.float32), lengths))
        return cat, num.astype(np.float32), multi
