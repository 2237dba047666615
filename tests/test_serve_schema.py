"""The OpenAPI document is honest: a schemathesis run with every check it has (not only "no 5xx": schema-valid
requests accepted, schema-invalid ones rejected, every status code and response body documented, the bearer
token enforced, unsupported methods answered 405) over every operation finds nothing. Bounded by example
count (derandomized), never by wall time."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

import _serve_models as models  # noqa: E402
from deepfm.data.codecs import FLOAT32_MAX  # noqa: E402
from deepfm.serve.app import ServeSettings, create_app  # noqa: E402

TOKEN = "fuzz-token"
BUDGET = {"POST /v1/predict": 100, "POST /v1/reload": 40}  # per generation mode; the GET operations take 10


def test_schemathesis_all_checks_every_operation_finds_nothing():
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import CHECKS

    app = create_app(models.criteo_model(), ServeSettings(max_rows=50, admin_token=TOKEN))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = CHECKS.get_all()
    assert {"positive_data_acceptance", "negative_data_rejection", "status_code_conformance",
            "response_schema_conformance", "ignored_auth", "unsupported_method"} <= {c.__name__ for c in checks}
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    labels = []
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)
        headers = {"authorization": f"Bearer {TOKEN}"} if op.label == "POST /v1/reload" else None
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=BUDGET.get(op.label, 10), deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                resp = case.call(headers=headers)
                seen.setdefault(op.label, set()).add(resp.status_code)
                try:
                    case.validate_response(resp, checks=checks, headers=headers)
                except BaseException as err:  # schemathesis' FailureGroup: collect them all, then report
                    failures.append(f"{op.label} {mode.name}: {err}"[:2000])

            try:
                check()
            except Unsatisfiable:  # e.g. no invalid request exists for GET /healthz
                pass
    assert not failures, "\n\n".join(failures[:5])
    assert {"POST /v1/predict", "POST /v1/reload", "GET /v1/model", "GET /healthz", "GET /metrics"} <= set(labels)
    assert {200, 422} <= seen["POST /v1/predict"] and 200 in seen["GET /healthz"]


def test_numbers_in_the_schema_carry_float32_limits():
    from fastapi.testclient import TestClient

    c = TestClient(create_app(models.criteo_model()))
    features = c.get("/openapi.json").json()["components"]["schemas"]["Row"]["properties"]["features"]
    numbers = [s for f in features["properties"].values() for s in f["anyOf"] if s.get("type") == "number"]
    assert numbers and all(s["minimum"] == -FLOAT32_MAX and s["maximum"] == FLOAT32_MAX for s in numbers)
    text = next(s for s in features["properties"]["I1"]["anyOf"] if s.get("type") == "string")
    import re

    pattern = re.compile(text["pattern"])
    assert all(pattern.fullmatch(v) for v in ("17", " -0.5 ", "2.5e-3", "", ".5", "1.", "9" * 29 + "e9"))
    assert not any(pattern.fullmatch(v) for v in ("abc", "1e10", "9" * 30, "inf", "NaN", "1e", "--1", "0x10"))
    for value, status in (("9" * 29 + "e9", 200), ("1e10", 422), (3e38, 200), (1e39, 422), ("", 200)):
        resp = c.post("/v1/predict", json={"rows": [{"features": {"I1": value, "C1": 10**38}}]})
        assert resp.status_code == status, (value, resp.text)
    big_category = c.post("/v1/predict", json={"rows": [{"features": {"C1": 10**39}}]})
    assert big_category.status_code == 422 and "out of range" in big_category.json()["detail"]
