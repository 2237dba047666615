"""deepfm explain: importance finds a planted teacher's fields and pair, attributions sum to the logit, and the
linear + FM attributions equal a brute-force pairwise computation over every individual feature."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import _serve_models as models
from deepfm.artifact import LoadedModel, load_model
from deepfm.config import config_from_dict
from deepfm.data.batch import input_from_chunk
from deepfm.data.readers import RawChunk
from deepfm.explain import attribute_input, attribution_columns, explain_data, explain_rows
from deepfm.pipeline import train
from deepfm.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ["a", "b", "n1", "n2", "n3", "const"]  # the teacher reads a, b and the pair (a, b); const never varies


def planted_frame(n: int, seed: int) -> pl.DataFrame:
    """A teacher over 6 categorical fields: main effects of ``a`` and ``b`` and a strong ``a`` x ``b``
    interaction; ``n1..n3`` are noise, ``const`` is one value everywhere."""
    teacher = np.random.default_rng(0)  # the same teacher for every split
    main_a, main_b = teacher.normal(0, 1.0, 12), teacher.normal(0, 1.0, 12)
    u_a, u_b = teacher.choice([-1.0, 1.0], 12), teacher.choice([-1.0, 1.0], 12)
    rng = np.random.default_rng(seed)
    cols = {c: rng.integers(0, 12, n) for c in PLANTED[:5]}
    logit = main_a[cols["a"]] + main_b[cols["b"]] + 2.0 * u_a[cols["a"]] * u_b[cols["b"]] - 0.5
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pl.DataFrame({"label": label, **{c: [f"{c}{v}" for v in cols[c]] for c in PLANTED[:5]},
                         "const": ["k"] * n})


@functools.lru_cache(maxsize=None)
def planted_data() -> tuple[Path, Path]:
    folder = models.workdir() / "planted"
    folder.mkdir(parents=True, exist_ok=True)
    planted_frame(8000, 1).write_csv(folder / "train.csv")
    planted_frame(3000, 2).write_csv(folder / "valid.csv")
    return folder / "train.csv", folder / "valid.csv"


def _planted_config(train_csv: Path, valid_csv: Path, **train_over) -> dict:
    return {"data": {"format": "csv", "train": str(train_csv), "valid": str(valid_csv),
                     "cache_dir": str(models.workdir() / "cache")},
            "fields": [{"names": PLANTED}],
            "model": {"embed_dim": 8, "hidden_units": [16, 16]},
            "train": {"epochs": 4, "batch_size": 128, "lr": 0.01, "progress": False, "precision": "fp32",
                      "seed": 1, **train_over}}


@functools.lru_cache(maxsize=None)
def planted_model() -> Path:
    out = models.workdir() / "planted-model"
    train(config_from_dict(_planted_config(*planted_data())), out, log=models._quiet)
    return out


@functools.lru_cache(maxsize=None)
def planted_further_bf16() -> Path:
    """The planted model trained one epoch further (--init-from) on new rows, in bf16."""
    folder = models.workdir() / "planted"
    planted_frame(3000, 3).write_csv(folder / "day2.csv")
    out = models.workdir() / "planted-day2"
    cfg = _planted_config(folder / "day2.csv", planted_data()[1], epochs=1, precision="bf16")
    train(config_from_dict(cfg), out, log=models._quiet, init_from=planted_model())
    return out


def test_importance_ranks_the_teachers_fields_and_pair_first():
    loaded = load_model(planted_model())
    report = explain_data(loaded, str(planted_data()[1]), seeds=3)
    ranked = [r["field"] for r in report["importance"]]
    assert set(ranked[:2]) == {"a", "b"}, report["importance"]
    top = report["importance"][0]
    assert top["auc_drop"] > 0.05 and top["auc_drop_interval"][0] > 0.02  # far from noise
    assert set(report["pairs"][0]["fields"]) == {"a", "b"}, report["pairs"][:3]
    assert report["pairs"][0]["strength"] > 3 * report["pairs"][1]["strength"]
    const = next(r for r in report["importance"] if r["field"] == "const")
    assert const["auc_drop"] == 0.0 and const["auc_drop_interval"] == [0.0, 0.0]  # shuffling one value: no change
    assert abs(const["logloss_increase"]) == 0.0
    # set to missing, it moves from its one trained row to the untrained out-of-vocabulary one: a near-constant shift
    assert abs(const["auc_drop_missing"]) < 0.01 < top["auc_drop_missing"]
    shares = report["decomposition"]
    assert sum(v["share"] for v in shares.values()) == pytest.approx(1.0, abs=1e-9)
    predictor = Predictor(loaded, device="cpu")
    logits = np.concatenate([predictor.runtime.logits(_inputs(loaded, frame)) for frame in
                             pl.read_csv(planted_data()[1]).iter_slices(100_000)])
    assert sum(v["mean"] for v in shares.values()) == pytest.approx(logits.mean(), abs=1e-5)
    assert min(shares[k]["share"] for k in ("linear", "fm", "dnn")) > 0.02  # each part carries some signal


def test_cli_explain_writes_json_and_pngs(tmp_path):
    out = tmp_path / "explain"
    proc = subprocess.run([sys.executable, "-m", "deepfm", "explain", str(planted_model()),
                           str(planted_data()[1]), "--json", "--seeds", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["importance"][0]) >= {"field", "auc_drop", "auc_drop_interval", "logloss_increase",
                                            "auc_drop_missing"}
    drops = [r["auc_drop"] for r in report["importance"]]
    assert drops == sorted(drops, reverse=True)
    strengths = [p["strength"] for p in report["pairs"]]
    assert strengths == sorted(strengths, reverse=True) and len(strengths) == 6 * 5 // 2
    assert json.loads((out / "explain.json").read_text())["pairs"] == report["pairs"]
    for png in ("importance.png", "pairs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([sys.executable, "-m", "deepfm", "explain", str(planted_model()),
                            str(planted_data()[1]), "--seeds", "1"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "strongest field pairs" in table.stdout and "a x b" in table.stdout


def _inputs(loaded: LoadedModel, frame: pl.DataFrame):
    chunk = RawChunk("<test>", frame.drop(loaded.config.data.label, strict=False),
                     np.arange(1, frame.height + 1, dtype=np.int64), 0)
    return input_from_chunk(loaded.encoder.transform(chunk, labels=False))


def _multi_frame(n: int) -> pl.DataFrame:
    rows = models.multi_rows(n, 7)
    return pl.DataFrame(rows, schema=models.MULTI_COLUMNS, orient="row")


@pytest.mark.parametrize("which", ["planted", "multi", "criteo", "bf16-init-from"])
def test_attributions_sum_to_the_models_logit(which):
    if which == "planted":
        path, frame = planted_model(), planted_frame(500, 5)
    elif which == "bf16-init-from":
        path, frame = planted_further_bf16(), planted_frame(500, 5)
    elif which == "multi":
        path, frame = models.multi_model(), _multi_frame(400)
    else:
        path = models.criteo_model()
        frame = pl.read_csv(ROOT / "examples/criteo/data/test.tsv", separator="\t", has_header=False,
                            new_columns=list(load_model(path).config.data.column_names or []),
                            infer_schema_length=0)
    predictor = Predictor(path, device="cpu")
    inp = _inputs(predictor.loaded, frame)
    logit = predictor.runtime.logits(inp)  # the scoring path deepfm predict takes (fused, native kernels)
    attr = attribute_input(predictor.loaded, inp, batch=128)  # several batches
    assert attr.dnn.std() > 0 and attr.fm.std() > 0
    np.testing.assert_allclose(attr.logit, logit, rtol=0, atol=1e-4)
    cols = attribution_columns(attr)
    assert list(cols)[:1] == ["attr_bias"] and len(cols) == 1 + len(predictor.loaded.layout.field_order)
    np.testing.assert_allclose(sum(cols.values()), logit, rtol=0, atol=1e-4)
    api = explain_rows(predictor.loaded, frame)  # the DataFrame API gives the same numbers
    np.testing.assert_allclose(api.to_numpy().sum(axis=1), logit, rtol=0, atol=1e-4)
    assert api.columns == list(cols)


def _brute_force(loaded: LoadedModel, inp) -> tuple[np.ndarray, np.ndarray]:
    """Per-field linear and FM shares by listing every individual feature (table row, value) of each row and
    summing c_p c_q <v_p, v_q> over pairs of features, half to each one's field: float64, no shortcuts."""
    table = loaded.model.embedding.weight.detach().double().numpy()
    layout, d = loaded.layout, loaded.config.model.embed_dim
    b = len(inp)
    n_cat, n_num = len(layout.cat_fields), len(layout.num_fields)
    tags = [[[] for _ in range(len(layout.multi_fields))] for _ in range(b)]
    bags = inp.multi_bags.numpy()
    for tag_id, w, bag in zip(inp.multi_ids.numpy(), inp.multi_weights.double().numpy(), bags):
        tags[bag % b][bag // b].append((int(tag_id), float(w)))
    linear, fm = np.zeros((b, layout.num_fields_total)), np.zeros((b, layout.num_fields_total))
    for r in range(b):
        feats = [(f, layout.cat_offsets[f] + int(inp.cat_ids[r, f]), 1.0) for f in range(n_cat)]
        for j in range(n_num):
            v = float(inp.num_values[r, j])
            feats.append((n_cat + j, layout.num_offsets[j] + int(np.isnan(v)), 1.0 if np.isnan(v) else v))
        for m, combiner in enumerate(layout.multi_combiners):
            ws = np.array([w for _, w in tags[r][m]])
            denom = {"sum": 1.0, "mean": ws.sum(), "sqrtn": np.sqrt((ws ** 2).sum())}[combiner] if len(ws) else 1.0
            denom = denom or 1.0
            feats += [(n_cat + n_num + m, layout.multi_offsets[m] + t, w / denom) for t, w in tags[r][m]]
        for p, (fp, rp, cp) in enumerate(feats):
            linear[r, fp] += cp * table[rp, d]
            for fq, rq, cq in feats[p + 1:]:
                term = cp * cq * float(table[rp, :d] @ table[rq, :d])
                fm[r, fp] += term / 2
                fm[r, fq] += term / 2
    return linear, fm


def test_linear_and_fm_attributions_equal_brute_force_pairs():
    """Weighted multi-valued fields (mean, sqrtn, sum), scaled / standardized numeric fields with missing values,
    a hashed vocabulary and two fields sharing one."""
    loaded = load_model(models.multi_model())
    inp = _inputs(loaded, _multi_frame(60))
    assert (inp.num_values.isnan().any() and len(inp.multi_ids) > 0
            and len(set(loaded.layout.multi_offsets)) < len(loaded.layout.multi_offsets))
    with torch.no_grad():  # the trained table is near its tiny init: make the terms large enough to compare
        loaded.model.embedding.weight.mul_(50.0)
    attr = attribute_input(loaded, inp)
    linear, fm = _brute_force(loaded, inp)
    scale = np.abs(fm).max()
    assert scale > 1e-2
    np.testing.assert_allclose(attr.linear, linear, rtol=0, atol=1e-6 * max(np.abs(linear).max(), 1))
    np.testing.assert_allclose(attr.fm, fm, rtol=0, atol=1e-6 * scale)
    with torch.no_grad():  # logits ~20 from the enlarged table: the float32 model agrees to its own rounding
        logit = loaded.model(*inp.tensors()).double().numpy()
    np.testing.assert_allclose(attr.logit, logit, rtol=2e-5, atol=1e-4)


def test_predict_explain_writes_attributions_summing_to_the_logit(tmp_path):
    """``deepfm predict --explain`` on a file with multi-valued and numeric fields, in several chunks."""
    data = models.write_csv(tmp_path / "rows.csv", models.multi_rows(300, 11))
    out = tmp_path / "pred.parquet"
    proc = subprocess.run([sys.executable, "-m", "deepfm", "predict", str(models.multi_model()), str(data),
                           "--output", str(out), "--explain"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = pl.read_parquet(out)
    loaded = load_model(models.multi_model())
    names = [f"attr_{f}" for f in loaded.layout.field_order]
    assert got.columns == ["row", "probability", "attr_bias", *names]
    p = got["probability"].to_numpy()
    total = got.select(["attr_bias", *names]).to_numpy().sum(axis=1)
    np.testing.assert_allclose(total, np.log(p) - np.log1p(-p), rtol=0, atol=1e-4)
    frame = pl.read_csv(data, infer_schema_length=0)
    expected = explain_rows(loaded, frame)
    np.testing.assert_allclose(got.select(expected.columns).to_numpy(), expected.to_numpy(), rtol=0, atol=1e-9)
    plain = tmp_path / "plain.csv"
    subprocess.run([sys.executable, "-m", "deepfm", "predict", str(models.multi_model()), str(data), "--output",
                    str(plain)], check=True, capture_output=True, timeout=300)
    assert pl.read_csv(plain).columns == ["row", "probability"]  # off by default


def test_classifier_explain_returns_a_frame_of_the_inputs_kind():
    pd = pytest.importorskip("pandas")
    from deepfm import DeepFMClassifier

    clf = DeepFMClassifier.load(planted_model())
    frame = planted_frame(200, 9)
    got = clf.explain(frame.to_pandas())
    assert isinstance(got, pd.DataFrame) and list(got.columns) == ["attr_bias"] + [f"attr_{f}" for f in PLANTED]
    np.testing.assert_allclose(got.to_numpy().sum(axis=1), clf.decision_function(frame.to_pandas()),
                               rtol=0, atol=1e-4)
    as_polars = clf.explain(frame)
    assert isinstance(as_polars, pl.DataFrame)
    np.testing.assert_array_equal(as_polars.to_numpy(), got.to_numpy())


def test_server_explanation_equals_predict_explain(tmp_path):
    """``"explain": true`` gives each row the attributions ``deepfm predict --explain`` writes for it; off by
    default, and over its own row limit a 413."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deepfm.serve.app import create_app
    from deepfm.serve.settings import ServeSettings

    rows = models.multi_rows(40, 13)
    data = models.write_csv(tmp_path / "rows.csv", rows)
    out = tmp_path / "pred.csv"
    subprocess.run([sys.executable, "-m", "deepfm", "predict", str(models.multi_model()), str(data), "--output",
                    str(out), "--explain"], check=True, capture_output=True, timeout=300)
    expected = pl.read_csv(out)
    client = TestClient(create_app(models.multi_model(), ServeSettings(max_explain_rows=40)))
    body = [{"id": i, "features": {c: v for c, v in zip(models.MULTI_COLUMNS[1:], r[1:]) if v != ""}}
            for i, r in enumerate(rows)]
    resp = client.post("/v1/predict", json={"rows": body, "explain": True})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    names = [c for c in expected.columns if c.startswith("attr_")]
    assert list(preds[0]["attributions"]) == names
    got = np.array([[p["attributions"][c] for c in names] for p in preds])
    np.testing.assert_allclose(got, expected.select(names).to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose([p["probability"] for p in preds], expected["probability"].to_numpy(), rtol=1e-12)
    plain = client.post("/v1/predict", json={"rows": body[:3]}).json()["predictions"]
    assert all("attributions" not in p or p["attributions"] is None for p in plain)
    too_many = client.post("/v1/predict", json={"rows": body + body[:1], "explain": True})
    assert too_many.status_code == 413 and "explain" in too_many.text


def test_shuffling_or_blanking_a_multi_valued_field_moves_each_rows_bag_whole():
    from deepfm.data.batch import EncodedChunk, MultiValues
    from deepfm.explain.importance import replace_field

    lengths = np.array([2, 0, 3, 1], dtype=np.int64)
    ids, weights = np.arange(1, 7, dtype=np.int64) * 10, np.linspace(0.5, 3.0, 6).astype(np.float32)
    cat, num = np.array([[1], [2], [3], [4]]), np.array([[0.5], [np.nan], [1.5], [2.5]], dtype=np.float32)
    enc = EncodedChunk(None, cat, num, [MultiValues(ids, weights, lengths)], np.ones(4, dtype=bool))
    bags = np.split(np.stack([ids, weights]), np.cumsum(lengths)[:-1], axis=1)
    perm = np.array([2, 0, 3, 1])
    got = replace_field(enc, 2, perm, None)
    got_bags = np.split(np.stack([got.multi[0].ids, got.multi[0].weights]), np.cumsum(got.multi[0].lengths)[:-1],
                        axis=1)
    for r in range(4):
        np.testing.assert_array_equal(got_bags[r], bags[perm[r]])
    assert got.cat_ids is cat and got.num_values is num  # the other fields untouched
    shuffled_num = replace_field(enc, 1, perm, None).num_values[:, 0]
    np.testing.assert_array_equal(shuffled_num, num[perm, 0])
    empty = EncodedChunk(None, np.array([[0]]), np.array([[np.nan]], dtype=np.float32),
                         [MultiValues(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(1, np.int64))],
                         np.ones(1, dtype=bool))
    blank = replace_field(enc, 2, None, empty)
    assert blank.multi[0].lengths.tolist() == [0, 0, 0, 0] and len(blank.multi[0].ids) == 0
    assert replace_field(enc, 0, None, empty).cat_ids[:, 0].tolist() == [0, 0, 0, 0]


def test_gauc_drop_when_the_model_has_a_group_column():
    from deepfm.metrics import group_auc

    loaded = load_model(planted_model())
    data = loaded.config.data.model_copy(update={"group_column": "n1"})
    loaded.config = loaded.config.model_copy(update={"data": data})
    valid = pl.read_csv(planted_data()[1])
    report = explain_data(loaded, str(planted_data()[1]), seeds=2)
    probs = Predictor(loaded, device="cpu").predict_proba(valid)
    assert report["base"]["gauc"] == pytest.approx(group_auc(valid["label"].to_numpy(), probs,
                                                             valid["n1"].to_numpy()), abs=1e-12)
    by_field = {r["field"]: r for r in report["importance"]}
    assert by_field["a"]["gauc_drop"] > 0.02 and len(by_field["a"]["gauc_drop_interval"]) == 2
    assert by_field["const"]["gauc_drop"] == 0.0 and "gauc_drop_missing" in by_field["const"]


def test_cli_explain_rejects_bad_counts_and_unlabelled_data(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "deepfm", "explain", str(planted_model()), str(planted_data()[1]),
                          "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds: must be at least 1, got 0" in bad.stderr
    unlabelled = tmp_path / "unlabelled.csv"
    planted_frame(50, 4).drop("label").write_csv(unlabelled)
    proc = subprocess.run([sys.executable, "-m", "deepfm", "explain", str(planted_model()), str(unlabelled)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no label column 'label'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model_cfg", [{"head": "project"}, {"use_deep": False}, {"use_fm": False},
                                       {"batch_norm": True, "dropout": 0.3}, {"use_linear": False, "head": "project"}])
def test_attributions_sum_to_the_logit_for_every_head_and_part(model_cfg):
    from deepfm.config import ModelConfig
    from deepfm.model import DeepFM

    loaded = load_model(models.multi_model())
    torch.manual_seed(0)
    model = DeepFM(loaded.layout, ModelConfig(embed_dim=8, hidden_units=[16, 16], init_std=0.1, **model_cfg))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        model.bias.fill_(0.25)
        model.embedding.weight[:, -1].normal_(0, 0.1)  # first-order weights (zero at init)
    model.eval()
    inp = _inputs(loaded, _multi_frame(120))
    loaded.model = model
    attr = attribute_input(loaded, inp, batch=50)
    with torch.no_grad():
        logit = model(*inp.tensors()).double().numpy()
    assert np.abs(logit).max() > 0.5  # weights large enough that every part matters
    np.testing.assert_allclose(attr.logit, logit, rtol=0, atol=1e-4)
    for part, used in (("fm", model_cfg.get("use_fm", True)), ("dnn", model_cfg.get("use_deep", True)),
                       ("linear", model_cfg.get("use_linear", True))):
        assert (np.abs(getattr(attr, part)).max() > 0) == used, part


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attributions_and_importance_on_cuda_match_the_cpu():
    cpu, gpu = load_model(planted_model()), load_model(planted_model(), "cuda")
    inp = _inputs(cpu, planted_frame(300, 6))
    a_cpu, a_gpu = attribute_input(cpu, inp), attribute_input(gpu, inp)
    np.testing.assert_allclose(a_gpu.per_field, a_cpu.per_field, rtol=0, atol=1e-4)
    logit = Predictor(gpu, device="cuda").runtime.logits(inp)
    np.testing.assert_allclose(a_gpu.logit, logit, rtol=0, atol=1e-4)
    r_cpu = explain_data(cpu, str(planted_data()[1]), seeds=2)
    r_gpu = explain_data(gpu, str(planted_data()[1]), seeds=2, device="cuda")
    assert [r["field"] for r in r_gpu["importance"]][:2] == [r["field"] for r in r_cpu["importance"]][:2]
    assert r_gpu["pairs"][0]["fields"] == r_cpu["pairs"][0]["fields"]
