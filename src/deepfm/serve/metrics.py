"""The server's Prometheus metrics (``prometheus_client``), one set per app, summed over ``--workers N``.

With one process the metrics live in a registry of the app's own (two apps in one process, as in the tests,
do not share counters). With ``--workers N``, ``deepfm serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start: every worker writes its values to memory-mapped files there, and a scrape answered by any
worker reads them all (``MultiProcessCollector``), so ``/metrics`` reports the whole server and not the
worker that happened to answer. Per-process gauges say how they combine (``multiprocess_mode``); a worker
removes its live gauges when it stops.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deepfm.serve.settings import MULTIPROC_ENV

BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
KNOWN_PATHS = frozenset({"/v1/predict", "/v1/model", "/v1/reload", "/healthz", "/metrics", "/openapi.json",
                         "/docs"})


def path_label(path: str) -> str:
    """Known endpoints by name, anything else as ``other`` (a client cannot grow the label set)."""
    return path if path in KNOWN_PATHS else "other"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """What the server counts; ``render`` gives the Prometheus text of the whole server."""

    def __init__(self) -> None:
        self.shared = multiprocess_dir() is not None
        reg = None if self.shared else CollectorRegistry()  # shared: the values go to the folder's files
        self.registry = reg
        self.requests = Counter("deepfm_requests", "HTTP requests by path, method and status code.",
                                ("path", "method", "code"), registry=reg)
        self.errors = Counter("deepfm_request_errors", "Requests answered with 4xx (client) or 5xx (server).",
                              ("path", "kind"), registry=reg)
        self.duration = Histogram("deepfm_request_duration_seconds", "Time from request start to response end.",
                                  ("path",), buckets=BUCKETS, registry=reg)
        self.rows = Counter("deepfm_predicted_rows", "Rows scored.", registry=reg)
        self.batches = Counter("deepfm_predict_batches", "Forward passes by encoding path (fast: small requests "
                               "of plain values; frame: the batch predict path).", ("path",), registry=reg)
        self.batch_rows = Histogram("deepfm_batch_rows", "Rows per forward pass (coalesced requests together).",
                                    buckets=SIZE_BUCKETS, registry=reg)
        self.batch_requests = Histogram("deepfm_batch_requests", "Requests coalesced into one forward pass.",
                                        buckets=SIZE_BUCKETS, registry=reg)
        self.reloads = Counter("deepfm_model_reloads", "Model reloads by result.", ("result",), registry=reg)
        self.in_flight = Gauge("deepfm_requests_in_flight", "Requests being handled now.", registry=reg,
                               multiprocess_mode="livesum")
        self.model_info = Gauge("deepfm_model_info", "The model being served (1; 0 for a version replaced).",
                                ("version",), registry=reg, multiprocess_mode="livemax")
        self.worker_requests = Gauge("deepfm_worker_requests", "Requests handled by each worker process since it "
                                     "started (how evenly connections spread over workers).", registry=reg,
                                     multiprocess_mode="liveall")
        start = Gauge("deepfm_process_start_time_seconds", "Start time of the (first) server process.",
                      registry=reg, multiprocess_mode="min")
        start.set(time.time())
        self.version = ""

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        p = path_label(path)
        self.requests.labels(p, method, str(status)).inc()
        self.worker_requests.inc()
        if status >= 400:
            self.errors.labels(p, "client" if status < 500 else "server").inc()
        self.duration.labels(p).observe(seconds)

    def scored(self, path: str, rows: int, requests: int = 1) -> None:
        """One forward pass over ``rows`` rows of ``requests`` requests through the ``path`` encoder."""
        self.batches.labels(path).inc()
        self.rows.inc(rows)
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def serving(self, version: str) -> None:
        if self.version and self.version != version:
            self.model_info.labels(self.version).set(0)
        self.model_info.labels(version).set(1)
        self.version = version

    def render(self) -> str:
        return self.render_bytes().decode()

    def render_bytes(self) -> bytes:
        if self.registry is not None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    content_type = CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This worker stops: its live gauges leave the shared folder (its counters stay in the sums)."""
        if self.shared:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
