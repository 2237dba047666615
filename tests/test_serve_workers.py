"""``deepfm serve --workers 2``: the settings reach both workers, and /metrics (answered by either worker)
reports the sum of both workers' requests (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import _serve_models as models  # noqa: E402


def _start(args: list[str], log) -> tuple[subprocess.Popen, str]:
    port = models.free_port()
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", *args, "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    proc.wait(timeout=20)
    pytest.fail("server did not start")


def _predicts(text: str) -> float:
    return models.metric(text, "deepfm_requests_total", path="/v1/predict", method="POST", code="200") or 0.0


def test_two_workers_metrics_are_the_sum_of_both(tmp_path):
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc, base = _start([str(models.criteo_model()), "--workers", "2", "--max-rows", "3"], log)
    try:
        row = {"rows": [{"id": 1, "features": {"I1": 3, "C1": "68fd1e64"}}]}
        sent = 0
        pids: dict[str, float] = {}
        for _ in range(20):  # a new connection per request: the kernel spreads them over both workers
            for _ in range(10):
                resp = httpx.post(base + "/v1/predict", json=row, headers={"connection": "close"}, timeout=10)
                assert resp.status_code == 200, resp.text
                sent += 1
            text = httpx.get(base + "/metrics", headers={"connection": "close"}, timeout=10).text
            pids = {s["pid"]: v for s, v in models.metric_samples(text, "deepfm_worker_requests")}
            if len(pids) == 2 and min(pids.values()) > 2:
                break
        assert len(pids) == 2 and min(pids.values()) > 0, pids  # both workers answered some
        # every scrape, whichever worker answers it, reports all the predict requests of both
        for _ in range(6):
            text = httpx.get(base + "/metrics", headers={"connection": "close"}, timeout=10).text
            assert _predicts(text) == sent
        # the limits reached both workers (settings through the environment, validated again there)
        for _ in range(6):
            big = httpx.post(base + "/v1/predict", json={"rows": row["rows"] * 4}, headers={"connection": "close"},
                             timeout=10)
            assert big.status_code == 413 and "limit of 3 rows" in big.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
