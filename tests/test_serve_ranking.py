"""Ranking requests (one user, hundreds of candidate rows): checked column by column and encoded by the
per-record engine in numpy, with the same normalised values, the same arrays and probabilities as the batch
encoder, and the same messages when something is wrong; the body read with orjson only where it reads it as
Python's JSON reader does."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import _serve_models as models  # noqa: E402
from deepfm.config import CRITEO_COLUMNS  # noqa: E402
from deepfm.data.readers import RawChunk  # noqa: E402
from deepfm.serve.app import ServedModel, ServeSettings, create_app  # noqa: E402
from deepfm.serve.encode import RequestRows, build_frame  # noqa: E402
from deepfm.serve.lane import parse_json  # noqa: E402

NUMERIC = tuple(f"I{i}" for i in range(1, 14))


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return ServedModel.load(models.criteo_model())


def _features(n: int) -> list[dict]:
    df = pl.read_csv(models.CRITEO / "data" / "test.tsv", separator="\t", has_header=False,
                     new_columns=CRITEO_COLUMNS, infer_schema_length=0)
    rows = [{k: (float(v) if k in NUMERIC else v) for k, v in r.items() if k != "label" and v not in (None, "")}
            for r in df.head(n).iter_rows(named=True)]
    # what else a client sends: integers, nulls, edge numbers, unknown categories, numbers for categories
    for i, r in enumerate(rows):
        if i % 5 == 0:
            r["I1"] = int(r.get("I1", 0))
        if i % 7 == 0:
            r["C3"], r["I2"] = None, None
        if i % 11 == 0:
            r["I5"], r["C4"] = 3.4e38, "never seen"
        if i % 13 == 0:
            r["I6"] = -2.5
    return rows


def _one_by_one(served: ServedModel, raw: list[dict]) -> RequestRows:
    from deepfm.serve.encode import _checked_values

    return RequestRows.from_rows(_checked_values(raw, served.fields, "label"))


def _columns(rows: RequestRows, names) -> dict[str, list[tuple[type, str]]]:
    return {k: [(type(v), repr(v)) for v in rows.column(k)] for k in names}


def _encoder_arrays(served: ServedModel, rows: RequestRows):
    frame = build_frame(rows, served.loaded.encoder.codecs, "^", ":")
    enc = served.loaded.encoder.transform(RawChunk("<t>", frame, np.arange(1, len(rows) + 1), 0), labels=False)
    return enc.cat_ids, enc.num_values, [(m.ids, m.weights, m.lengths) for m in enc.multi]


@pytest.mark.parametrize("variant", ["plain", "categories as numbers", "numeric text"])
def test_a_ranking_request_is_checked_by_columns_as_value_by_value(served, variant):
    raw = _features(300)
    if variant == "categories as numbers":  # a column the codec checks value by value: still by columns
        for i, r in enumerate(raw[::3]):
            r["C1"] = i * 1.0 if i % 2 else i
    elif variant == "numeric text":
        for r in raw[::4]:
            r["I3"] = " 17 "
    rows = served.validate(raw)
    assert _columns(rows, served.fields) == _columns(_one_by_one(served, raw), served.fields)
    assert served.fast.eligible(rows) == (variant != "numeric text")
    expected = _encoder_arrays(served, rows)
    if served.fast.eligible(rows):
        got = served.fast.encode(rows)
        for a, b in zip(got[:2], expected[:2]):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.int32) if a.dtype == np.float32 else a,
                                                         b.view(np.int32) if b.dtype == np.float32 else b)


def test_ranking_probabilities_equal_the_batch_path():
    raw = _features(300)
    body = {"rows": [{"id": i, "features": f} for i, f in enumerate(raw)]}
    fast = create_app(models.criteo_model())
    frame = create_app(models.criteo_model(), ServeSettings(fast_path_max_rows=0))
    a = TestClient(fast).post("/v1/predict", json=body)
    b = TestClient(frame).post("/v1/predict", json=body)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert [p["id"] for p in a.json()["predictions"]] == list(range(300))
    text = fast.state.metrics.render()
    assert models.metric(text, "deepfm_predict_batches_total", path="fast") == 1
    assert models.metric(frame.state.metrics.render(), "deepfm_predict_batches_total", path="frame") == 1


def test_bf16_serving_is_close_to_float32_says_so_and_both_paths_agree():
    """``--precision bf16``: matrix products in bfloat16 (autocast; emulated, and slower, on a CPU without
    AMX or AVX512-BF16, but the same numbers). The probabilities stay close to float32's, the per-record and
    batch paths still give identical ones, and the version and /v1/model say which precision serves."""
    raw = _features(300)
    body = {"rows": [{"id": i, "features": f} for i, f in enumerate(raw)]}
    fp32 = TestClient(create_app(models.criteo_model())).post("/v1/predict", json=body).json()
    apps = [create_app(models.criteo_model(), ServeSettings(precision="bf16", fast_path_max_rows=n)) for n in (10_000, 0)]
    fast, frame = (TestClient(app).post("/v1/predict", json=body).json() for app in apps)
    assert fast == frame
    p16 = np.array([p["probability"] for p in fast["predictions"]])
    p32 = np.array([p["probability"] for p in fp32["predictions"]])
    assert 0 < np.abs(p16 - p32).max() < 1e-2
    assert fast["model_version"] == fp32["model_version"] + "-bf16"
    info = TestClient(apps[0]).get("/v1/model").json()
    assert info["precision"] == "bf16" and info["version"].endswith("-bf16")
    assert TestClient(create_app(models.criteo_model())).get("/v1/model").json()["precision"] == "fp32"


def test_a_ranking_request_with_problems_gets_the_value_by_value_messages():
    raw = _features(40)
    raw[35]["I3"] = True
    raw[38]["colour"] = "red"
    raw[39]["C2"] = [1]
    resp = TestClient(create_app(models.criteo_model())).post(
        "/v1/predict", json={"rows": [{"features": f} for f in raw]})
    assert resp.status_code == 422
    errors = resp.json()["errors"]
    assert [(e["row"], e["field"]) for e in errors] == [(35, "I3"), (38, "colour"), (39, "C2")]
    assert errors[0]["message"] == "a numeric field takes a number or a numeric string, got a boolean"
    assert errors[1]["message"].startswith("unknown field; the model's fields are ")
    assert errors[2]["message"] == "a categorical field takes a string (or a number), got a list"


@pytest.mark.parametrize("body", [
    b'{"rows": [{"id": 1, "features": {"I1": 2.5}}]}',
    b'{"rows": [{"id": 123456789012345678901234567890, "features": {"C1": 98765432109876543210}}]}',
    b'{"rows": [{"id": -9223372036854775809, "features": {}}]}',
    b'{"rows": [{"id": 18446744073709551615, "features": {}}]}',
    b'{"rows": [{"id": NaN, "features": {"I1": Infinity}}]}',
    b'{"rows": [{"id": "\\ud800", "features": {"I1": 1e400}}]}',
    b'\xef\xbb\xbf{"rows": []}',
    '{"rows": [{"id": "\u00e9", "features": {"C1": "\u4e2d"}}]}'.encode(),
])
def test_the_body_is_read_as_pythons_json_reader_reads_it(body):
    try:
        expected = repr(json.loads(body))
    except ValueError as err:
        with pytest.raises(type(err)):
            parse_json(body)
        return
    assert repr(parse_json(body)) == expected


def test_ids_beyond_64_bits_come_back_unchanged():
    client = TestClient(create_app(models.criteo_model()))
    ids = [123456789012345678901234567890, -9223372036854775809, 18446744073709551615, 2 ** 63 - 1, 1e-05, "x"]
    body = json.dumps({"rows": [{"id": i, "features": {"I1": 1}} for i in ids]}).encode()
    resp = client.post("/v1/predict", content=body)
    assert resp.status_code == 200
    assert [p["id"] for p in json.loads(resp.content)["predictions"]] == ids
