"""Where each field lives in the one shared embedding table.

Every vocabulary owns a block of rows; fields that share a vocabulary point at the same block. A scaled
numeric field owns two rows: its value row (multiplied by the value) and a row used when the value is
missing. The model adds a field's offset to its local ids, so all single-valued fields are looked up in
one gather.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TableLayout:
    num_rows: int
    cat_fields: tuple[str, ...]
    cat_offsets: tuple[int, ...]
    num_fields: tuple[str, ...]
    num_offsets: tuple[int, ...]
    multi_fields: tuple[str, ...]
    multi_offsets: tuple[int, ...]
    multi_combiners: tuple[str, ...]
    vocab_blocks: dict[str, tuple[int, int]]  # vocab name -> (first row, rows)

    @property
    def num_single(self) -> int:
        return len(self.cat_fields) + len(self.num_fields)

    @property
    def num_fields_total(self) -> int:
        """F: the number of field vectors the FM and the DNN see."""
        return self.num_single + len(self.multi_fields)

    @property
    def field_order(self) -> tuple[str, ...]:
        """The order of fields along the ``F`` axis of ``[B, F, D]``."""
        return self.cat_fields + self.num_fields + self.multi_fields

    def to_json(self) -> dict:
        d = asdict(self)
        d["vocab_blocks"] = {k: list(v) for k, v in self.vocab_blocks.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> TableLayout:
        tuples = {k: tuple(v) for k, v in d.items() if k != "vocab_blocks" and isinstance(v, list)}
        return cls(num_rows=int(d["num_rows"]), **tuples,  # type: ignore[arg-type]
                   vocab_blocks={k: (int(v[0]), int(v[1])) for k, v in d["vocab_blocks"].items()})


def rows_per_rank(n: int, world_size: int) -> int:
    """How many of ``n`` rows each of ``world_size`` ranks gets when they are cut into contiguous shares in rank
    order (the last share may be shorter, or empty): the one rule for the table's row shards, a split's
    evaluation shards and a batch's parts."""
    return -(-n // world_size)


def rank_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` rows (see ``rows_per_rank``)."""
    per = rows_per_rank(n, world_size)
    return min(rank * per, n), min((rank + 1) * per, n)
