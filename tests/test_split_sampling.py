"""Time-ordered splits (data.split.by) and negative downsampling (data.negative_sampling_rate) with its
calibration at every exit: trainer evaluation, Predictor, the server's two paths, ONNX export."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from conftest import criteo_config_dict

from deepfm.artifact import load_model
from deepfm.config import config_from_dict, config_to_dict
from deepfm.data.readers import RawChunk
from deepfm.data.store import kept_by_sampling, prepare
from deepfm.errors import ConfigError, DataError
from deepfm.metrics import summarize
from deepfm.predict import Predictor
from deepfm.runtime import sigmoid

warnings.filterwarnings("ignore", category=UserWarning)


# ----------------------------------------------------------------------------------------------- time split
def _time_file(tmp_path, n=600, seed=0, hours=None):
    """Rows in shuffled time order: ``hour`` (also a numeric field), ``c`` = a token unique to the hour."""
    rng = np.random.default_rng(seed)
    hours = rng.integers(0, 48, n) if hours is None else np.asarray(hours)
    path = tmp_path / "t.csv"
    lines = ["label,hour,c,x"] + [f"{int(rng.random() < 0.3)},{14102100 + h},h{h},{rng.integers(0, 5)}"
                                  for h in hours]
    path.write_text("\n".join(lines) + "\n")
    return path, hours


def _time_cfg(tmp_path, path, split, **data):
    return config_from_dict({
        "data": {"train": str(path), "split": split, "cache_dir": str(tmp_path / "cache"), "chunk_rows": 97,
                 **data},
        "fields": [{"name": "hour", "kind": "numeric", "numeric": "scale"}, {"name": "c"}, {"name": "x"}]})


def test_time_split_orders_rows_and_fits_vocabularies_on_train_only(tmp_path):
    path, hours = _time_file(tmp_path)
    cfg = _time_cfg(tmp_path, path, {"by": "hour", "valid_from": 14102130, "test_from": "14102140"})
    data = prepare(cfg, progress=False, log=lambda m: None)
    t = {k: np.asarray(s.num_values)[:, 0].astype(np.int64) - 14102100 for k, s in data.splits.items()}
    assert {k: len(v) for k, v in t.items()} == {"train": int((hours < 30).sum()),
                                                 "valid": int(((hours >= 30) & (hours < 40)).sum()),
                                                 "test": int((hours >= 40).sum())}
    assert t["train"].max() < 30 <= t["valid"].min() <= t["valid"].max() < 40 <= t["test"].min()
    # the file is not in time order, and every row keeps its place within its split
    assert not np.all(np.diff(hours) >= 0)
    np.testing.assert_array_equal(t["valid"], hours[(hours >= 30) & (hours < 40)])
    vocab = data.encoder.fitted_state()[0]["c"]
    assert sorted(vocab.tokens) == sorted(f"h{h}" for h in set(hours[hours < 30].tolist()))
    # a later hour is unseen: the valid / test rows of 'c' are all out of vocabulary (id 0)
    c_col = data.layout.cat_fields.index("c")
    assert not np.asarray(data.splits["test"].cat_ids)[:, c_col].any()


def test_time_split_compares_text_when_thresholds_are_text(tmp_path):
    days = ["2024-04-30", "2024-05-01", "2024-05-09", "2024-05-10", "2024-05-11", "2024-12-01"]
    path = tmp_path / "d.csv"
    path.write_text("label,day,c\n" + "".join(f"{i % 2},{d},c{i}\n" for i, d in enumerate(days)))
    cfg = config_from_dict({"data": {"train": str(path), "cache_dir": str(tmp_path / "c"),
                                     "split": {"by": "day", "valid_from": "2024-05-01", "test_from": "2024-05-10"}},
                            "fields": [{"name": "c"}]})
    assert not cfg.data.split.numeric
    data = prepare(cfg, progress=False, log=lambda m: None)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1, "valid": 2, "test": 3}
    assert data.encoder.fitted_state()[0]["c"].tokens == ["c0"]


@pytest.mark.parametrize("value, why", [("", "is missing"), ("soon", "is not a number")])
def test_time_split_bad_value_names_file_line_field_or_is_skipped(tmp_path, value, why):
    path, _ = _time_file(tmp_path, n=300)
    lines = path.read_text().splitlines()
    lines[201] = f"1,{value},h3,1"  # line 202 of the file (the header is line 1)
    path.write_text("\n".join(lines) + "\n")
    split = {"by": "hour", "valid_from": 14102130, "test_from": 14102140}
    with pytest.raises(DataError) as err:
        prepare(_time_cfg(tmp_path, path, split), progress=False, log=lambda m: None)
    msg = str(err.value)
    assert str(path) in msg and "line 202" in msg and "'hour'" in msg and why in msg, msg
    data = prepare(_time_cfg(tmp_path, path, split, skip_bad_rows=True), progress=False, log=lambda m: None)
    assert data.manifest["bad_rows"] == 1 and sum(len(s) for s in data.splits.values()) == 299
    assert (data.path / "bad_rows.txt").read_text().startswith(f"{path}:202: field 'hour': split column value")


def test_time_split_config_is_validated(tmp_path):
    base = {"data": {"train": "x.csv"}, "fields": [{"name": "c"}]}

    def err(split, **data):
        with pytest.raises(ConfigError) as e:
            config_from_dict({**base, "data": {**base["data"], "split": split, **data}})
        return str(e.value)

    assert "not both" in err({"by": "hour", "valid_from": 1, "test_from": 2, "valid": 0.1})
    assert "valid_from and split.test_from must both be numbers or both be text" in err(
        {"by": "hour", "valid_from": "a", "test_from": 2})
    assert "must not come after" in err({"by": "hour", "valid_from": 5, "test_from": 3})
    assert "must not come after" in err({"by": "day", "valid_from": "b", "test_from": "a"})
    assert "data.split.test_from" in err({"by": "hour", "valid_from": 5})
    assert "lacks ['hour']" in err({"by": "hour", "valid_from": 1, "test_from": 2}, header=False,
                                   columns=["label", "c"])
    # the saved config (a model directory's config.yaml) reads back as the same split
    cfg = config_from_dict({**base, "data": {**base["data"], "split": {"by": "h", "valid_from": 1, "test_from": 2}}})
    assert config_from_dict(config_to_dict(cfg)).data.split == cfg.data.split
    random = config_from_dict({**base, "data": {**base["data"], "split": {"valid": 0.2}}})
    assert (random.data.split.valid, random.data.split.test, random.data.split.seed) == (0.2, 0.1, 2017)


def test_readme_split_examples_validate():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Splits.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    import yaml

    split = yaml.safe_load(block)["split"]
    cfg = config_from_dict({"data": {"train": "x.csv", "split": split}, "fields": [{"name": "c"}]})
    assert cfg.data.split.by == "hour" and cfg.data.split.numeric
    iso = '{by: day, valid_from: "2024-05-01", test_from: "2024-05-08"}'
    assert iso in readme
    cfg = config_from_dict({"data": {"train": "x.csv", "split": yaml.safe_load(iso)}, "fields": [{"name": "c"}]})
    assert not cfg.data.split.numeric


# ------------------------------------------------------------------------------------- negative downsampling
def test_sampling_is_seeded_keeps_positives_and_a_share_of_negatives():
    rows = np.arange(200_000)
    negative = (rows % 4) != 0  # 150,000 negatives
    keep = kept_by_sampling(rows, negative, 0.1, seed=5)
    assert keep[~negative].all()
    share = keep[negative].mean()
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / negative.sum()), share
    np.testing.assert_array_equal(keep, kept_by_sampling(rows, negative, 0.1, seed=5))
    assert not np.array_equal(keep, kept_by_sampling(rows, negative, 0.1, seed=6))
    # a row's fate depends on its index only (not on the chunk it is read in)
    np.testing.assert_array_equal(keep[1000:2000], kept_by_sampling(rows[1000:2000], negative[1000:2000], 0.1, 5))
    assert kept_by_sampling(rows, negative, 1.0, 5).all()


def test_prepare_samples_train_rows_only_independent_of_chunking(tmp_path, criteo_dir):
    def splits(rate, chunk_rows, cache):
        raw = {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": str(criteo_dir / "train.tsv"),
                        "split": {"valid": 0.1, "test": 0.1, "seed": 7}, "cache_dir": str(tmp_path / cache),
                        "negative_sampling_rate": rate, "chunk_rows": chunk_rows},
               "fields": [{"names": [f"C{i}" for i in range(1, 27)], "min_count": 2}]}
        return prepare(config_from_dict(raw), progress=False, log=lambda m: None)

    full, a, b = splits(1.0, 262144, "f"), splits(0.25, 1000, "a"), splits(0.25, 333, "b")
    for name in ("valid", "test"):  # valid / test keep every row, with the same ids
        np.testing.assert_array_equal(np.asarray(a.splits[name].labels), np.asarray(full.splits[name].labels))
        assert len(a.splits[name]) == len(full.splits[name]) > 500
        np.testing.assert_array_equal(np.asarray(a.splits[name].cat_ids), np.asarray(full.splits[name].cat_ids))
    y_full, y = np.asarray(full.splits["train"].labels), np.asarray(a.splits["train"].labels)
    assert (y == 1).sum() == (y_full == 1).sum()
    n_neg = int((y_full == 0).sum())
    assert abs((y == 0).sum() / n_neg - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n_neg)
    assert a.manifest["negatives_dropped"] == n_neg - int((y == 0).sum())
    for arr in ("labels", "cat_ids"):  # another chunking: the same rows
        np.testing.assert_array_equal(np.asarray(getattr(a.splits["train"], arr)),
                                      np.asarray(getattr(b.splits["train"], arr)))
    # vocabularies are fitted on every training row: sampling saves steps, not values
    assert a.encoder.to_json() == full.encoder.to_json()


def test_calibration_formula_on_a_known_case():
    """w = 0.1 and p_s = 0.5 (logit 0): p = 0.5 / (0.5 + 0.5 / 0.1) = 1/11, through the model's scoring path."""
    from deepfm.config import ModelConfig
    from deepfm.data.batch import make_input
    from deepfm.layout import TableLayout
    from deepfm.model import DeepFM
    from deepfm.runtime import Runtime

    cfg = config_from_dict({"data": {"train": "x.csv", "negative_sampling_rate": 0.1}, "fields": [{"name": "c"}]})
    assert cfg.data.logit_shift == pytest.approx(math.log(0.1))
    layout = TableLayout(num_rows=3, cat_fields=("c",), cat_offsets=(0,), num_fields=(), num_offsets=(),
                         multi_fields=(), multi_offsets=(), multi_combiners=(), vocab_blocks={"c": (0, 3)})
    model = DeepFM(layout, ModelConfig(embed_dim=4, hidden_units=[8]), logit_shift=cfg.data.logit_shift)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every part outputs 0: the trained logit is 0, p_s = 0.5
    inp = make_input(np.array([[1], [2]]), np.zeros((2, 0), np.float32), [])
    probs = Runtime.place(model, "cpu").probabilities(inp)
    np.testing.assert_allclose(probs, [1 / 11, 1 / 11], rtol=1e-7)  # the logit is float32
    p_s = 0.5
    assert p_s / (p_s + (1 - p_s) / 0.1) == pytest.approx(1 / 11, rel=1e-15)


@pytest.fixture(scope="module")
def sampled_model(tmp_path_factory):
    from deepfm.pipeline import train

    tmp = tmp_path_factory.mktemp("ns")
    raw = criteo_config_dict(tmp, epochs=1, batch_size=512)
    raw["data"]["negative_sampling_rate"] = 0.3
    raw["model"]["hidden_units"] = [32, 32]
    result = train(config_from_dict(raw), tmp / "model", log=lambda m: None)
    return result


def test_downsampled_model_is_calibrated_everywhere(sampled_model, tmp_path, criteo_dir):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    fastapi = pytest.importorskip("fastapi")  # noqa: F841
    from fastapi.testclient import TestClient

    from deepfm.config import CRITEO_COLUMNS
    from deepfm.data.batch import input_from_chunk
    from deepfm.export import export_model
    from deepfm.serve.app import Settings, create_app

    model_dir = sampled_model.model_dir
    w = 0.3
    df = pl.read_csv(criteo_dir / "test.tsv", separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                     infer_schema_length=0)
    loaded = load_model(model_dir)
    assert loaded.model.logit_shift == pytest.approx(math.log(w))
    enc = loaded.encoder.transform(RawChunk("<t>", df, np.arange(1, df.height + 1), 0), labels=True)
    tensors = input_from_chunk(enc).tensors()
    with torch.no_grad():  # what training optimises: the click rate of the downsampled rows
        p_s = sigmoid(loaded.model.forward_with_penalty(*tensors, with_penalty=False)[0].double().numpy())
    expected = p_s / (p_s + (1 - p_s) / w)

    predictor = Predictor(model_dir, device="cpu")
    np.testing.assert_allclose(predictor.predict_proba(df), expected, rtol=1e-6)
    out = tmp_path / "p.csv"
    predictor.predict_file(str(criteo_dir / "test.tsv"), str(out), progress=False)
    np.testing.assert_allclose(pl.read_csv(out)["probability"].to_numpy(), expected, rtol=1e-6)
    # evaluate and the trainer's own test metrics are on calibrated probabilities
    evaluated = predictor.evaluate_file(str(criteo_dir / "test.tsv"), progress=False)
    assert evaluated["calibration"] == pytest.approx(expected.mean() / enc.labels.mean(), rel=1e-6)
    # (the trainer may score in bf16: equal to 1e-3, where the uncalibrated numbers are far off)
    uncalibrated = summarize(enc.labels, p_s)
    assert abs(uncalibrated["calibration"] - evaluated["calibration"]) > 0.2
    assert sampled_model.metrics["test"]["logloss"] == pytest.approx(evaluated["logloss"], rel=1e-3)
    assert sampled_model.metrics["test"]["calibration"] == pytest.approx(evaluated["calibration"], rel=1e-3)
    history = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert history["valid_logloss"] == pytest.approx(
        predictor.evaluate_file(str(criteo_dir / "dev.tsv"), progress=False)["logloss"], rel=1e-3)

    rows = [{"id": i, "features": {k: v for k, v in r.items() if v is not None and k != "label"}}
            for i, r in enumerate(df.head(40).iter_rows(named=True))]
    for fast_rows in (64, 0):  # the per-record path, then the batch (DataFrame) path
        client = TestClient(create_app(model_dir, Settings(fast_path_max_rows=fast_rows)))
        resp = client.post("/v1/predict", json={"rows": rows})
        assert resp.status_code == 200, resp.text
        got = np.array([p["probability"] for p in resp.json()["predictions"]])
        np.testing.assert_allclose(got, expected[:40], rtol=1e-6)

    onnx_path = export_model(model_dir, "onnx", tmp_path / "m.onnx")
    assert json.loads((tmp_path / "export.json").read_text())["logit_shift"] == pytest.approx(math.log(w))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(["probabilities"], dict(zip(names, (t.numpy() for t in tensors[:len(names)]))))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
