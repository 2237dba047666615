"""Multi-valued fields: weighted tags in one cell (``tag^weight|tag^weight``), one bag per row."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import polars as pl

from deepfm.config import MultiField
from deepfm.data.codecs.base import Codec
from deepfm.data.codecs.values import MISSING, NUMBER_SCHEMA, is_number, number_problem, type_name
from deepfm.errors import DataError


class Multi:
    """A validated multi-valued request cell given as a list: tags (text) and weights (float)."""

    __slots__ = ("tags", "weights", "weighted")

    def __init__(self, tags: list[str], weights: list[float], weighted: bool) -> None:
        self.tags, self.weights, self.weighted = tags, weights, weighted


def _tag_text(t: Any) -> str | None:
    if isinstance(t, str):
        return t
    if isinstance(t, int) and not isinstance(t, bool):
        try:
            return str(t)
        except ValueError:
            return None
    return None


class MultiCodec(Codec):
    """Tags with weights, pooled by the combiner (the model's job): ``a:1.0^b:0.5`` as text (weights default
    to 1), or a list column of tags or of (tag, weight) structs. ``max_len`` keeps the first tags of a cell."""

    slot = "bag"
    source = "text"
    text_form = True  # 'a:1.0^b'
    spec: MultiField

    def long_form(self, col: pl.Series, sep: str, wsep: str, path: str, lines: np.ndarray
                  ) -> tuple[np.ndarray, pl.Series, np.ndarray]:
        """The cells of ``col`` as (row index int64 [nnz], tags, weights float64 [nnz]); a weight that is not a
        number is a ``DataError`` naming ``path`` and the line."""
        if col.dtype == pl.Null:  # a column of missing cells only (e.g. all-null Parquet): no tags
            col = col.cast(pl.Utf8)
        frame = pl.DataFrame({"cell": col, "row": np.arange(len(col), dtype=np.int64)})
        if col.dtype == pl.Utf8:
            long = (frame.with_columns(pl.col("cell").fill_null("").str.split(sep)).explode("cell")
                    .filter(pl.col("cell").is_not_null() & (pl.col("cell") != "")))
            # "tag:w" splits at the last weight separator; a piece without one has weight 1
            cell = pl.col("cell")
            if (long.select(cell.str.count_matches(wsep, literal=True).max()).item() or 0) <= 1:
                parts = cell.str.split_exact(wsep, 1)  # at most one separator: no regex needed
                tag, wtxt = parts.struct.field("field_0"), parts.struct.field("field_1").fill_null("1")
            else:
                pattern = f"(?s)^(.*){re.escape(wsep)}([^{re.escape(wsep)}]*)$"  # (?s): a tag may hold a newline
                has_w = cell.str.contains(wsep, literal=True)
                tag = pl.when(has_w).then(cell.str.extract(pattern, 1)).otherwise(cell)
                wtxt = pl.when(has_w).then(cell.str.extract(pattern, 2)).otherwise(pl.lit("1"))
            long = long.select("row", tag.alias("tag"), wtxt.alias("wtxt"))
            long = long.with_columns(pl.col("wtxt").cast(pl.Float64, strict=False).alias("w"))
            bad = long.filter(pl.col("w").is_null() | pl.col("w").is_nan())
            if bad.height:
                r = bad.row(0, named=True)
                raise DataError(f"weight '{r['wtxt']}' of tag '{r['tag']}' is not a number",
                                path=path, line=int(lines[r["row"]]), field=self.name)
        elif isinstance(col.dtype, pl.List):
            long = frame.explode("cell").filter(pl.col("cell").is_not_null())
            inner = col.dtype.inner
            if isinstance(inner, pl.Struct):
                names = [fld.name for fld in inner.fields]
                if len(names) != 2:
                    raise DataError("a list-of-struct multi-valued column needs two fields (tag, weight)",
                                    path=path, field=self.name)
                long = long.select("row", pl.col("cell").struct.field(names[0]).cast(pl.Utf8).alias("tag"),
                                   pl.col("cell").struct.field(names[1]).cast(pl.Float64).alias("w"))
            else:
                long = long.select("row", pl.col("cell").cast(pl.Utf8).alias("tag"), pl.lit(1.0).alias("w"))
        else:
            raise DataError(f"a multi-valued field needs a text or list column, found {col.dtype}",
                            path=path, field=self.name)
        rows = long["row"].to_numpy().astype(np.int64)
        tags, weights = long["tag"].fill_null(MISSING), long["w"].to_numpy().astype(np.float64)
        if self.spec.max_len is not None and len(rows):
            # rows ascend: a tag's rank within its cell is its position minus the cell's first position
            first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
            rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
            keep = rank < self.spec.max_len
            rows, tags, weights = rows[keep], tags.filter(pl.Series(keep)), weights[keep]
        return rows, tags, weights

    def record_bag(self, cell: Multi | None) -> tuple[list[str], list[float]]:
        """``long_form`` of one list cell: its first ``max_len`` tags and their weights."""
        if cell is None:
            return [], []
        k = len(cell.tags) if self.spec.max_len is None else min(len(cell.tags), self.spec.max_len)
        return list(cell.tags[:k]), list(cell.weights[:k])

    def request_value(self, v: Any) -> tuple[Any, str | None]:
        if isinstance(v, str):
            return v, None
        if not isinstance(v, list):
            return None, ("a multi-valued field takes a list of tags, a list of [tag, weight] pairs or the "
                          f"text form 'a:1.0^b', got {type_name(v)}")
        tags: list[str] = []
        weights: list[float] = []
        weighted = False
        for j, item in enumerate(v):
            if isinstance(item, list):
                if len(item) != 2:
                    return None, f"item {j}: a [tag, weight] pair needs exactly 2 elements, got {len(item)}"
                tag, w = _tag_text(item[0]), item[1]
                if tag is None:
                    return None, f"item {j}: the tag must be a string, got {type_name(item[0])}"
                if not is_number(w):
                    return None, f"item {j}: the weight of tag {tag!r} must be a number, got {type_name(w)}"
                problem = number_problem(w)
                if problem:
                    return None, f"item {j}: the weight of tag {tag!r}: {problem}"
                tags.append(tag)
                weights.append(float(w))
                weighted = True
            else:
                tag = _tag_text(item)
                if tag is None:
                    return None, f"item {j}: a tag must be a string (or a [tag, weight] pair), got {type_name(item)}"
                tags.append(tag)
                weights.append(1.0)
        return Multi(tags, weights, weighted), None

    def request_schema(self) -> dict[str, Any]:
        tag = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
        pair = {"type": "array", "prefixItems": [tag, NUMBER_SCHEMA], "minItems": 2, "maxItems": 2}
        return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [*tag["anyOf"], pair]}},
                          {"type": "null"}],
                "description": "tags: a list of tags or [tag, weight] pairs, or the text form 'a:1.0^b'"}

    def request_column(self, values: list[Any], sep: str, wsep: str) -> tuple[pl.Series, list[tuple[int, str]]]:
        problems: list[tuple[int, str]] = []
        if any(isinstance(v, str) for v in values):  # text form somewhere: write list cells as text too
            cells: list[str | None] = []
            for i, v in enumerate(values):
                if isinstance(v, Multi):
                    bad = [t for t in v.tags if sep in t]
                    if bad:
                        problems.append((i, f"tag {bad[0]!r} contains the separator {sep!r}: when other rows "
                                            "use the text form, send tags without it"))
                    cells.append(sep.join(f"{t}{wsep}{w!r}" for t, w in zip(v.tags, v.weights)))
                else:
                    cells.append(v)
            return pl.Series(self.name, cells, dtype=pl.Utf8), problems
        if any(isinstance(v, Multi) and v.weighted for v in values):
            dtype = pl.List(pl.Struct({"tag": pl.Utf8, "weight": pl.Float64}))
            return pl.Series(self.name, [None if v is None else [{"tag": t, "weight": w}
                                                                 for t, w in zip(v.tags, v.weights)]
                                         for v in values], dtype=dtype), problems
        return pl.Series(self.name, [None if v is None else v.tags for v in values], dtype=pl.List(pl.Utf8)), problems

    def _describe(self) -> dict[str, Any]:
        return {"combiner": self.spec.combiner, "max_len": self.spec.max_len}


