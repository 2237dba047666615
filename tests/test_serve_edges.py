"""The server's rough edges from the fault drill: non-finite ids, any content type, a per-model OpenAPI
document, offline /docs, the forward off the event loop, bind-then-announce, and a fuzz of raw bodies with
non-finite JSON numbers (bounded by example count): never a 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import _serve_models as models  # noqa: E402
from deepfm.serve.app import Settings, create_app  # noqa: E402

ROW = {"I1": 3, "C1": "68fd1e64"}


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(models.criteo_model(), Settings(max_rows=50)))


@pytest.mark.parametrize("body", [
    b'{"rows":[{"id":1e400,"features":{}}]}', b'{"rows":[{"id":NaN,"features":{}}]}',
    b'{"rows":[{"id":-Infinity,"features":{}}]}', b'{"rows":[{"id":[1, NaN],"features":{}}]}',
    b'{"rows":[{"id":"ok","features":{}}, {"id":{"a":{"b":[Infinity]}},"features":{}}]}'])
def test_non_finite_ids_are_a_422_naming_the_row(client, body):
    resp = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    bad_row = 1 if b'"ok"' in body else 0
    assert [(e["row"], e["field"]) for e in errors] == [(bad_row, "id")]
    assert "non-finite" in errors[0]["message"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain",
                                          "application/octet-stream", "application/json; charset=utf-8"])
def test_a_json_body_is_read_whatever_the_content_type(client, content_type):
    body = json.dumps({"rows": [{"id": "imp-1", "features": ROW}]}).encode()
    expected = client.post("/v1/predict", json={"rows": [{"id": "imp-1", "features": ROW}]}).json()
    headers = {} if content_type is None else {"content-type": content_type}
    resp = client.post("/v1/predict", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json() == expected and expected["predictions"][0]["id"] == "imp-1"
    bad = client.post("/v1/predict", content=b"rows=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["errors"][0]["message"]


def _features_schema(c: TestClient) -> dict:
    return c.get("/openapi.json").json()["components"]["schemas"]["Row"]["properties"]["features"]


def test_openapi_lists_the_served_models_fields_and_follows_a_reload():
    criteo_dir, multi_dir = models.criteo_model(), models.multi_model()
    from deepfm.config import CRITEO_COLUMNS

    c = TestClient(create_app(criteo_dir, Settings(admin_token="t", model_root=str(models.workdir()))))
    schema = _features_schema(c)
    assert list(schema["properties"]) == [n for n in CRITEO_COLUMNS if n != "label"]
    assert schema["additionalProperties"] is False
    assert any(s.get("type") == "number" for s in schema["properties"]["I1"]["anyOf"])
    assert {"type": "string"} in schema["properties"]["C1"]["anyOf"]
    resp = c.post("/v1/reload", json={"model_dir": str(multi_dir)}, headers={"authorization": "Bearer t"})
    assert resp.status_code == 200
    schema = _features_schema(c)
    assert list(schema["properties"]) == ["user", "site", "price", "age", "clicks", "tags", "cats", "query"]
    assert any(s.get("type") == "array" for s in schema["properties"]["tags"]["anyOf"])
    assert not any(s.get("type") == "array" for s in schema["properties"]["price"]["anyOf"])


def test_docs_are_served_from_the_installed_package(client):
    pytest.importorskip("swagger_ui_bundle")
    html = client.get("/docs")
    assert html.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in html.text and "/docs-assets/swagger-ui.css" in html.text
    assert "cdn" not in html.text.lower() and "http://" not in html.text and "https://" not in html.text
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000 and b"SwaggerUIBundle" in js.content
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_the_small_request_forward_runs_off_the_event_loop():
    app = create_app(models.criteo_model())
    served = app.state.serving.model
    seen: list[bool] = []
    real = served.fast.probs

    def probs(rows):
        try:
            asyncio.get_running_loop()
            seen.append(True)  # on the event loop
        except RuntimeError:
            seen.append(False)
        return real(rows)

    served.fast.probs = probs
    resp = TestClient(app).post("/v1/predict", json={"rows": [{"features": ROW}]})
    assert resp.status_code == 200 and seen == [False]
    assert models.metric(app.state.metrics.render(), "deepfm_predict_batches_total", path="fast") == 1


def test_serving_is_announced_after_the_bind_and_a_taken_port_says_what_to_do(tmp_path):
    criteo_dir = models.criteo_model()
    httpx = pytest.importorskip("httpx")
    port = models.free_port()
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    first = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", str(criteo_dir), "--port", str(port)],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start: " + (tmp_path / "first.log").read_text())
        assert f"Serving {criteo_dir} on http://127.0.0.1:{port}" in (tmp_path / "first.log").read_text()
        second = subprocess.run([sys.executable, "-m", "deepfm", "serve", str(criteo_dir), "--port", str(port)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert "Serving" not in second.stderr and "Traceback" not in second.stderr
        assert f"error: port {port} on 127.0.0.1 is already in use" in second.stderr
        assert "--port" in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=20)
        log.close()


# ------------------------------------------------------------------ fuzz: raw bodies, non-finite numbers included
def test_fuzz_raw_bodies_with_non_finite_numbers_never_5xx():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app = create_app(models.multi_model(), Settings(max_rows=20))
    c = TestClient(app, raise_server_exceptions=False)
    numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "0", "-3", "3.5",
                               "1e38", "3.5e38", "9007199254740993", "-0.0"])
    scalars = st.one_of(numbers, st.sampled_from(['"abc"', '""', "null", "true", '"17"', '"NaN"', '"inf"',
                                                  '"t1:NaN^t2"', '"a:1e400"']))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.tuples(st.sampled_from(['"t1"', '"t2"', "7"]), numbers).map(lambda t: f"[{t[0]}, {t[1]}]")),
        max_leaves=4)
    names = st.sampled_from(["user", "site", "price", "age", "clicks", "tags", "cats", "query", "label", "nope"])
    features = st.dictionaries(names, values, max_size=5).map(
        lambda d: "{" + ", ".join(f'"{k}": {v}' for k, v in d.items()) + "}")
    rows = st.lists(st.tuples(values, features).map(lambda t: f'{{"id": {t[0]}, "features": {t[1]}}}'), max_size=4)
    bodies = st.one_of(rows.map(lambda rs: '{"rows": [' + ", ".join(rs) + "]}"),
                       values.map(lambda v: '{"rows": ' + v + "}"), values)
    codes: set[int] = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body: str) -> None:
        resp = c.post("/v1/predict", content=body.encode(), headers={"content-type": "application/json"})
        codes.add(resp.status_code)
        assert resp.status_code < 500, (body, resp.text)
        json.loads(resp.text, parse_constant=lambda x: pytest.fail(f"non-JSON constant {x} in {resp.text}"))

    check()
    assert 200 in codes and 422 in codes
    assert 'kind="server"' not in app.state.metrics.render()


def test_the_short_lane_answers_as_the_route_does(client):
    """A plain body is answered by deepfm.serve.lane, the same body in another accepted form by the route:
    the same predictions; a body the lane does not take (an unknown key) keeps the route's message."""
    from deepfm.serve.lane import plain_rows

    rows = [{"id": i, "features": {"I1": i, "C1": "68fd1e64", "C2": None}} for i in range(3)]
    plain = json.dumps({"rows": rows, "explain": False}).encode()
    routed = json.dumps({"rows": rows, "explain": 0}).encode()  # pydantic reads 0 as false; the lane leaves it
    assert plain_rows(plain, 64, 100) == ([0, 1, 2], [r["features"] for r in rows])
    assert plain_rows(routed, 64, 100) is None
    a = client.post("/v1/predict", content=plain)
    b = client.post("/v1/predict", content=routed)
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    assert [p["id"] for p in a.json()["predictions"]] == [0, 1, 2]
    bad = client.post("/v1/predict", content=json.dumps({"rows": rows, "colour": 1}).encode())
    assert bad.status_code == 422 and "colour" in bad.text
    assert plain_rows(json.dumps({"rows": rows}).encode(), 64, 2) is None  # over the row limit: the route's 413
    bad_value = client.post("/v1/predict", json={"rows": [{"features": {"I1": "x"}}]})
    assert bad_value.status_code == 422 and "row 0, field 'I1'" in bad_value.json()["detail"]


def test_the_depth_of_short_bodies_counts_as_the_long_way():
    import random

    from deepfm.serve import limits

    rnd = random.Random(1)

    def value(depth):
        if depth == 0:
            return rnd.choice([1, "a[b]{", "}", None, 2.5])
        if rnd.random() < 0.5:
            return [value(depth - 1) for _ in range(rnd.randint(0, 3))]
        return {f"k{i}{'[' * i}": value(depth - 1) for i in range(rnd.randint(0, 3))}

    for _ in range(500):
        body = json.dumps(value(rnd.randint(0, 8))).encode()
        short = limits._short_depth(body.translate(None, limits._DROPPED))
        saved, limits._SHORT = limits._SHORT, -1  # every body the numpy way
        try:
            assert limits._numpy_depth(body) == short == limits.json_depth(body)
        finally:
            limits._SHORT = saved
    assert limits.json_depth(b"[" * 300 + b"]" * 300) == 300  # past int8's range


def test_the_native_scan_follows_the_numpy_rule():
    """``scan_body``'s two paths (the C kernel, numpy) on byte soup of quotes, backslash runs, brackets and
    digit runs, valid JSON or not: the same depth and the same answer about long digit runs."""
    import random

    from deepfm import native
    from deepfm.serve import limits

    if native.json_scan(b"[]") is None:
        pytest.skip("no C compiler: the numpy path is the only one")
    rnd = random.Random(7)
    pieces = [b'"', b"\\", b"\\\\", b"[", b"]", b"{", b"}", b"a", b" ", b"0", b"12345", b"9" * 10, b":", b","]
    bodies = [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 60))) for _ in range(3000)]
    bodies += [b"[" * 300 + b"]" * 300, b'{"a": "[[[[[[{{{{", "b": [[1]], "c": "\\"[["}', b"", b"1" * 19, b"1" * 18]
    for body in bodies:
        depth, longest = native.json_scan(body)
        assert depth == limits._numpy_depth(body), body
        for digits in (5, 19):
            assert (longest >= digits) == (b"0" * digits in body.translate(limits._DIGITS)), body
