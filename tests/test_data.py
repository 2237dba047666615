"""Readers, encoder, vocabularies, prepared store and loader: values, dtypes and edge cases."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from deepfm.config import DataConfig, FieldConfig, config_from_dict, parse_field
from deepfm.data.encoder import Encoder
from deepfm.data.hashing import bucketize
from deepfm.data.loader import batch_rows, iterate_batches, load_batch
from deepfm.data.readers import read_chunks
from deepfm.data.store import prepare, split_of_rows


def _fields(*specs: dict) -> list[FieldConfig]:
    return [f for s in specs for f in parse_field(s).expand()]


def _fit(path, data: DataConfig, fields):
    return Encoder(fields, data).fit(read_chunks(str(path), data))


def _encode(enc: Encoder, path, data: DataConfig):
    return [enc.transform(c) for c in read_chunks(str(path), data)]


def test_vocabulary_is_fitted_on_training_rows_only(write_text):
    train = write_text("train.csv", "label,c\n1,a\n0,b\n1,a\n")
    valid = write_text("valid.csv", "label,c\n0,z\n1,a\n")
    data = DataConfig(format="csv", train=str(train))
    enc = _fit(train, data, _fields({"name": "c"}))
    assert enc.vocabularies_["c"].tokens == ["a", "b"]  # by count, then value
    (out,) = _encode(enc, valid, data)
    assert out.cat_ids[:, 0].tolist() == [0, 1]  # 'z' never seen in training -> OOV id 0


def test_min_count_sends_rare_values_to_oov(write_text):
    train = write_text("t.csv", "label,c\n1,a\n0,a\n1,b\n")
    data = DataConfig(format="csv", train=str(train))
    enc = _fit(train, data, _fields({"name": "c", "min_count": 2}))
    (out,) = _encode(enc, train, data)
    assert out.cat_ids[:, 0].tolist() == [1, 1, 0]


def test_ids_above_2_pow_24_stay_distinct_through_the_data_path(write_text, tmp_path):
    big = [2**24, 2**24 + 1, 2**53 + 1, 2**53 + 2]
    lines = "\n".join(f"{i % 2},{v}" for i, v in enumerate(big))
    train = write_text("big.csv", "label,uid\n" + lines + "\n")
    data = DataConfig(format="csv", train=str(train))
    enc = _fit(train, data, _fields({"name": "uid"}))
    assert sorted(enc.vocabularies_["uid"].tokens) == sorted(str(v) for v in big)
    (out,) = _encode(enc, train, data)
    assert len(set(out.cat_ids[:, 0].tolist())) == 4 and out.cat_ids.dtype == np.int64
    # Parquet int64 ids too (no float on the way), and hashing keeps them apart
    pq_path = tmp_path / "big.parquet"
    pl.DataFrame({"label": [0, 1, 0, 1], "uid": pl.Series(big, dtype=pl.Int64)}).write_parquet(pq_path)
    pdata = DataConfig(format="parquet", train=str(pq_path))
    penc = _fit(pq_path, pdata, _fields({"name": "uid"}))
    assert sorted(penc.vocabularies_["uid"].tokens) == sorted(str(v) for v in big)
    hashed = bucketize(pl.Series([str(v) for v in big]).to_arrow(), 1 << 40)
    assert len(set(hashed.tolist())) == 4


def test_hash_buckets_are_stable_and_in_range(write_text):
    train = write_text("h.csv", "label,c\n1,a\n0,b\n")
    data = DataConfig(format="csv", train=str(train))
    enc = _fit(train, data, _fields({"name": "c", "hash_buckets": 1000}))
    (out,) = _encode(enc, train, data)
    # FNV-1a 64 of 'a' is 0xaf63dc4c8601ec8c
    assert out.cat_ids[0, 0] == 0xAF63DC4C8601EC8C % 1000
    assert enc.vocabularies_["c"].size == 1000


def test_multi_valued_text_cells_with_weights_and_empty_cells(write_text):
    train = write_text("m.csv", "label,tags\n1,a:1.0^b:0.5\n0,\n1,b^c:2\n")
    data = DataConfig(format="csv", train=str(train))
    enc = _fit(train, data, _fields({"name": "tags", "kind": "multi"}))
    (out,) = _encode(enc, train, data)
    mv = out.multi[0]
    vocab = enc.vocabularies_["tags"]
    ids = {t: i + 1 for i, t in enumerate(vocab.tokens)}
    assert mv.lengths.tolist() == [2, 0, 2]
    assert mv.ids.tolist() == [ids["a"], ids["b"], ids["b"], ids["c"]]
    assert mv.weights.tolist() == [1.0, 0.5, 1.0, 2.0]
    assert mv.ids.dtype == np.int64 and mv.weights.dtype == np.float32


def test_multi_valued_parquet_list_columns(tmp_path):
    p = tmp_path / "m.parquet"
    pl.DataFrame({"label": [1, 0], "tags": [["x", "y"], []],
                  "wt": [[{"tag": "x", "w": 0.5}], [{"tag": "z", "w": 2.0}]]}).write_parquet(p)
    data = DataConfig(format="parquet", train=str(p))
    enc = _fit(p, data, _fields({"name": "tags", "kind": "multi"}, {"name": "wt", "kind": "multi"}))
    (out,) = _encode(enc, p, data)
    assert out.multi[0].lengths.tolist() == [2, 0]
    assert out.multi[1].weights.tolist() == [0.5, 2.0]


def test_numeric_handling_log_bucket_standardize_and_missing(write_text):
    train = write_text("n.csv", "label,x,y,z\n1,1,10,1\n0,3,,3\n1,,100,\n0,100,5,5\n")
    data = DataConfig(format="csv", train=str(train))
    fields = _fields({"name": "x", "kind": "numeric", "numeric": "log_bucket"},
                     {"name": "y", "kind": "numeric", "numeric": "scale"},
                     {"name": "z", "kind": "numeric", "numeric": "standardize"})
    enc = _fit(train, data, fields)
    tokens = enc.vocabularies_["x"].tokens
    # 1 -> "1" (x <= 2), 3 -> floor(ln(3)^2) = 1, 100 -> floor(ln(100)^2) = 21, missing -> ""
    assert sorted(tokens) == sorted(["1", "21", ""])
    (out,) = _encode(enc, train, data)
    np.testing.assert_array_equal(np.isnan(out.num_values[:, 0]), [False, True, False, False])
    assert out.num_values[0, 0] == 10.0
    z = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(out.num_values[[0, 1, 3], 1], (z - z.mean()) / z.std(), rtol=1e-6)


def test_libffm_reader_makes_multi_valued_fields(tmp_path):
    p = tmp_path / "s.ffm"
    p.write_text("1 0:5:1.0 1:7:0.5 1:8:0.25\n0 0:5:1.0\n")
    data = DataConfig(format="libffm", train=str(p), columns=["f0", "f1"], header=False)
    fields = _fields({"names": ["f0", "f1"], "kind": "multi", "combiner": "sum"})
    enc = _fit(p, data, fields)
    (out,) = _encode(enc, p, data)
    assert out.labels.tolist() == [1.0, 0.0]
    assert out.multi[1].lengths.tolist() == [2, 0]
    assert out.multi[1].weights.tolist() == [0.5, 0.25]


def test_real_libffm_sample_parses(tmp_path):
    path = "/work/shared/data/criteo_libffm/small_train.txt"
    import os

    if not os.path.exists(path):
        pytest.skip("shared data not present")
    data = DataConfig(format="libffm", train=path, header=False)
    fields = _fields({"names": [f"f{i}" for i in range(39)], "kind": "multi", "combiner": "sum"})
    enc = _fit(path, data, fields)
    out = _encode(enc, path, data)
    assert sum(len(o) for o in out) == 200


def test_prepared_store_dtypes_cache_reuse_and_seeded_split(tmp_path, criteo_dir):
    raw = {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": str(criteo_dir / "train.tsv"),
                    "split": {"valid": 0.1, "test": 0.1, "seed": 7}, "cache_dir": str(tmp_path / "c")},
           "fields": [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "numeric": "scale"},
                      {"names": [f"C{i}" for i in range(1, 27)]}]}
    cfg = config_from_dict(raw)
    first = prepare(cfg, progress=False, log=lambda m: None)
    assert not first.reused
    tr = first.splits["train"]
    assert tr.labels.dtype == np.float32 and tr.cat_ids.dtype == np.int32 and tr.num_values.dtype == np.float32
    assert tr.cat_ids.shape[1] == 26 and tr.num_values.shape[1] == 13
    sizes = {k: len(v) for k, v in first.splits.items()}
    assert sum(sizes.values()) == 7200 and 500 < sizes["valid"] < 950 and 500 < sizes["test"] < 950
    second = prepare(cfg, progress=False, log=lambda m: None)
    assert second.reused and {k: len(v) for k, v in second.splits.items()} == sizes
    np.testing.assert_array_equal(np.asarray(second.splits["test"].labels), np.asarray(first.splits["test"].labels))
    # the assignment is a pure function of (seed, row index)
    rows = np.arange(10_000)
    np.testing.assert_array_equal(split_of_rows(rows, 0.1, 0.1, 7), split_of_rows(rows, 0.1, 0.1, 7))
    assert not np.array_equal(split_of_rows(rows, 0.1, 0.1, 7), split_of_rows(rows, 0.1, 0.1, 8))


def test_loader_covers_every_row_once_and_gathers_multi_values(tmp_path):
    p = tmp_path / "m.csv"
    rows = ["label,c,tags"] + [f"{i % 2},c{i % 5},{'^'.join(f't{j}:{j + 1}' for j in range(i % 4))}"
                               for i in range(103)]
    p.write_text("\n".join(rows) + "\n")
    cfg = config_from_dict({"data": {"format": "csv", "train": str(p), "cache_dir": str(tmp_path / "c")},
                            "fields": [{"name": "c"}, {"name": "tags", "kind": "multi"}]})
    split = prepare(cfg, progress=False, log=lambda m: None).splits["train"]
    plan = batch_rows(len(split), 16, shuffle=True, seed=1, epoch=0, block_rows=4)
    seen = np.concatenate([r for r in plan])
    assert sorted(seen.tolist()) == list(range(103))
    assert not np.array_equal(seen, np.arange(103))
    # gathered multi-valued tags match the rows they came from
    batch = load_batch(split, plan[0])
    lengths = np.bincount(batch.multi_bags.numpy(), minlength=len(batch))
    assert lengths.tolist() == [int(r) % 4 for r in plan[0]]
    total = sum(len(b) for b in iterate_batches(split, 10, shuffle=True, seed=3, epoch=1, block_rows=4))
    assert total == 103


def test_pread_path_reads_the_same_batches_as_the_memory_map(tmp_path, monkeypatch):
    import deepfm.data.loader as loader

    p = tmp_path / "m.csv"
    rows = ["label,c,x,tags"] + [f"{i % 2},c{i % 7},{i * 0.5},{'^'.join(f't{j}:{j + 1}' for j in range(i % 4))}"
                                 for i in range(157)]
    p.write_text("\n".join(rows) + "\n")
    cfg = config_from_dict({"data": {"format": "csv", "train": str(p), "cache_dir": str(tmp_path / "c")},
                            "fields": [{"name": "c"}, {"name": "x", "kind": "numeric", "numeric": "scale"},
                                       {"name": "tags", "kind": "multi"}]})
    split = prepare(cfg, progress=False, log=lambda m: None).splits["train"]
    plans = batch_rows(len(split), 40, shuffle=True, seed=2, epoch=0, block_rows=3) + [(10, 50)]
    mapped = [load_batch(split, r) for r in plans]
    monkeypatch.setattr(loader, "MAP_BELOW_BYTES", 0)  # force the pread path
    for r, a in zip(plans, mapped):
        b = load_batch(split, r)
        for x, y in zip(a.tensors() + (a.labels,), b.tensors() + (b.labels,)):
            assert x.dtype == y.dtype and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
