"""deepfm serve: the same probabilities as deepfm predict, 4xx for every client mistake, reload, metrics, fuzz."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import _serve_models as models  # noqa: E402
from deepfm.cli import main as cli_main  # noqa: E402
from deepfm.config import CRITEO_COLUMNS  # noqa: E402
from deepfm.data.loader import make_input  # noqa: E402
from deepfm.data.readers import RawChunk  # noqa: E402
from deepfm.serve.app import ServedModel, Settings, create_app  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
TEST_TSV = models.CRITEO / "data" / "test.tsv"
TOKEN = "s3cret-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def criteo_dir() -> Path:
    return models.criteo_model()


@pytest.fixture(scope="module")
def multi_dir() -> Path:
    return models.multi_model()


@pytest.fixture(scope="module")
def criteo_client(criteo_dir):
    return TestClient(create_app(criteo_dir, Settings(max_rows=500, max_body_bytes=2_000_000)))


@pytest.fixture(scope="module")
def multi_client(multi_dir):
    return TestClient(create_app(multi_dir))


def criteo_frame() -> pl.DataFrame:
    return pl.read_csv(TEST_TSV, separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                       infer_schema_length=0)


def as_json_rows(df: pl.DataFrame, numeric: tuple[str, ...] = (), label: str = "label") -> list[dict]:
    """Rows as the API takes them: empty cells left out, the given columns as JSON numbers."""
    rows = []
    for i, r in enumerate(df.iter_rows(named=True)):
        feats = {}
        for k, v in r.items():
            if k == label or v is None or v == "":
                continue
            feats[k] = float(v) if k in numeric else v
        rows.append({"id": f"r{i}", "features": feats})
    return rows


def text_to_pairs(cell: str | None) -> list | None:
    if not cell:
        return None
    out = []
    for item in cell.split("^"):
        if ":" in item:
            tag, w = item.rsplit(":", 1)
            out.append([tag, float(w)])
        else:
            out.append(item)
    return out


def predict_cli(model_dir: Path, data: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / f"pred-{data.stem}.parquet"
    assert cli_main(["predict", str(model_dir), str(data), "--output", str(out), "--no-progress"]) == 0
    return pl.read_parquet(out)["probability"].to_numpy()


def probs_of(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([p["probability"] for p in resp.json()["predictions"]])


# ------------------------------------------------------------------------- same numbers as deepfm predict
def test_server_equals_deepfm_predict_criteo(criteo_client, criteo_dir, tmp_path):
    expected = predict_cli(criteo_dir, TEST_TSV, tmp_path)
    rows = as_json_rows(criteo_frame())
    resp = criteo_client.post("/v1/predict", json={"rows": rows})
    got = probs_of(resp)
    assert [p["id"] for p in resp.json()["predictions"]] == [r["id"] for r in rows]
    assert len(got) == 391 and np.array_equal(got, expected)
    # numeric fields as JSON numbers instead of text: the same numbers
    got_num = probs_of(criteo_client.post("/v1/predict", json={
        "rows": as_json_rows(criteo_frame(), numeric=tuple(f"I{i}" for i in range(1, 14)))}))
    assert np.array_equal(got_num, expected)


def test_server_equals_deepfm_predict_multi(multi_client, multi_dir, tmp_path):
    valid = models.workdir() / "multi-data" / "valid.csv"
    expected = predict_cli(multi_dir, valid, tmp_path)
    df = pl.read_csv(valid, infer_schema_length=0)
    text_rows = as_json_rows(df)
    assert np.array_equal(probs_of(multi_client.post("/v1/predict", json={"rows": text_rows})), expected)
    # multi-valued fields as lists of tags / [tag, weight] pairs, numbers as numbers: identical
    list_rows = [{"id": r["id"], "features": _list_form(r["features"])} for r in text_rows]
    assert np.array_equal(probs_of(multi_client.post("/v1/predict", json={"rows": list_rows})), expected)
    # text and list forms mixed in one request
    mixed = [t if i % 2 else li for i, (t, li) in enumerate(zip(text_rows, list_rows))]
    assert np.array_equal(probs_of(multi_client.post("/v1/predict", json={"rows": mixed})), expected)


def _list_form(features: dict) -> dict:
    """The synthetic model's row with multi-valued fields as [tag, weight] lists and numbers as numbers."""
    f = dict(features)
    for k in ("tags", "cats", "query"):
        if k in f:
            f[k] = text_to_pairs(f[k])
    for k in ("price", "age", "clicks"):
        if k in f:
            f[k] = float(f[k])
    return f


def _encoder_arrays(served: ServedModel, rows: list[dict]):
    """The batch encoder on the same validated rows, as the frame path builds them."""
    from deepfm.serve.encode import build_frame

    frame = build_frame(rows, served.loaded.encoder.codecs, "^", ":")
    enc = served.loaded.encoder.transform(RawChunk("<t>", frame, np.arange(1, len(rows) + 1), 0), labels=False)
    return enc.cat_ids, enc.num_values, [(m.ids, m.weights, m.lengths) for m in enc.multi]


def _assert_same_input(a, b):
    ia, ib = make_input(*a), make_input(*b)
    for x, y in zip(ia.tensors(), ib.tensors()):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.numpy(), y.numpy(), equal_nan=True)


@pytest.mark.parametrize("which", ["criteo", "multi"])
def test_fast_path_identical_to_encoder(which, criteo_dir, multi_dir):
    if which == "criteo":
        served = ServedModel.load(criteo_dir)
        raw = [r["features"] for r in as_json_rows(criteo_frame(), numeric=tuple(f"I{i}" for i in range(1, 14)))]
    else:
        served = ServedModel.load(multi_dir)
        valid = pl.read_csv(models.workdir() / "multi-data" / "valid.csv", infer_schema_length=0)
        raw = [_list_form(r["features"]) for r in as_json_rows(valid)]
        raw += [{"price": -5.0, "age": 0, "clicks": 2.5, "tags": [], "cats": ["t1", "t1", "t2"]},
                {"clicks": -1e30, "price": 1e-300, "query": [["q1", 0.0]], "user": 17, "site": 3.5}]
    rows = served.validate(raw)
    assert served.fast.eligible(rows)
    _assert_same_input(served.fast.encode(rows), _encoder_arrays(served, rows))  # whole batch
    for i in range(0, len(rows), 7):  # and row by row, with the same probabilities as predict_proba
        one = rows[i:i + 1]
        _assert_same_input(served.fast.encode(one), _encoder_arrays(served, one))
        from deepfm.serve.encode import frame_probs

        assert np.array_equal(served.fast.probs(one), frame_probs(served.predictor, one))


def test_log_bucket_matches_polars():
    from deepfm.config import NumericField
    from deepfm.data.codecs import LogBucketCodec

    codec = LogBucketCodec(NumericField(name="v", kind="numeric"))
    values = [0.0, 0.5, 1.0, 1.9999, 2.0, 2.0000001, 3.0, -0.5, -1.5, -3.7, math.e ** 2, math.e ** 3, 7.389056,
              20.085536923187668, 1e10, 1e18, 1e300, -1e18, -1e19, -9.3e18, 123456.789]
    values += list(np.random.default_rng(0).lognormal(2, 3, 2000))
    frame = pl.DataFrame({"v": pl.Series(values, dtype=pl.Float64)})
    expected = frame.select(codec.token_expr(pl.col("v"), pl.Float64))["v"].to_list()
    assert [codec.record_token(v) for v in values] == expected


def test_missing_values_like_empty_cells(criteo_client):
    df = criteo_frame().head(1)
    full = as_json_rows(df)[0]["features"]
    absent = {k: v for k, v in full.items() if k not in ("C3", "I2")}
    nulls = dict(absent, C3=None, I2=None)
    empty = dict(absent, C3="", I2="")
    p = [probs_of(criteo_client.post("/v1/predict", json={"rows": [{"features": f}]}))[0]
         for f in (absent, nulls, empty)]
    assert p[0] == p[1] == p[2]
    # ...and like an empty cell read by the batch path
    from deepfm.predict import Predictor

    frame = df.drop("label").with_columns(pl.lit("").alias("C3"), pl.lit("").alias("I2"))
    assert np.array_equal(Predictor(criteo_client.app.state.serving.path).predict_proba(frame), [p[0]])


# ------------------------------------------------------------------------- client errors
BAD = [
    # (body or raw bytes, status, substrings of the message)
    (b'{"rows": [{"features": ', 400, ["malformed JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    ({"rows": "nope"}, 422, ["field 'rows'", "valid list"]),
    ({"rows": [{"features": {"C1": "x"}}, {"id": 2}]}, 422, ["row 1", "field 'features'", "required"]),
    ({"rows": [{"features": {}, "extra": 1}]}, 422, ["row 0", "field 'extra'", "unknown"]),
    ({"rows": [{"features": {}}, {"features": {"C99": "a"}}]}, 422, ["row 1", "field 'C99'", "unknown field"]),
    ({"rows": [{"features": {"label": 1}}]}, 422, ["row 0", "field 'label'", "label column"]),
    ({"rows": [{"features": {}}, {"features": {}}, {"features": {"I3": "abc"}}]}, 422,
     ["row 2", "field 'I3'", "'abc' is not a decimal number"]),
    ({"rows": [{"features": {"I3": [1, 2]}}]}, 422, ["row 0", "field 'I3'", "numeric field", "list"]),
    ({"rows": [{"features": {"I3": True}}]}, 422, ["row 0", "field 'I3'", "boolean"]),
    ({"rows": [{"features": {"C1": {"a": 1}}}]}, 422, ["row 0", "field 'C1'", "categorical", "object"]),
    ({"rows": [{"features": {"I4": "1e999"}}]}, 422,
     ["row 0", "field 'I4'", "'1e999' is not a decimal number within float32"]),
    (b'{"rows": [{"features": {"I4": NaN}}]}', 422, ["row 0", "field 'I4'", "finite"]),
    ({"rows": [{"features": {}}] * 501}, 413, ["501 rows", "limit of 500"]),
    ({"rows": [{"id": "x" * 3_000_000, "features": {}}]}, 413, ["exceeds the limit"]),
]


@pytest.mark.parametrize("body,status,needles", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_are_4xx_naming_row_and_field(criteo_client, body, status, needles):
    if isinstance(body, bytes):
        resp = criteo_client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    else:
        resp = criteo_client.post("/v1/predict", json=body)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    for n in needles:
        assert n in detail, (n, detail)
    # the worker is still fine
    assert criteo_client.get("/healthz").json()["status"] == "ok"


def test_bad_requests_multi_fields(multi_client):
    cases = [
        ({"tags": [["a", "x"]]}, ["row 0", "field 'tags'", "weight of tag 'a' must be a number"]),
        ({"tags": [["a", 1.0, 2.0]]}, ["field 'tags'", "exactly 2"]),
        ({"tags": "a:x^b"}, ["row 0", "field 'tags'", "weight 'x' of tag 'a' is not a number"]),
        ({"cats": [None]}, ["field 'cats'", "tag must be a string"]),
        ({"query": 3}, ["field 'query'", "multi-valued field"]),
        ({"age": 3e38, "price": 1e38}, ["row 0", "non-finite"]),
    ]
    for feats, needles in cases:
        resp = multi_client.post("/v1/predict", json={"rows": [{"features": feats}]})
        assert resp.status_code == 422, resp.text
        for n in needles:
            assert n in resp.json()["detail"], (n, resp.json())
    chunked = multi_client.post("/v1/predict", content=iter([b'{"rows": [', b"]}"]),
                                headers={"content-type": "application/json"})
    assert chunked.status_code == 200 and chunked.json()["predictions"] == []


# ------------------------------------------------------------------------- metadata, metrics, openapi
def test_model_health_metrics_openapi(criteo_client, criteo_dir):
    info = criteo_client.get("/v1/model").json()
    assert [f["name"] for f in info["fields"]] == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert info["fields"][0]["kind"] == "numeric" and info["fields"][0]["vocab_size"] > 1
    assert info["metrics"] == json.loads((criteo_dir / "metrics.json").read_text())
    assert info["version"] == criteo_client.get("/healthz").json()["model_version"]
    criteo_client.post("/v1/predict", json={"rows": [{"features": {"C1": "x"}}]})
    criteo_client.post("/v1/predict", json={"rows": [{"features": {"C1": []}}]})
    text = criteo_client.get("/metrics").text
    assert models.metric(text, "deepfm_requests_total", path="/v1/predict", method="POST", code="200") >= 1
    assert models.metric(text, "deepfm_request_errors_total", path="/v1/predict", kind="client") >= 1
    assert models.metric(text, "deepfm_request_duration_seconds_bucket", path="/v1/predict", le="+Inf") >= 2
    assert models.metric(text, "deepfm_request_errors_total", path="/v1/predict", kind="server") is None
    spec = criteo_client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/v1/reload", "/healthz", "/metrics"} <= set(spec["paths"])


# ------------------------------------------------------------------------- reload
def _shifted_copy(src: Path, dst: Path, shift: float) -> Path:
    """A second model version: the same model with its bias moved."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state["bias"] = state["bias"] + shift
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "deepfm-model"})
    return dst


def test_reload_swaps_without_dropping_requests(criteo_dir, tmp_path):
    v1 = shutil.copytree(criteo_dir, tmp_path / "v1")
    v2 = _shifted_copy(criteo_dir, tmp_path / "v2", 1.0)
    client = TestClient(create_app(v1, Settings(admin_token=TOKEN)))  # reloads may load from tmp_path
    rows = as_json_rows(criteo_frame().head(3))
    before = client.post("/v1/predict", json={"rows": rows}).json()
    results, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            r = client.post("/v1/predict", json={"rows": rows})
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    bad = client.post("/v1/reload", json={"model_dir": str(tmp_path / "nope")}, headers=ADMIN)
    assert bad.status_code == 404 and "still serving" in bad.json()["detail"]
    ok = client.post("/v1/reload", json={"model_dir": str(v2)}, headers=ADMIN)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert ok.status_code == 200 and ok.json()["version"] != before["model_version"]
    after = client.post("/v1/predict", json={"rows": rows}).json()
    assert after["model_version"] == ok.json()["version"]
    assert all(a["probability"] > b["probability"] for a, b in zip(after["predictions"], before["predictions"]))
    assert results and all(code == 200 for code, _ in results)
    by_version = {before["model_version"]: before["predictions"], after["model_version"]: after["predictions"]}
    assert all(body["predictions"] == by_version[body["model_version"]] for _, body in results)
    assert models.metric(client.get("/metrics").text, "deepfm_model_reloads_total", result="ok") == 1
    assert models.metric(client.get("/metrics").text, "deepfm_model_reloads_total", result="failed") == 1


# ------------------------------------------------------------------------- fuzzing from the OpenAPI document
def test_fuzz_openapi_no_5xx(multi_dir):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    app = create_app(multi_dir, Settings(max_rows=50))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    budget = {"POST /v1/predict": 150, "POST /v1/reload": 25}  # bounded by example count, never by wall time
    seen: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=budget.get(op.label, 5), deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                resp = case.call()
                seen.setdefault(op.label, set()).add(resp.status_code)
                assert resp.status_code < 500, (case.body, resp.text)

            try:
                check()
            except Unsatisfiable:  # e.g. no invalid request exists for GET /healthz
                pass
    assert {200, 422} <= seen["POST /v1/predict"]
    text = app.state.metrics.render()
    assert 'kind="server"' not in text


# ------------------------------------------------------------------------- a real server on loopback
def test_uvicorn_end_to_end(criteo_dir, tmp_path):
    httpx = pytest.importorskip("httpx")
    port = models.free_port()
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", str(criteo_dir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(300):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                pytest.fail("server did not start: " + proc.stdout.read1().decode())
            expected = predict_cli(criteo_dir, TEST_TSV, tmp_path)
            rows = as_json_rows(criteo_frame())
            assert np.array_equal(probs_of(client.post("/v1/predict", json={"rows": rows})), expected)
            one = probs_of(client.post("/v1/predict", json={"rows": rows[:1]}))
            assert abs(one[0] - expected[0]) < 1e-6  # batch of 1 vs 391: float32 matmul rounding only
            bad = client.post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"})
            assert bad.status_code == 400
            proc.send_signal(signal.SIGHUP)  # reload the current directory
            for _ in range(100):
                if models.metric(client.get("/metrics").text, "deepfm_model_reloads_total", result="ok") == 1:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("SIGHUP did not reload")
            assert np.array_equal(probs_of(client.post("/v1/predict", json={"rows": rows})), expected)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
