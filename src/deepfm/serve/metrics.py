"""Prometheus metrics in the text exposition format, written by hand (no dependency).

Counters and histograms live in one process; with ``--workers N`` each worker exposes its own.
Updated only on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import time
from collections import defaultdict

BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_PATHS = ("/v1/predict", "/v1/model", "/v1/reload", "/healthz", "/metrics", "/openapi.json", "/docs")


def path_label(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.hist: dict[str, list[int]] = {}
        self.hist_sum: dict[str, float] = defaultdict(float)
        self.rows = 0
        self.predict_batches: dict[str, int] = defaultdict(int)  # by encoding path: fast / frame
        self.reloads: dict[str, int] = defaultdict(int)
        self.model_version = ""
        self.in_flight = 0

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        p = path_label(path)
        self.requests[(p, method, str(status))] += 1
        if status >= 400:
            self.errors[(p, "client" if status < 500 else "server")] += 1
        counts = self.hist.get(p)
        if counts is None:
            counts = self.hist[p] = [0] * (len(BUCKETS) + 1)
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.hist_sum[p] += seconds

    def render(self) -> str:
        out = [
            "# HELP deepfm_requests_total HTTP requests by path, method and status code.",
            "# TYPE deepfm_requests_total counter"]
        for (p, m, c), n in sorted(self.requests.items()):
            out.append(f'deepfm_requests_total{{path="{_esc(p)}",method="{_esc(m)}",code="{c}"}} {n}')
        out += ["# HELP deepfm_request_errors_total Requests answered with 4xx (client) or 5xx (server).",
                "# TYPE deepfm_request_errors_total counter"]
        for (p, kind), n in sorted(self.errors.items()):
            out.append(f'deepfm_request_errors_total{{path="{_esc(p)}",kind="{kind}"}} {n}')
        out += ["# HELP deepfm_request_duration_seconds Time from request start to response end.",
                "# TYPE deepfm_request_duration_seconds histogram"]
        for p, counts in sorted(self.hist.items()):
            acc = 0
            for b, n in zip(BUCKETS, counts):
                acc += n
                out.append(f'deepfm_request_duration_seconds_bucket{{path="{_esc(p)}",le="{b}"}} {acc}')
            acc += counts[-1]
            out.append(f'deepfm_request_duration_seconds_bucket{{path="{_esc(p)}",le="+Inf"}} {acc}')
            out.append(f'deepfm_request_duration_seconds_sum{{path="{_esc(p)}"}} {self.hist_sum[p]:.9f}')
            out.append(f'deepfm_request_duration_seconds_count{{path="{_esc(p)}"}} {acc}')
        out += ["# HELP deepfm_predicted_rows_total Rows scored.", "# TYPE deepfm_predicted_rows_total counter",
                f"deepfm_predicted_rows_total {self.rows}",
                "# HELP deepfm_predict_batches_total Predict requests by encoding path (fast: small requests "
                "of plain values; frame: the batch predict path).",
                "# TYPE deepfm_predict_batches_total counter"]
        for k, n in sorted(self.predict_batches.items()):
            out.append(f'deepfm_predict_batches_total{{path="{k}"}} {n}')
        out += ["# HELP deepfm_model_reloads_total Model reloads by result.",
                "# TYPE deepfm_model_reloads_total counter"]
        for k, n in sorted(self.reloads.items()):
            out.append(f'deepfm_model_reloads_total{{result="{k}"}} {n}')
        out += ["# HELP deepfm_requests_in_flight Requests being handled now.",
                "# TYPE deepfm_requests_in_flight gauge", f"deepfm_requests_in_flight {self.in_flight}",
                "# HELP deepfm_model_info The model being served (value 1).", "# TYPE deepfm_model_info gauge",
                f'deepfm_model_info{{version="{_esc(self.model_version)}"}} 1',
                "# HELP deepfm_process_start_time_seconds Start time of the server process.",
                "# TYPE deepfm_process_start_time_seconds gauge",
                f"deepfm_process_start_time_seconds {self.started:.3f}"]
        return "\n".join(out) + "\n"
