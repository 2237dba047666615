"""Each codec gives the same ids, values and errors on every engine: the columnar engine (``Encoder.transform``
on text cells, as read from a CSV/TSV file, and on typed cells), the per-record engine (``RecordEncoder`` on what
the server's validation makes of JSON values) and the fast CSV/TSV preparation. Random values by hypothesis:
unicode, empty and missing cells, huge and negative numbers, NaN/inf text, weighted multi-valued cells."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfm.config import DataConfig, config_from_dict, parse_field
from deepfm.data import fastpath
from deepfm.data.codecs import FLOAT32_MAX, Multi, codec_for
from deepfm.data.encoder import Encoder
from deepfm.data.readers import RawChunk
from deepfm.data.records import RecordEncoder
from deepfm.data.store import prepare
from deepfm.errors import DataError

DATA = DataConfig(train="unused.csv")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRAIN_CATS = ["a", "b", "b", "", "é", "123456789012345678", "c"]
TRAIN_NUMS = ["0", "1", "2.5", "", "-3", "1e6", "7", "0.25"]


def _chunk(columns: dict[str, pl.Series]) -> RawChunk:
    frame = pl.DataFrame(list(columns.values()))
    return RawChunk("<test>", frame, np.arange(1, frame.height + 1, dtype=np.int64), 0)


def _fitted(field: dict, train: list[str]) -> Encoder:
    name = field["name"]
    enc = Encoder([parse_field(field)], DATA)
    enc.fit([_chunk({"label": pl.Series("label", ["0"] * len(train)), name: pl.Series(name, train)})])
    return enc


def _columnar(enc: Encoder, cells: pl.Series | None, columns: dict[str, pl.Series] | None = None):
    """(arrays, None) or (None, error reason) from the columnar engine, on one column or several."""
    try:
        e = enc.transform(_chunk(columns or {cells.name: cells}), labels=False)
    except DataError as err:
        return None, err.reason
    return (e.cat_ids, e.num_values, [(m.ids, m.weights, m.lengths) for m in e.multi]), None


def _record(enc: Encoder, values: list):
    """(arrays, None) or (None, problem) from the server's validation + the per-record engine; the column
    path of a large request must agree (``_record_columns``)."""
    codec = enc.codecs[0]
    columns = _record_columns(enc, values)
    rows = []
    for v in values:
        if v is None:
            rows.append({})
            continue
        norm, problem = codec.request_value(v)
        if problem:
            assert columns is None
            return None, problem
        assert codec.plain(norm)
        rows.append({codec.name: norm})
    out = RecordEncoder(enc).encode(rows)
    _same(columns, _tiled(out, _REPEAT))
    return out, None


_REPEAT = 40  # a ranking request's size: the server checks and encodes it column by column, in numpy


def _record_columns(enc: Encoder, values: list):
    """The per-record engine on ``values`` repeated ``_REPEAT`` times, as the server takes a large request:
    ``request_values`` (the column at once) must normalise as ``request_value`` does value by value, or
    decline (always, when a value has a problem: then None); then ``RecordEncoder.encode_columns``."""
    codec = enc.codecs[0]
    column = values * _REPEAT
    one_by_one = [(None, None) if v is None else codec.request_value(v) for v in column]
    normalised = codec.request_values(column)
    if any(problem for _, problem in one_by_one):
        assert normalised is None, "request_values let a bad value through"
        return None
    if normalised is None:
        normalised = [v for v, _ in one_by_one]
    else:
        assert _normalised(normalised) == _normalised([v for v, _ in one_by_one])
    assert codec.plain_column(normalised) == all(codec.plain(v) for v in normalised)
    return RecordEncoder(enc).encode_columns(len(column), {codec.name: normalised})


def _normalised(values: list) -> list:
    """Normalised values in a comparable form (``Multi`` cells as tuples; a float's type and bits)."""
    return [(v.tags, v.weights, v.weighted) if isinstance(v, Multi) else (type(v), repr(v)) for v in values]


def _tiled(arrays, k: int):
    cat, num, multi = arrays
    return (np.tile(cat, (k, 1)), np.tile(num, (k, 1)),
            [(np.tile(ids, k), np.tile(w, k), np.tile(lengths, k)) for ids, w, lengths in multi])


def _same(a, b) -> None:
    cat_a, num_a, multi_a = a
    cat_b, num_b, multi_b = b
    assert np.array_equal(cat_a, cat_b)
    assert num_a.dtype == num_b.dtype == np.float32
    assert np.array_equal(num_a.view(np.int32), num_b.view(np.int32)), (num_a, num_b)  # bitwise, NaN too
    for (ia, wa, la), (ib, wb, lb) in zip(multi_a, multi_b, strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
        assert np.array_equal(wa.view(np.int32), wb.view(np.int32))


# ------------------------------------------------------------------------------------------ strategies
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
cells = st.one_of(st.none(), texts, st.sampled_from(TRAIN_CATS))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-50, max_value=50),
    st.integers(min_value=-10**6, max_value=10**6),
    st.sampled_from([0.0, -0.0, 2.0, 2.0000001, 1.9999999, FLOAT32_MAX, -FLOAT32_MAX, 3.5e38, 1e300, 1e-300]),
)


def _number_text(v: float | int) -> str:
    return repr(v) if isinstance(v, float) else str(v)


NUMERIC = [{"numeric": t, "log1p": lp} for t in ("log_bucket", "scale", "standardize", "minmax")
           for lp in (False, True)]


# ------------------------------------------------------------------------------------------ categorical
@SETTINGS
@given(st.lists(cells, min_size=1, max_size=8), st.sampled_from([None, 7]))
def test_categorical_engines_agree(values, hash_buckets):
    enc = _fitted({"name": "c", "hash_buckets": hash_buckets}, TRAIN_CATS)
    col, col_err = _columnar(enc, pl.Series("c", values, dtype=pl.Utf8))
    rec, rec_err = _record(enc, values)
    assert col_err is None and rec_err is None
    _same(col, rec)
    if hash_buckets is None:  # known values get their training ids, everything else the OOV id 0
        tokens = enc.vocabularies_["c"].tokens
        assert col[0][:, 0].tolist() == [tokens.index(v or "") + 1 if (v or "") in tokens else 0 for v in values]


@SETTINGS
@given(st.lists(st.one_of(st.none(), st.integers(-2**62, 2**62), st.floats(-1e6, 1e6)), min_size=1, max_size=8))
def test_categorical_numbers_are_ids_never_floats(values):
    """A number sent for a categorical field is its text (integral floats as integers), on both engines."""
    enc = _fitted({"name": "c"}, TRAIN_CATS + ["4611686018427387904", "3"])
    typed = pl.Series("c", [float(v) if v is not None else None for v in values], dtype=pl.Float64)
    col, _ = _columnar(enc, typed)
    rec, rec_err = _record(enc, [float(v) if v is not None else None for v in values])
    assert rec_err is None
    _same(col, rec)


# ------------------------------------------------------------------------------------------ numeric
@SETTINGS
@given(st.lists(st.one_of(st.none(), numbers), min_size=1, max_size=8), st.sampled_from(NUMERIC))
def test_numeric_engines_agree_on_values_and_errors(values, transform):
    enc = _fitted({"name": "x", "kind": "numeric", **transform}, TRAIN_NUMS)
    text = pl.Series("x", [None if v is None else _number_text(v) for v in values], dtype=pl.Utf8)
    col, col_err = _columnar(enc, text)
    rec, rec_err = _record(enc, values)
    bad = [v for v in values if v is not None and not (math.isfinite(float(v)) and abs(float(v)) <= FLOAT32_MAX)]
    assert (col_err is not None) == (rec_err is not None) == bool(bad), (col_err, rec_err, bad)
    if bad:
        assert "not a finite number" in col_err
        assert "finite" in rec_err or "out of range" in rec_err
        return
    _same(col, rec)
    typed, _ = _columnar(enc, pl.Series("x", [None if v is None else float(v) for v in values], dtype=pl.Float64))
    _same(col, typed)  # a typed column (Parquet) gives what the text gives


@SETTINGS
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8))
def test_minmax_is_fitted_on_train_and_clipped(values):
    enc = _fitted({"name": "x", "kind": "numeric", "numeric": "minmax"}, TRAIN_NUMS)
    assert enc.numeric_["x"] == {"min": -3.0, "max": 1e6}
    col, _ = _columnar(enc, pl.Series("x", [repr(v) for v in values]))
    expected = np.clip((np.asarray(values) + 3.0) / (1e6 + 3.0), 0.0, 1.0).astype(np.float32)
    assert np.array_equal(col[1][:, 0], expected)


def test_minmax_constant_and_empty_training_values_map_to_zero():
    for train in (["5", "5", ""], ["", ""]):
        enc = _fitted({"name": "x", "kind": "numeric", "numeric": "minmax"}, train)
        col, _ = _columnar(enc, pl.Series("x", ["-1", "5", "9", ""]))
        assert col[1][:3, 0].tolist() == [0.0, 0.0, 0.0] and math.isnan(col[1][3, 0])


def test_standardize_state_round_trips_through_json():
    enc = _fitted({"name": "x", "kind": "numeric", "numeric": "standardize"}, TRAIN_NUMS)
    back = Encoder.from_json(enc.fields, DATA, enc.to_json())
    cells = pl.Series("x", ["1", "", "-2.5"])
    _same(_columnar(enc, cells)[0], _columnar(back, cells)[0])
    vals = [float(v) for v in TRAIN_NUMS if v]
    assert enc.numeric_["x"]["mean"] == pytest.approx(np.mean(vals))
    assert enc.numeric_["x"]["std"] == pytest.approx(np.std(vals))


# ------------------------------------------------------------------------------------------ multi-valued
tags = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="^:"), min_size=1, max_size=6)
weights = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000))
multi_cells = st.one_of(st.none(), st.lists(st.tuples(tags, weights), max_size=5))


@SETTINGS
@given(st.lists(multi_cells, min_size=1, max_size=6), st.sampled_from([None, 2]))
def test_multi_engines_agree(values, max_len):
    train = ["a^b^c", "b:2^x", "", "é:0.5"]
    enc = _fitted({"name": "m", "kind": "multi", "combiner": "sum", "max_len": max_len}, train)
    text = pl.Series("m", [None if v is None else "^".join(f"{t}:{float(w)!r}" for t, w in v) for v in values])
    col, col_err = _columnar(enc, text)
    rec, rec_err = _record(enc, [None if v is None else [[t, w] for t, w in v] for v in values])
    assert col_err is None and rec_err is None
    _same(col, rec)
    lengths = col[2][0][2]
    assert lengths.tolist() == [0 if v is None else min(len(v), max_len or 99) for v in values]


def test_multi_list_cells_equal_their_text_form():
    enc = _fitted({"name": "m", "kind": "multi"}, ["a^b", "b:2"])
    text, _ = _columnar(enc, pl.Series("m", ["a:1.5^zz:2.0", None, "b:1.0"]))
    lists = pl.Series("m", [[{"tag": "a", "weight": 1.5}, {"tag": "zz", "weight": 2.0}], None,
                            [{"tag": "b", "weight": 1.0}]])
    typed, _ = _columnar(enc, lists)
    _same(text, typed)
    cell, problem = enc.codecs[0].request_value([["a", 1.5], ["zz", 2]])
    assert problem is None and isinstance(cell, Multi) and cell.weighted


def test_multi_bad_weight_names_the_line():
    enc = _fitted({"name": "m", "kind": "multi"}, ["a"])
    with pytest.raises(DataError, match="weight 'x' of tag 'a' is not a number") as info:
        enc.transform(_chunk({"m": pl.Series("m", ["a:1", "b^a:x"])}), labels=False)
    assert info.value.line == 2 and info.value.field == "m"


# ------------------------------------------------------------------------------------------ fast engine
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["0", "1"]),
                          st.text(st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"],
                                                blacklist_characters='\t"'), max_size=6),
                          st.one_of(st.just(""), numbers.map(_number_text)),
                          st.lists(st.tuples(st.sampled_from(["a", "b", "é", "", "long tag"]),
                                             st.one_of(st.none(), st.floats(-9, 9).map(repr), st.just("x"))),
                                   max_size=4)),
                min_size=2, max_size=30),
       st.sampled_from(NUMERIC), st.sampled_from([None, 2]), st.booleans())
def test_fast_preparation_equals_the_general_engine(tmp_path_factory, rows, transform, max_len, stream):
    """The fast CSV/TSV engine gives the general engine's vocabularies and arrays, or the same error, whether
    it parses the file at once or streams it in chunks of 7 rows with provisional ids."""
    tmp = tmp_path_factory.mktemp("fast")
    path = tmp / "train.tsv"
    text = "".join(f"{y}\t{c}\t{x}\t" + "^".join(t if w is None else f"{t}:{w}" for t, w in tags) + "\n"
                   for y, c, x, tags in rows)
    path.write_text("label\tc\tx\tm\n" + text, encoding="utf-8")
    raw = {"data": {"format": "tsv", "train": str(path), "cache_dir": str(tmp / "fast")},
           "fields": [{"name": "c", "vocab": "shared"}, {"name": "x", "kind": "numeric", **transform},
                      {"name": "m", "kind": "multi", "vocab": "shared", "max_len": max_len}]}
    results = []
    saved = {k: getattr(fastpath, k) for k in ("why_not", "WHOLE_FILE_BYTES", "BLOCK_BYTES", "CHUNK_ROWS")}
    for engine in ("fast", "general"):
        raw["data"]["cache_dir"] = str(tmp / engine)
        cfg = config_from_dict(raw)
        if engine == "general":
            fastpath.why_not = lambda _cfg: "off"  # type: ignore[assignment]
        elif stream:
            fastpath.WHOLE_FILE_BYTES, fastpath.BLOCK_BYTES, fastpath.CHUNK_ROWS = 0, 1024, 7
        try:
            results.append(prepare(cfg, progress=False, log=lambda _m: None))
        except DataError as err:
            results.append(str(err))
        finally:
            for k, v in saved.items():
                setattr(fastpath, k, v)
    fast, general = results
    if isinstance(general, str):
        assert fast == general
        return
    fitted_transform = transform["numeric"] in ("standardize", "minmax")
    # a fitted transform can't be streamed (its statistics come first), so the fast engine hands over, unless
    # the whole file came in one chunk (a file of one parse block), which it fits in memory
    if not (stream and fitted_transform):
        assert fast.manifest["fast_path"], "the fast engine handed over"
    assert fast.encoder.to_json() == general.encoder.to_json()
    a, b = fast.splits["train"], general.splits["train"]
    assert np.array_equal(a.cat_ids, b.cat_ids) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.asarray(a.num_values).view(np.int32), np.asarray(b.num_values).view(np.int32))
    for (ia, wa, oa), (ib, wb, ob) in zip(a.multi, b.multi, strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(oa, ob) and np.array_equal(wa, wb)


# ------------------------------------------------------------------------------------------ config union
def test_each_kind_takes_its_own_keys_only():
    base = {"data": {"train": "x.csv"}}
    with pytest.raises(Exception, match=r"fields\.0\.combiner: unknown key"):
        config_from_dict({**base, "fields": [{"name": "a", "combiner": "sum"}]})
    with pytest.raises(Exception, match=r"fields\.0: kind must be one of categorical, numeric, multi"):
        config_from_dict({**base, "fields": [{"name": "a", "kind": "tags"}]})
    with pytest.raises(Exception, match="has no vocabulary to share"):
        config_from_dict({**base, "fields": [{"name": "a", "kind": "numeric", "numeric": "minmax", "vocab": "v"}]})
    cfg = config_from_dict({**base, "fields": [{"names": ["a", "b"], "vocab": "shared"},
                                               {"name": "m", "kind": "multi", "vocab": "shared"},
                                               {"name": "x", "kind": "numeric", "numeric": "minmax"}]})
    assert [type(codec_for(f)).__name__ for f in cfg.fields] == ["CategoricalCodec", "CategoricalCodec",
                                                                 "MultiCodec", "MinMaxCodec"]


# ------------------------------------------------------------------------------------------ column path
def test_log_bucket_column_form_at_integer_boundaries():
    """numpy's log may round differently from libm's: where ``ln(x)^2`` lies within rounding of an integer, the
    column form must still give ``record_token``'s bucket (and the missing token for None)."""
    from deepfm.config import NumericField
    from deepfm.data.codecs import LogBucketCodec

    xs: list = [2.0, math.nextafter(2.0, 3.0), math.nextafter(2.0, 0.0), -0.5, -1.5, 0.0, -(2.0 ** 63),
                math.nextafter(-(2.0 ** 63), -math.inf), 9.3e18, -9.3e18, FLOAT32_MAX, -FLOAT32_MAX, 7, -7, None]
    for k in range(1, 7874):  # ln(FLOAT32_MAX)^2 < 7874
        x = math.exp(math.sqrt(k))
        xs += [x, math.nextafter(x, 0.0), math.nextafter(x, math.inf)] + ([math.expm1(x)] if x < 88 else [])
    for log1p in (False, True):
        codec = LogBucketCodec(NumericField(name="v", kind="numeric", log1p=log1p))
        tokens, missing = codec.record_int_tokens(xs)
        got = ["" if m else str(t) for t, m in zip(tokens.tolist(), missing.tolist())]
        assert got == [codec.record_token(v) for v in xs]


def test_column_path_with_shared_vocabularies_equals_the_encoder():
    """Several fields of one vocabulary (categorical and log-bucketed), hashed and not, missing cells and
    unknown tokens: ``encode_columns`` on a request-sized batch gives ``Encoder.transform``'s arrays."""
    fields = [parse_field({"name": "a", "vocab": "v"}), parse_field({"name": "b", "vocab": "v"}),
              parse_field({"name": "x", "kind": "numeric", "vocab": "v"}),
              parse_field({"name": "y", "kind": "numeric", "log1p": True}),
              parse_field({"name": "h", "hash_buckets": 11}),
              parse_field({"name": "s", "kind": "numeric", "numeric": "standardize"}),
              parse_field({"name": "m", "kind": "multi", "vocab": "v", "max_len": 2})]
    rng = np.random.default_rng(3)
    n = 300
    cats = ["3", "7", "10", "x", "", "é", "-1", "0"]
    train = {"label": ["0"] * n, "a": rng.choice(cats, n).tolist(), "b": rng.choice(cats, n).tolist(),
             "x": [repr(v) for v in rng.lognormal(1, 2, n).tolist()],
             "y": [repr(v) for v in rng.normal(5, 9, n).tolist()],
             "h": rng.choice(cats, n).tolist(), "s": [repr(v) for v in rng.normal(size=n).tolist()],
             "m": ["^".join(rng.choice(cats, 3).tolist()) for _ in range(n)]}
    enc = Encoder(fields, DATA)
    enc.fit([_chunk({k: pl.Series(k, v, dtype=pl.Utf8) for k, v in train.items()})])
    req = {"a": [None, "3", "new", "", "é"] * 20, "b": ["7", None, "10", "zz", "0"] * 20,
           "x": [None, 0.0, 2.5, 1e30, -3.0, 7.0, 1e6, 2.0, 20.085536923187668, 100.0] * 10,
           "y": [-1.0, None, 6.38905609893065, 1e-300, 3.4e38] * 20, "h": ["3", None, "q", "", "x"] * 20,
           "s": [0.5, None, -2.0, 1e9, 0.0] * 20,
           "m": [["3", "x", "10"], None, [], ["new"], ["7"]] * 20}
    codecs = {c.name: c for c in enc.codecs}
    columns = {}
    for name, values in req.items():
        checked = [(None, None) if v is None else codecs[name].request_value(v) for v in values]
        columns[name] = [v for v, _ in checked]
    got = RecordEncoder(enc).encode_columns(100, columns)
    frame = {k: pl.Series(k, v, dtype=pl.Float64) for k, v in req.items() if k in ("x", "y", "s")}
    frame.update({k: pl.Series(k, req[k], dtype=pl.Utf8) for k in ("a", "b", "h")})
    frame["m"] = pl.Series("m", req["m"], dtype=pl.List(pl.Utf8))
    expected, err = _columnar(enc, None, frame)
    assert err is None
    _same(got, expected)
    assert got[0][:, 0].min() == 0 and len(set(got[0][:, 2].tolist())) > 3  # unknown tokens, several buckets
