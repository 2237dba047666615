"""``deepfm serve --workers 2``: the settings reach both workers, /metrics (answered by either worker) reports
the sum of both workers' requests (prometheus_client's multiprocess mode), and the workers share one table
(a memory map of model.safetensors; Linux /proc)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

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


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _table_mapping(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in kB of the process's mappings of model.safetensors."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith("model.safetensors")
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return rss, pss


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
        # both workers map the one table of model.safetensors: its pages count half in each (PSS)
        table = [m for m in map(_table_mapping, _children(proc.pid)) if m[0]]  # (not the resource tracker)
        assert len(table) == 2 and all(rss >= 600 for rss, _ in table), table  # the 721 KB table is resident
        assert all(pss <= rss * 0.6 for rss, pss in table), table  # ...and shared, not copied
        # the limits reached both workers (settings through the environment, validated again there)
        for _ in range(6):
            big = httpx.post(base + "/v1/predict", json={"rows": row["rows"] * 4}, headers={"connection": "close"},
                             timeout=10)
            assert big.status_code == 413 and "limit of 3 rows" in big.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
