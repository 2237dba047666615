"""The per-record engine: request-sized batches of plain Python values -> the same arrays as
``Encoder.transform``.

``Encoder.transform`` runs vectorised polars expressions, whose fixed cost per call (~ms for 39 fields)
dominates at batch 1 and is most of a 1,000-row request's encoding. ``RecordEncoder`` applies the same fitted
state through the same codecs (``deepfm.data.codecs``: each codec's ``record_*`` methods are its columnar
rule for one value, or for a column of them) column by column, in plain Python and, from ``_NUMPY_MIN_ROWS``
rows, numpy, where the server needs it for latency. Values must be plain: what a codec's ``request_value``
returns and its ``plain`` accepts (numbers or None for numeric fields, text or None for categorical ones,
``Multi`` cells for multi-valued ones). tests/test_codecs.py checks it array for array against
``Encoder.transform``, on a few rows and on request-sized columns.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm.data.codecs import MISSING, IdCodec
from deepfm.data.encoder import Encoder
from deepfm.data.hashing import bucketize


_NUMPY_MIN_ROWS = 32  # from this many rows numpy's fixed cost per call is worth paying (a ranking request)


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
        self._int_index: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def plain(self, rows: list[dict[str, Any]]) -> bool:
        """Whether every value of ``rows`` can take this engine (else the columnar one must)."""
        codecs = {c.name: c for c in self.encoder.codecs}
        return all(codecs[k].plain(v) for r in rows for k, v in r.items() if k in codecs)

    def plain_columns(self, columns: dict[str, list[Any]]) -> bool:
        """``plain`` of the same values held column by column (field -> values)."""
        codecs = {c.name: c for c in self.encoder.codecs}
        return all(codecs[k].plain_column(v) for k, v in columns.items() if k in codecs)

    def _ids(self, vocab: str, tokens: list[str]) -> np.ndarray:
        lookup = self.lookups[vocab]
        if isinstance(lookup, int):
            return bucketize(pa.array(tokens, pa.string()), lookup)
        return np.fromiter(map(lookup.get, tokens, repeat(0)), dtype=np.int64, count=len(tokens))

    def _int_ids(self, vocab: str, tokens: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """``_ids`` of integer tokens (``IdCodec.record_int_tokens``) through the vocabulary's tokens that are
        integer text, sorted: ``str(int)`` of a token is the only text it can have."""
        if vocab not in self._int_index:
            lookup = self.lookups[vocab]
            assert isinstance(lookup, dict)
            pairs = sorted((int(t), i) for t, i in lookup.items() if _is_int_text(t))
            self._int_index[vocab] = (np.array([k for k, _ in pairs], dtype=np.int64),
                                      np.array([i for _, i in pairs], dtype=np.int64), lookup.get(MISSING, 0))
        keys, ids, missing_id = self._int_index[vocab]
        out = np.zeros(len(tokens), dtype=np.int64)
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, tokens), len(keys) - 1)
            hit = keys[pos] == tokens
            out[hit] = ids[pos[hit]]
        out[missing] = missing_id
        return out

    def _column_ids(self, c: IdCodec, values: list[Any]) -> np.ndarray:
        vocab = str(c.vocab_name)
        if len(values) >= _NUMPY_MIN_ROWS and not isinstance(self.lookups[vocab], int):
            ints = c.record_int_tokens(values)
            if ints is not None:
                return self._int_ids(vocab, *ints)
        return self._ids(vocab, c.record_tokens(values))

    def encode(self, rows: list[dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """``(cat_ids int64 [N, Fc], num_values float32 [N, Fn], [(ids, weights, lengths)] per multi field)``."""
        return self.encode_columns(len(rows), {c.name: [r.get(c.name) for r in rows] for c in self.encoder.codecs})

    def encode_columns(self, n: int, columns: dict[str, list[Any]]
                       ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """``encode`` of ``n`` rows held column by column: field -> its ``n`` values (a field left out is
        missing in every row)."""
        enc = self.encoder
        absent = [None] * n
        cat = np.empty((n, len(enc.id_codecs)), dtype=np.int64)
        for j, c in enumerate(enc.id_codecs):
            cat[:, j] = self._column_ids(c, columns.get(c.name, absent))
        num = np.empty((n, len(enc.value_codecs)), dtype=np.float64)
        for j, vc in enumerate(enc.value_codecs):
            stats = self.stats.get(vc.name)
            num[:, j] = [vc.record_value(v, stats) for v in columns.get(vc.name, absent)]
        multi = []
        for bc in enc.bag_codecs:
            tags: list[str] = []
            weights: list[float] = []
            lengths = np.zeros(n, dtype=np.int64)
            for i, cell in enumerate(columns.get(bc.name, absent)):
                cell_tags, cell_weights = bc.record_bag(cell)
                tags += cell_tags
                weights += cell_weights
                lengths[i] = len(cell_tags)
            ids = self._ids(str(bc.vocab_name), tags) if tags else np.zeros(0, np.int64)
            multi.append((ids, np.asarray(weights, dtype=np.float64).astype(np.float32), lengths))
        return cat, num.astype(np.float32), multi


def _is_int_text(token: str) -> bool:
    """Whether ``token`` is ``str(i)`` of an int64 ``i`` (the only tokens an integer token can match)."""
    try:
        i = int(token)
    except ValueError:
        return False
    return str(i) == token and -(2 ** 63) <= i < 2 ** 63
