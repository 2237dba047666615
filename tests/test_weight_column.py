"""A per-row sample weight (data.weight_column): config checks, bad cells by file/line/field, the prepared
arrays on both preparation paths, the weighted training loss, the weighted evaluation metrics, and scoring
files that lack the column."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from deepfm.config import config_from_dict
from deepfm.data import fastpath
from deepfm.data.store import prepare
from deepfm.errors import ConfigError, DataError
from deepfm.metrics import auc, calibration, log_loss, summarize
from deepfm.pipeline import build_model, train
from deepfm.predict import Predictor

QUIET = {"progress": False, "log": lambda _m: None}
SILENT = {"log": lambda _m: None}
FIELDS = [{"names": ["c1", "c2"]}, {"name": "idx", "kind": "numeric", "numeric": "scale"}]


def _rows(n: int, seed: int = 0, weight=lambda i, rng: float(i % 7) + 0.5) -> list[dict]:
    """Rows whose click depends on c1 / c2; ``idx`` (the row's index, a numeric field) lets a test find each
    row's weight again after splits and sampling."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c1, c2 = int(rng.integers(0, 6)), int(rng.integers(0, 4))
        p = 1 / (1 + np.exp(-(c1 - 2.5 + 0.8 * (c2 == 1))))
        out.append({"label": int(rng.random() < p), "w": weight(i, rng), "c1": f"a{c1}", "c2": f"b{c2}", "idx": i})
    return out


def _write(path, rows: list[dict], columns=("label", "w", "c1", "c2", "idx"), header: bool = True):
    lines = ["\t".join(columns)] if header else []
    lines += ["\t".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path, train_path, fields=FIELDS, cache="cache", train=None, **data):
    return config_from_dict({
        "data": {"format": "tsv", "train": str(train_path), "cache_dir": str(tmp_path / cache), **data},
        "fields": fields,
        "model": {"embed_dim": 4, "hidden_units": [16]},
        "train": {"progress": False, "precision": "fp32", "seed": 3, **(train or {})}})


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("data, fields, message", [
    ({"weight_column": "label"}, FIELDS, "is the label column"),
    ({"weight_column": "w", "id_columns": ["w"]}, FIELDS, "also in data.id_columns"),
    ({"weight_column": "c2"}, FIELDS, "field 'c2' is the weight column"),
    ({"weight_column": "w", "format": "libsvm", "columns": ["features"]}, [{"name": "features", "kind": "multi"}],
     "needs named columns"),
    ({"weight_column": "w", "derive": [{"name": "w", "source": "idx", "fn": "weekday"}]}, FIELDS,
     "data.derive computes the weight column"),
    ({"weight_column": "wt", "header": False, "columns": ["label", "w", "c1", "c2", "idx"]}, FIELDS,
     "data.columns lacks ['wt']"),
])
def test_weight_column_config_is_checked(data, fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"data": {"train": "t.tsv", "format": "tsv", **data}, "fields": fields})


def test_weights_combine_with_negative_sampling():
    cfg = config_from_dict({"data": {"train": "t.tsv", "weight_column": "w", "negative_sampling_rate": 0.5},
                            "fields": FIELDS})
    assert cfg.data.weight_column == "w" and cfg.data.logit_shift == pytest.approx(np.log(0.5))


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("cell", ["", "heavy", "-1", "nan", "inf", "-0.5e-3", "1e39"])
def test_a_bad_weight_names_file_line_and_column_or_is_skipped(tmp_path, cell):
    rows = _rows(40)
    rows[17]["w"] = cell  # line 19 of the file: the header is line 1
    path = _write(tmp_path / "t.tsv", rows)
    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path, path, weight_column="w"), **QUIET)
    msg = str(err.value)
    assert err.value.path == str(path) and err.value.line == 19 and err.value.field == "w", msg
    assert "is not a sample weight" in msg and f"line 19" in msg and "field 'w'" in msg, msg
    data = prepare(_cfg(tmp_path, path, weight_column="w", skip_bad_rows=True), **QUIET)
    assert data.manifest["bad_rows"] == 1 and len(data.splits["train"]) == 39
    assert (data.path / "bad_rows.txt").read_text().startswith(f"{path}:19: field 'w': is not a sample weight")
    idx = np.asarray(data.splits["train"].num_values)[:, 0].astype(int)
    assert 17 not in idx
    np.testing.assert_array_equal(data.splits["train"].weights, (idx % 7 + 0.5).astype(np.float32))


def test_a_missing_weight_column_is_an_error_naming_the_file(tmp_path):
    path = _write(tmp_path / "t.tsv", _rows(20), columns=("label", "c1", "c2", "idx"))
    with pytest.raises(DataError, match="'w'") as err:
        prepare(_cfg(tmp_path, path, weight_column="w"), **QUIET)
    assert err.value.path == str(path)


def test_weights_are_stored_beside_labels_and_follow_their_rows(tmp_path):
    """Random split + negative downsampling (general path): every kept row keeps its own weight."""
    rows = _rows(600)
    path = _write(tmp_path / "t.tsv", rows)
    data = prepare(_cfg(tmp_path, path, weight_column="w", split={"valid": 0.2, "test": 0.2, "seed": 1},
                        negative_sampling_rate=0.5, chunk_rows=97), **QUIET)
    assert data.manifest["negatives_dropped"] > 0
    for split in data.splits.values():
        assert split.weights is not None and split.weights.dtype == np.float32 and len(split.weights) == len(split)
        idx = np.asarray(split.num_values)[:, 0].astype(int)
        np.testing.assert_array_equal(split.weights, (idx % 7 + 0.5).astype(np.float32))
        np.testing.assert_array_equal(split.labels, np.array([rows[i]["label"] for i in idx], np.float32))
    assert sum(len(s) for s in data.splits.values()) + data.manifest["negatives_dropped"] == 600
    assert (data.path / "train" / "weights.bin").stat().st_size == 4 * len(data.splits["train"])
    # without a weight column there are no weights, and the cache key differs for each choice of column
    plain = prepare(_cfg(tmp_path, path, split={"valid": 0.2, "test": 0.2, "seed": 1}), **QUIET)
    other = prepare(_cfg(tmp_path, path, weight_column="idx", fields=FIELDS[:1],
                         split={"valid": 0.2, "test": 0.2, "seed": 1}), **QUIET)
    assert plain.splits["train"].weights is None and not (plain.path / "train" / "weights.bin").exists()
    assert len({data.path, plain.path, other.path}) == 3


def test_fast_path_reads_the_weights_as_the_general_path(tmp_path, monkeypatch):
    train_path = _write(tmp_path / "t.tsv", _rows(300, seed=1, weight=lambda i, rng: round(rng.random() * 3, 4)))
    valid_path = _write(tmp_path / "v.tsv", _rows(100, seed=2, weight=lambda i, rng: float(rng.integers(0, 3))))
    cfg = _cfg(tmp_path, train_path, weight_column="w", valid=str(valid_path))
    assert fastpath.why_not(cfg) is None
    fast = prepare(cfg, **QUIET)
    assert fast.manifest["fast_path"]
    monkeypatch.setattr(fastpath, "why_not", lambda _cfg: "off")
    general = prepare(_cfg(tmp_path, train_path, cache="general", weight_column="w", valid=str(valid_path)), **QUIET)
    assert not general.manifest["fast_path"]
    for name in ("train", "valid"):
        np.testing.assert_array_equal(fast.splits[name].weights, general.splits[name].weights)
        np.testing.assert_array_equal(fast.splits[name].cat_ids, general.splits[name].cat_ids)
    expected = pl.read_csv(valid_path, separator="\t")["w"].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(fast.splits["valid"].weights, expected)


# ------------------------------------------------------------------------------------------------ training
def _params(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.trainer.model.state_dict().items()}


def test_weights_all_two_train_exactly_as_no_weights(tmp_path):
    """The loss is normalised by the batch's weight: a constant weight changes nothing, bit for bit."""
    rows = _rows(500, weight=lambda i, rng: 2.0)
    path, valid = _write(tmp_path / "t.tsv", rows), _write(tmp_path / "v.tsv", _rows(200, seed=5,
                                                                                     weight=lambda i, rng: 2.0))
    run = {"epochs": 2, "batch_size": 64}
    weighted = train(_cfg(tmp_path, path, weight_column="w", valid=str(valid), train=run), tmp_path / "a", **SILENT)
    plain = train(_cfg(tmp_path, path, valid=str(valid), train=run), tmp_path / "b", **SILENT)
    assert weighted.data.splits["train"].weights is not None and plain.data.splits["train"].weights is None
    a, b = _params(weighted), _params(plain)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for key in ("auc", "logloss", "calibration"):
        assert weighted.metrics["valid"][key] == pytest.approx(plain.metrics["valid"][key], rel=1e-12, abs=1e-12)
    assert [r["train_logloss"] for r in weighted.history] == pytest.approx([r["train_logloss"] for r in plain.history],
                                                                          rel=1e-9)


@pytest.mark.parametrize("sparse", [True, False])
def test_a_row_of_weight_zero_trains_as_if_dropped(tmp_path, sparse):
    """One batch holds every row (shuffle off); hashed vocabularies give both files the same ids."""
    rng = np.random.default_rng(4)
    zero = rng.random(300) < 0.3
    rows = _rows(300, weight=lambda i, _rng: 0.0 if zero[i] else 1.0)
    with_zero = _write(tmp_path / "z.tsv", rows)
    dropped = _write(tmp_path / "d.tsv", [r for r, z in zip(rows, zero, strict=True) if not z])
    fields = [{"names": ["c1", "c2"], "hash_buckets": 16}, {"name": "idx", "kind": "numeric", "numeric": "scale"}]
    run = {"epochs": 4, "batch_size": 512, "shuffle": False, "sparse": sparse, "lr": 0.01}
    cfg = _cfg(tmp_path, with_zero, fields=fields, weight_column="w", train=run)
    a = train(cfg, tmp_path / "a", **SILENT)
    b = train(_cfg(tmp_path, dropped, fields=fields, train=run), tmp_path / "b", **SILENT)
    assert len(a.data.splits["train"]) == 300 and len(b.data.splits["train"]) == 300 - zero.sum()
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)
    for k, p in build_model(cfg, a.data).named_parameters():
        assert not torch.equal(pa[k], p), f"{k} did not train"
    assert a.history[-1]["train_logloss"] == pytest.approx(b.history[-1]["train_logloss"], rel=1e-6)


# ------------------------------------------------------------------------------------------------ metrics
def _scored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float32)
    s = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 2)  # many ties
    return y, s


def test_weighted_auc_with_integer_weights_equals_repeated_rows():
    y, s = _scored(400, 0)
    w = np.random.default_rng(1).integers(0, 5, 400)
    assert auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert auc(y, s, np.ones(400)) == auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # ties count one half: two rows of one score give 0.5 whatever their weights
    assert auc(np.array([0, 1]), np.array([0.3, 0.3]), np.array([5.0, 0.25])) == 0.5


def test_weighted_metrics_match_scikit_learn_and_brute_force():
    y, s = _scored(1000, 2)
    w = np.random.default_rng(3).random(1000) * 4
    w[:50] = 0.0
    p = np.clip(s, 0.01, 0.99)
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert log_loss(y, p, weights=w) == pytest.approx(sk_log_loss(y, p, sample_weight=w), rel=1e-12)
    assert calibration(y, p, w) == pytest.approx(np.sum(w * p) / np.sum(w * y), rel=1e-12)
    # a weight of 0 is the row left out
    keep = w > 0
    assert auc(y, s, w) == pytest.approx(auc(y[keep], s[keep], w[keep]), abs=1e-12)
    assert log_loss(y, p, weights=w) == pytest.approx(log_loss(y[keep], p[keep], weights=w[keep]), rel=1e-12)
    out = summarize(y, p, weights=w)
    assert out == {"auc": auc(y, p, w), "logloss": log_loss(y, p, weights=w), "calibration": calibration(y, p, w),
                   "rows": 1000}
    assert out["auc"] != auc(y, p)


def test_weighted_metrics_without_weight_in_a_class_are_nan():
    y = np.array([0, 1, 0, 1.0])
    assert np.isnan(auc(y, np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 2, 0.0])))
    assert np.isnan(calibration(y, np.full(4, 0.5), np.array([1, 0, 2, 0.0])))
    assert np.isnan(log_loss(y, np.full(4, 0.5), weights=np.zeros(4)))
    with pytest.raises(ValueError, match="3 weights for 4 rows"):
        auc(y, np.full(4, 0.5), np.ones(3))


# ------------------------------------------------------------------------------------------------ end to end
def test_train_evaluates_weighted_and_scoring_files_need_no_weight_column(tmp_path):
    rng = np.random.default_rng(7)
    path = _write(tmp_path / "t.tsv", _rows(800, seed=7))
    valid_rows = _rows(300, seed=8, weight=lambda i, _rng: float(rng.choice([0.0, 0.5, 4.0])))
    valid = _write(tmp_path / "v.tsv", valid_rows)
    cfg = _cfg(tmp_path, path, weight_column="w", valid=str(valid), train={"epochs": 3, "batch_size": 64})
    result = train(cfg, tmp_path / "model", **SILENT)
    predictor = Predictor(tmp_path / "model")
    frame = pl.read_csv(valid, separator="\t")
    probs = predictor.predict_proba(frame.drop("label", "w"))
    y, w = frame["label"].to_numpy(), frame["w"].to_numpy()
    m = result.metrics["valid"]
    assert m["auc"] == pytest.approx(auc(y, probs, w), abs=1e-6)
    assert m["logloss"] == pytest.approx(log_loss(y, probs, weights=w), abs=1e-6)
    assert m["calibration"] == pytest.approx(calibration(y, probs, w), abs=1e-6)
    assert m["auc"] != pytest.approx(auc(y, probs), abs=1e-6) and m["auc"] > 0.6
    assert all(np.isfinite(r["train_logloss"]) and "valid_auc" in r for r in result.history)
    # `evaluate` weights as validation did when the file has the column, and not without it
    evaluated = predictor.evaluate_file(str(valid), progress=False)
    assert {k: evaluated[k] for k in m} == pytest.approx(m, abs=1e-9)
    unweighted = _write(tmp_path / "u.tsv", valid_rows, columns=("label", "c1", "c2", "idx"))
    assert predictor.evaluate_file(str(unweighted), progress=False)["auc"] == pytest.approx(auc(y, probs), abs=1e-6)
    # a file to score without the weight column (with or without labels)
    for columns in (("label", "c1", "c2", "idx"), ("c1", "c2", "idx")):
        scored = _write(tmp_path / "p.tsv", valid_rows, columns=columns)
        predictor.predict_file(str(scored), str(tmp_path / "p.csv"))
        got = pl.read_csv(tmp_path / "p.csv")["probability"].to_numpy()
        np.testing.assert_allclose(got, probs, rtol=0, atol=1e-6)


def test_a_headerless_file_to_score_may_lack_the_weight_column(tmp_path):
    columns = ("label", "w", "c1", "c2", "idx")
    path = _write(tmp_path / "t.tsv", _rows(300), header=False)
    cfg = _cfg(tmp_path, path, weight_column="w", header=False, columns=list(columns),
               train={"epochs": 1, "batch_size": 64})
    train(cfg, tmp_path / "model", **SILENT)
    predictor = Predictor(tmp_path / "model")
    rows = _rows(50, seed=9)
    expected = predictor.predict_proba(pl.DataFrame(rows).drop("label", "w"))
    for kept in (("label", "c1", "c2", "idx"), ("c1", "c2", "idx"), columns):
        scored = _write(tmp_path / "p.tsv", rows, columns=kept, header=False)
        chunks = list(predictor.score_chunks(str(scored)))
        np.testing.assert_allclose(np.concatenate([s.probs for s in chunks]), expected, rtol=0, atol=1e-6)
        assert (chunks[0].labels is not None) == ("label" in kept)


def test_two_processes_normalise_by_the_whole_batch_weight(tmp_path):
    """Under torchrun each rank divides by the global batch's weight, so 2 ranks train as 1 process even when
    the weights are unbalanced between the ranks' halves of a batch (a per-rank normalisation would not)."""
    from test_distributed import _torchrun

    rows = _rows(256, weight=lambda i, _rng: 8.0 if i % 64 < 32 else 0.5)  # rank 0's half of a batch weighs more
    path = _write(tmp_path / "t.tsv", rows)
    cfg = _cfg(tmp_path, path, weight_column="w", train={"epochs": 2, "batch_size": 64, "shuffle": False,
                                                          "dist_timeout_s": 60})
    one = train(cfg, tmp_path / "one", **SILENT)
    raw = cfg.model_dump(mode="json", exclude={"fields": {"__all__": {"names"}}})
    proc = _torchrun({"config": raw, "output": str(tmp_path / "two")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Predictor(tmp_path / "two").predict_proba(pl.DataFrame(rows).drop("label", "w"))
    np.testing.assert_allclose(two, Predictor(one.model_dir).predict_proba(pl.DataFrame(rows).drop("label", "w")),
                               rtol=0, atol=1e-5)
