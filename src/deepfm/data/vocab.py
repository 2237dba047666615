"""Vocabularies: raw category strings -> integer ids, fitted on the training split only.

Id 0 is reserved for values never seen in training (or seen fewer than ``min_count`` times). Known values get
ids 1..n ordered by descending training count (ties by value), so the fitted vocabulary is deterministic.
A vocabulary with ``hash_buckets`` set is not fitted: ``id = fnv1a64(value) % hash_buckets``.
A missing cell is the empty string, a token like any other: it gets its own id when it is frequent enough.

Vocabularies grow when a model is trained further on new data (``deepfm train --init-from``): every known token
keeps its id, tokens of the new data that pass ``min_count`` *on the new data* get the next ids, in the same
order as a fresh fit. Each token remembers the generation (training run) that last saw it and its count there,
so that a capped vocabulary (``max_size``) evicts the least recently seen tokens first (then the least
frequent): an evicted token maps to the OOV id from then on, and the ids after it close up (``Growth.source``
says where each row came from, so the model moves the rows, and their optimiser state, with their tokens).
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
    counts: list[int] | None = None  # counts[i]: tokens[i]'s count in the generation that last saw it
    last_seen: list[int] | None = None  # the generation (0 = first fit) that last saw tokens[i]
    generation: int = 0
    max_size: int | None = None
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
        out = {"min_count": self.min_count, "hash_buckets": self.hash_buckets, "tokens": self.tokens,
               "generation": self.generation, "max_size": self.max_size}
        if self.counts is not None and self.last_seen is not None:
            out.update(counts=self.counts, last_seen=self.last_seen)
        return out

    @classmethod
    def from_json(cls, name: str, obj: dict) -> Vocabulary:
        tokens = [str(t) for t in obj["tokens"]]
        counts, last_seen = obj.get("counts"), obj.get("last_seen")
        if counts is not None and (len(counts) != len(tokens) or len(last_seen or []) != len(tokens)):
            raise ValueError(f"vocabulary '{name}': counts / last_seen do not match its {len(tokens)} tokens")
        return cls(name=name, min_count=int(obj["min_count"]), hash_buckets=obj["hash_buckets"], tokens=tokens,
                   counts=counts, last_seen=last_seen,  # JSON integers already
                   generation=int(obj.get("generation", 0)), max_size=obj.get("max_size"))


@dataclass(frozen=True)
class Growth:
    """How a grown vocabulary relates to its parent: ``source[i]`` is the parent id of child id ``i`` (id 0,
    OOV, comes from the parent's OOV row), or -1 for a new token; ``added`` new tokens, ``evicted`` dropped."""

    source: np.ndarray  # int64 [child size]
    added: int
    evicted: int


class VocabularyCounter:
    """Streams training values in and counts them; ``build`` applies the min count."""

    def __init__(self, name: str, min_count: int, hash_buckets: int | None, max_size: int | None = None) -> None:
        self.name, self.min_count, self.hash_buckets, self.max_size = name, min_count, hash_buckets, max_size
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

    def counts(self) -> pl.DataFrame:
        """The counts so far, one row per distinct token (what ranks exchange to merge their counters)."""
        return self._merged()

    def _merged(self) -> pl.DataFrame:
        if not self._partials:
            return pl.DataFrame({"token": [], "count": []}, schema={"token": pl.Utf8, "count": pl.Int64})
        return pl.concat(self._partials).group_by("token").agg(pl.col("count").sum())

    def build(self) -> Vocabulary:
        """A fresh vocabulary: tokens seen at least ``min_count`` times, the ``max_size`` most frequent."""
        if self.hash_buckets:
            return Vocabulary(self.name, self.min_count, self.hash_buckets)
        kept = (self._merged().filter(pl.col("count") >= self.min_count)
                .sort(["count", "token"], descending=[True, False]))
        if self.max_size is not None:
            kept = kept.head(self.max_size)
        return Vocabulary(self.name, self.min_count, None, kept["token"].to_list(), kept["count"].to_list(),
                          [0] * kept.height, 0, self.max_size)

    def grow(self, parent: Vocabulary) -> Vocabulary:
        """``parent`` grown by the counted (new) data: see the module docstring."""
        if self.hash_buckets or parent.hash_buckets:
            if parent.hash_buckets != self.hash_buckets:
                raise ValueError(f"vocabulary '{self.name}': hash_buckets changed from {parent.hash_buckets} to "
                                 f"{self.hash_buckets}; a model cannot be trained further across that change")
            return parent
        gen = parent.generation + 1
        n_old = len(parent.tokens)
        old = pl.DataFrame({
            "token": pl.Series(parent.tokens, dtype=pl.Utf8),
            "old_id": pl.Series(np.arange(1, n_old + 1), dtype=pl.Int64),
            "old_count": pl.Series(parent.counts if parent.counts is not None else [0] * n_old, dtype=pl.Int64),
            "old_seen": pl.Series(parent.last_seen if parent.last_seen is not None else [0] * n_old,
                                  dtype=pl.Int64)})
        seen = self._merged()
        known = old.join(seen, on="token", how="left", maintain_order="left").with_columns(
            pl.when(pl.col("count").is_not_null()).then(pl.col("count")).otherwise(pl.col("old_count")).alias("c"),
            pl.when(pl.col("count").is_not_null()).then(pl.lit(gen)).otherwise(pl.col("old_seen")).alias("g"))
        new = (seen.join(old.select("token"), on="token", how="anti").filter(pl.col("count") >= self.min_count)
               .sort(["count", "token"], descending=[True, False])
               .select("token", pl.lit(-1, pl.Int64).alias("old_id"), pl.col("count").alias("c"),
                       pl.lit(gen, pl.Int64).alias("g")))
        merged = pl.concat([known.select("token", "old_id", "c", "g"), new]).with_row_index("pos")
        if self.max_size is not None and merged.height > self.max_size:
            # least recently seen first, then least frequent, then the newest id: dropped until it fits
            drop = merged.sort(["g", "c", "pos"], descending=[False, False, True]).head(merged.height - self.max_size)
            merged = merged.filter(~pl.col("pos").is_in(drop["pos"].implode()))
        return Vocabulary(self.name, self.min_count, None, merged["token"].to_list(), merged["c"].to_list(),
                          merged["g"].to_list(), gen, self.max_size)


def growth(parent: Vocabulary, child: Vocabulary) -> Growth:
    """Where each id of ``child`` (a grown ``parent``) came from: matched by token, so it holds for any two
    vocabularies of one name (a hashed one maps to itself)."""
    if child.hash_buckets:
        return Growth(np.arange(child.size, dtype=np.int64), 0, 0)
    old = pl.DataFrame({"token": pl.Series(parent.tokens, dtype=pl.Utf8),
                        "old_id": pl.Series(np.arange(1, len(parent.tokens) + 1), dtype=pl.Int64)})
    new = pl.DataFrame({"token": pl.Series(child.tokens, dtype=pl.Utf8)})
    src = new.join(old, on="token", how="left", maintain_order="left")["old_id"].fill_null(-1).to_numpy()
    source = np.concatenate([[0], src]).astype(np.int64)
    kept = int((source[1:] >= 0).sum())
    return Growth(source, int((source < 0).sum()), len(parent.tokens) - kept)
