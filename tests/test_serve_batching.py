"""Concurrent predict requests coalesced into one forward pass: each request gets its own rows, in order, equal
to scoring it alone; a bad request fails alone; a reload during a burst drops nothing; large requests and
``max_batch_rows=1`` go straight through."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import _serve_models as models  # noqa: E402
from deepfm.config import CRITEO_COLUMNS  # noqa: E402
from deepfm.serve.app import ServeSettings, create_app  # noqa: E402

BATCHED = ServeSettings(max_batch_rows=64, max_batch_delay_ms=50)  # a long wait: the 20 requests meet


def _criteo_requests(n: int = 20) -> list[list[dict]]:
    df = pl.read_csv(models.CRITEO / "data" / "test.tsv", separator="\t", has_header=False, infer_schema_length=0,
                     new_columns=CRITEO_COLUMNS)
    rows = [{"id": f"r{i}", "features": {k: (float(v) if k.startswith("I") else v)
                                          for k, v in r.items() if k != "label" and v not in (None, "")}}
            for i, r in enumerate(df.head(60).iter_rows(named=True))]
    sizes = [1 + i % 4 for i in range(n)]  # 1 to 4 rows each
    out, start = [], 0
    for k in sizes:
        out.append(rows[start:start + k])
        start += k
    return out


def _burst(client: TestClient, bodies: list[dict]) -> list:
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()
        return client.post("/v1/predict", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def _hist(app, name: str) -> tuple[float, float]:
    text = app.state.metrics.render()
    return models.metric(text, name + "_count") or 0.0, models.metric(text, name + "_sum") or 0.0


def test_batched_requests_get_their_own_rows_in_order_equal_to_scoring_alone():
    requests = _criteo_requests()
    alone = TestClient(create_app(models.criteo_model(), ServeSettings(max_batch_rows=1)))
    expected = [alone.post("/v1/predict", json={"rows": r}).json() for r in requests]
    app = create_app(models.criteo_model(), BATCHED)
    with TestClient(app) as client:
        got = _burst(client, [{"rows": r} for r in requests])
    for req, want, resp in zip(requests, expected, got):
        assert resp.status_code == 200, resp.text
        preds = resp.json()["predictions"]
        assert [p["id"] for p in preds] == [r["id"] for r in req]
        # float32 products at another batch size may round differently in the last bits
        np.testing.assert_allclose([p["probability"] for p in preds],
                                   [p["probability"] for p in want["predictions"]], rtol=0, atol=1e-6)
    passes, requests_in_passes = _hist(app, "deepfm_batch_requests")
    assert requests_in_passes == 20 and passes < 10, (passes, requests_in_passes)  # coalesced
    assert _hist(app, "deepfm_batch_rows")[1] == sum(len(r) for r in requests)


def test_a_bad_request_among_20_fails_alone():
    """Values only the batch encoder rejects ride along with 19 good requests; so does a request whose list
    tags hold the separator, which conflicts with another request's text form only when they share a pass."""
    app = create_app(models.multi_model(), BATCHED)
    good = [{"rows": [{"id": i, "features": {"user": f"u{i}", "tags": [["t1", 0.5], "t2"], "price": 10.0 + i}}]}
            for i in range(18)]
    bad = {"rows": [{"id": "bad", "features": {"tags": "t1:x^t2"}}]}  # a weight that is not a number
    sep = {"rows": [{"id": "sep", "features": {"tags": ["a^b", "t3"]}}]}  # fine alone
    alone = TestClient(create_app(models.multi_model(), ServeSettings(max_batch_rows=1)))
    expected = [alone.post("/v1/predict", json=b).json()["predictions"] for b in [*good, sep]]
    with TestClient(app) as client:
        got = _burst(client, [*good[:9], bad, sep, *good[9:]])
    codes = [r.status_code for r in got]
    assert codes == [200] * 9 + [422, 200] + [200] * 9, [r.text for r in got if r.status_code != 200]
    assert "field 'tags'" in got[9].json()["detail"] and "'x'" in got[9].json()["detail"]
    answers = [r.json()["predictions"] for r in [*got[:9], *got[11:], got[10]]]
    for want, have in zip(expected, answers):
        assert [p["id"] for p in have] == [p["id"] for p in want]
        np.testing.assert_allclose([p["probability"] for p in have], [p["probability"] for p in want], atol=1e-6)
    # a row whose score overflows fails its own request only (checked after the pass is split)
    overflow = {"rows": [{"id": "big", "features": {"age": 3e38, "price": 1e38}}]}
    with TestClient(app) as client:
        got = _burst(client, [*good[:5], overflow, *good[5:10]])
    assert [r.status_code for r in got] == [200] * 5 + [422] + [200] * 5


def test_a_reload_during_a_burst_drops_nothing(tmp_path):
    from test_serve import _shifted_copy

    v1 = shutil.copytree(models.criteo_model(), tmp_path / "v1")
    v2 = _shifted_copy(models.criteo_model(), tmp_path / "v2", 1.0)
    app = create_app(v1, ServeSettings(max_batch_rows=64, max_batch_delay_ms=5, admin_token="t"))
    body = {"rows": _criteo_requests(3)[2]}
    results, stop = [], threading.Event()
    with TestClient(app) as client:
        before = client.post("/v1/predict", json=body).json()

        def hammer():
            while not stop.is_set():
                r = client.post("/v1/predict", json=body)
                results.append((r.status_code, r.json()))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        ok = client.post("/v1/reload", json={"model_dir": str(v2)}, headers={"authorization": "Bearer t"})
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        after = client.post("/v1/predict", json=body).json()
    assert ok.status_code == 200 and after["model_version"] == ok.json()["version"] != before["model_version"]
    assert len(results) > 20 and all(code == 200 for code, _ in results)
    by_version = {before["model_version"]: before["predictions"], after["model_version"]: after["predictions"]}
    assert {b["model_version"] for _, b in results} == set(by_version)  # requests on both sides of the reload
    for _, b in results:
        want = by_version[b["model_version"]]
        np.testing.assert_allclose([p["probability"] for p in b["predictions"]],
                                   [p["probability"] for p in want], atol=1e-6)
    passes, requests_in_passes = _hist(app, "deepfm_batch_requests")
    assert requests_in_passes > passes  # the burst was coalesced


def test_large_requests_and_max_batch_rows_1_go_straight_through():
    app = create_app(models.criteo_model(), ServeSettings(max_batch_rows=8, max_batch_delay_ms=50))
    rows = [r for req in _criteo_requests() for r in req][:8]
    with TestClient(app) as client:
        assert client.post("/v1/predict", json={"rows": rows}).status_code == 200
    assert app.state.serving.batcher._lanes == {}  # the queue was never used
    off = create_app(models.criteo_model(), ServeSettings(max_batch_rows=1))
    with TestClient(off) as client:
        got = _burst(client, [{"rows": r} for r in _criteo_requests()])
    assert all(r.status_code == 200 for r in got)
    assert _hist(off, "deepfm_batch_requests") == (20, 20)  # 20 passes of one request each
    assert off.state.serving.batcher._lanes == {}
