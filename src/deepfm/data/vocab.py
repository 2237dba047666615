"""Vocabularies: raw category strings -> integer ids, fitted on the training split only.

Id 0 is reserved for values never seen in training (or seen fewer than ``min_count`` times). Known values get
ids 1..n ordered by descending training count (ties by value), so the fitted vocabulary is deterministic.
A vocabulary with ``hash_buckets`` set is not fitted: ``id = fnv1a64(value) % hash_buckets``.
A missing cell is the empty string, a token like any other: it gets its own id when it is frequent enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from deepfm.data.hashing import bucketize

OOV_ID = 0


@dataclass
class Vocabulary:
    name: str
    min_count: int = 1
    hash_buckets: int | None = None
    tokens: list[str] = field(default_factory=list)  # tokens[i] has id i + 1
    _lookup: pl.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Rows this vocabulary needs in the embedding table (OOV row included)."""
        return self.hash_buckets if self.hash_buckets else len(self.tokens) + 1

    def encode(self, values: pl.Series) -> np.ndarray:
        """Ids (int64 ``[N]``) of string values; nulls are treated as the empty (missing) token."""
        values = values.cast(pl.Utf8).fill_null("")
        if self.hash_buckets:
            return bucketize(values.to_arrow(), self.hash_buckets)
        return values.to_frame("t").select(self.lookup_expr(pl.col("t")))["t"].to_numpy()

    def lookup_expr(self, tokens: pl.Expr) -> pl.Expr:
        """Polars expression: token text -> id (Int64); unseen -> ``OOV_ID``. Not for hashed vocabularies."""
        if self.hash_buckets:
            raise ValueError("hashed vocabularies are encoded with encode(), not an expression")
        lookup = self._table()
        return tokens.replace_strict(lookup["token"], lookup["id"], default=OOV_ID, return_dtype=pl.Int64)

    def _table(self) -> pl.DataFrame:
        if self._lookup is None:
            self._lookup = pl.DataFrame({
                "token": pl.Series(self.tokens, dtype=pl.Utf8),
                "id": pl.Series(np.arange(1, len(self.tokens) + 1), dtype=pl.Int64),
            })
        return self._lookup

    def to_json(self) -> dict:
        return {"min_count": self.min_count, "hash_buckets": self.hash_buckets, "tokens": self.tokens}

    @classmethod
    def from_json(cls, name: str, obj: dict) -> Vocabulary:
        return cls(name=name, min_count=int(obj["min_count"]), hash_buckets=obj["hash_buckets"],
                   tokens=[str(t) for t in obj["tokens"]])


class VocabularyCounter:
    """Streams training values in and counts them; ``build`` applies the min count."""

    def __init__(self, name: str, min_count: int, hash_buckets: int | None) -> None:
        self.name, self.min_count, self.hash_buckets = name, min_count, hash_buckets
        self._partials: list[pl.DataFrame] = []

    def update(self, values: pl.Series) -> None:
        if self.hash_buckets:
            return
        counts = (values.cast(pl.Utf8).fill_null("").rename("token").to_frame()
                  .group_by("token").agg(pl.len().cast(pl.Int64).alias("count")))
        self._partials.append(counts)
        if len(self._partials) >= 16:  # keep memory bounded on long files
            self._partials = [self._merged()]

    def add_counts(self, tokens: pl.Series, counts: np.ndarray) -> None:
        """Add counts already made elsewhere: ``counts[i]`` occurrences of ``tokens[i]`` (tokens distinct)."""
        if self.hash_buckets:
            return
        self._partials.append(pl.DataFrame({"token": tokens.cast(pl.Utf8), "count": counts.astype(np.int64)}))
        if len(self._partials) >= 16:
            self._partials = [self._merged()]

    def _merged(self) -> pl.DataFrame:
        if not self._partials:
            return pl.DataFrame({"token": [], "count": []}, schema={"token": pl.Utf8, "count": pl.Int64})
        return pl.concat(self._partials).group_by("token").agg(pl.col("count").sum())

    def build(self) -> Vocabulary:
        if self.hash_buckets:
            return Vocabulary(self.name, self.min_count, self.hash_buckets)
        kept = (self._merged().filter(pl.col("count") >= self.min_count)
                .sort(["count", "token"], descending=[True, False]))
        return Vocabulary(self.name, self.min_count, None, kept["token"].to_list())
