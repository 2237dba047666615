"""The sparse text formats: libffm (``label field:index:value ...``) and libsvm (``label index:value ...``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from deepfm.config import DataConfig
from deepfm.data import sources
from deepfm.data.readers.base import BadRows, RawChunk
from deepfm.data.readers.delimited import BLOCK_BYTES
from deepfm.data.readers.text import decodes_as, not_text, shown
from deepfm.errors import DataError


def read_sparse_lines(path: str, data: DataConfig, bad: BadRows | None) -> Iterator[RawChunk]:
    """libffm (``label field:index:value ...``) and libsvm (``label index:value ...``).

    Each libffm field becomes one multi-valued column named ``data.columns[field]`` (or ``f<field>``) whose
    cell is ``index:value^index:value``; libsvm has a single such column, ``data.columns[0]`` or
    ``features``. The label column is named ``data.label``.
    """
    names = data.column_names or []
    sep, wsep = data.multi_value_separator, data.weight_separator
    line_no = 0
    row_start = 0
    emitted = False
    with sources.open_binary(path) as fh:
        while True:
            raw_lines = fh.readlines(BLOCK_BYTES)
            if not raw_lines:
                break
            numbers = np.arange(line_no + 1, line_no + len(raw_lines) + 1, dtype=np.int64)
            line_no += len(raw_lines)
            texts, numbers = _decode_lines(path, raw_lines, numbers, data, names, bad)
            lines = pl.Series("text", texts, dtype=pl.Utf8).str.strip_chars("\r\n ")
            keep = (lines != "").to_numpy()
            lines, numbers = lines.filter(pl.Series(keep)), numbers[keep]
            frame = _parse_sparse(path, lines, numbers, data, names, sep, wsep, bad)
            if frame is None:
                continue
            emitted = True
            yield RawChunk(path, frame[0], frame[1], row_start, absent_is_missing=True)
            row_start += frame[0].height
    if not emitted:
        raise DataError("file has no data rows", path=path)


def _decode_lines(path: str, raw: list[bytes], numbers: np.ndarray, data: DataConfig, names: list[str],
                  bad: BadRows | None) -> tuple[list[str], np.ndarray]:
    """Lines of a libffm/libsvm file as text; a line that does not decode names its line and field."""
    enc = data.encoding
    try:
        return [line.decode(enc) for line in raw], numbers
    except UnicodeDecodeError:
        pass
    texts, kept = [], []
    for k, line in enumerate(raw):
        try:
            texts.append(line.decode(enc))
            kept.append(k)
            continue
        except UnicodeDecodeError:
            pass
        tokens = line.split()
        j = next(j for j, t in enumerate(tokens) if not decodes_as(t, enc))
        if j == 0:
            name = data.label
        elif data.format == "libffm":
            fid = tokens[j].split(b":")[0].decode(enc, "replace")
            name = names[int(fid)] if fid.isdigit() and int(fid) < len(names) else f"f{fid}"
        else:
            name = names[0] if names else "features"
        reason = not_text(shown(tokens[j], enc), enc)
        if bad is None:
            raise DataError(reason, path=path, line=int(numbers[k]), field=name)
        bad.add(path, int(numbers[k]), f"field '{name}': {reason}", shown(line, enc))
    return texts, numbers[kept]


def _parse_sparse(path: str, lines: pl.Series, numbers: np.ndarray, data: DataConfig, names: list[str],
                  sep: str, wsep: str, bad: BadRows | None) -> tuple[pl.DataFrame, np.ndarray] | None:
    ffm = data.format == "libffm"
    df = pl.DataFrame({"text": lines, "_line": numbers, "_row": np.arange(len(lines))})
    parts = df.with_columns(pl.col("text").str.split(" ").alias("tok")).drop("text")
    labels = parts.select(pl.col("tok").list.first().alias(data.label), "_line", "_row")
    long = (parts.with_columns(pl.col("tok").list.slice(1)).explode("tok")
            .filter(pl.col("tok").is_not_null() & (pl.col("tok") != "")))
    pieces = long.with_columns(pl.col("tok").str.split(":").alias("p"))
    expected = 3 if ffm else 2
    wrong = pieces.filter(pl.col("p").list.len() != expected)
    if wrong.height:
        first_bad = wrong.row(0, named=True)
        reason = f"expected {'field:index:value' if ffm else 'index:value'}, found '{first_bad['tok']}'"
        if bad is None:
            raise DataError(reason, path=path, line=int(first_bad["_line"]))
        bad_rows = wrong.select("_row", "_line", "tok").unique("_row", keep="first").sort("_row")
        for r in bad_rows.iter_rows(named=True):
            bad.add(path, int(r["_line"]), f"malformed token '{r['tok']}'")
        dropped = set(bad_rows["_row"].to_list())
        pieces = pieces.filter(~pl.col("_row").is_in(list(dropped)))
        labels = labels.filter(~pl.col("_row").is_in(list(dropped)))
        if labels.height == 0:
            return None
    if ffm:
        pieces = pieces.select("_row", pl.col("p").list.get(0).alias("field"),
                               (pl.col("p").list.get(1) + wsep + pl.col("p").list.get(2)).alias("tw"))
    else:
        pieces = pieces.select("_row", pl.lit("0").alias("field"),
                               (pl.col("p").list.get(0) + wsep + pl.col("p").list.get(1)).alias("tw"))
    grouped = pieces.group_by("_row", "field", maintain_order=True).agg(pl.col("tw").str.join(sep))
    wide = grouped.pivot(on="field", index="_row", values="tw") if grouped.height else \
        pl.DataFrame({"_row": pl.Series([], dtype=pl.Int64)})

    def col_name(field_id: str) -> str:
        if not field_id.isdigit():
            raise DataError(f"field id '{field_id}' is not a number", path=path)
        k = int(field_id)
        if names:
            if k >= len(names):
                raise DataError(f"field {k} has no name in data.columns ({len(names)} names)", path=path)
            return names[k]
        return f"f{k}" if ffm else "features"

    wide = wide.rename({c: col_name(c) for c in wide.columns if c != "_row"})
    out = labels.join(wide.with_columns(pl.col("_row").cast(labels["_row"].dtype)), on="_row", how="left")
    out = out.sort("_row")
    line_numbers = out["_line"].to_numpy().astype(np.int64)
    return out.drop("_row", "_line"), line_numbers
