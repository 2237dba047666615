"""Load test of ``deepfm serve`` on loopback: throughput, p50, p99 and errors per scenario.

    python bench/serve_load.py MODEL_DIR [--data examples/criteo/data/test.tsv] [--seconds 10]

Starts ``deepfm serve MODEL_DIR`` on 127.0.0.1 (a free port) in a second process, waits for /healthz, and
drives it from this process with a minimal asyncio HTTP/1.1 keep-alive client (low client overhead, so the
latencies are the server's plus loopback). Scenarios, each bounded by a request count and by --seconds:

    unbatched/single-c20   20 clients x 1-row requests, --max-batch-rows 1 (no coalescing: the old server)
    batched/single-c20     the same with the default batching
    batched/rank100-c2     ranking requests: 100 candidate rows each, 2 clients
    batched/rank1000-c2    1,000 candidate rows each, 2 clients
    workersK/...           the three batched scenarios again with --workers K (--workers-plan K, default: one
                           worker per core; 0 or 1 skips them)

and ``deepfm predict``'s rows/s on a file of the same rows (--predict-rows), for the ranking comparison.

Loopback only: the server is bound to 127.0.0.1 and the client refuses any other host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def load_rows(path: Path, model_dir: Path) -> list[dict]:
    import polars as pl
    import yaml

    cfg = yaml.safe_load((model_dir / "config.yaml").read_text())
    data = cfg["data"]
    fields = [f["name"] for f in cfg["fields"]]
    if path.suffix == ".tsv" and not data.get("header", True):
        from deepfm.config import CRITEO_COLUMNS

        df = pl.read_csv(path, separator="\t", has_header=False, new_columns=data.get("columns") or CRITEO_COLUMNS,
                         infer_schema_length=0)
    else:
        df = pl.read_csv(path, separator="\t" if path.suffix == ".tsv" else ",", infer_schema_length=0)
    numeric = {f["name"] for f in cfg["fields"] if f.get("kind") == "numeric"}
    rows = []
    for r in df.select(fields).iter_rows(named=True):
        rows.append({k: (float(v) if k in numeric else v) for k, v in r.items() if v not in (None, "")})
    return rows


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.writer is not None and self.reader is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        payload = await self.reader.readexactly(length)
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def scenario(port: int, bodies: list[bytes], concurrency: int, count: int, seconds: float,
                   rows_per_request: int) -> dict:
    lat: list[float] = []
    errors = {"http": 0, "transport": 0}
    deadline = 0.0  # set after the warm-up
    issued = 0

    async def worker() -> None:
        nonlocal issued
        conn = Conn(port)
        await conn.open()
        try:
            while issued < count and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.post("/v1/predict", body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors["transport"] += 1
                    conn.close()
                    conn = Conn(port)
                    await conn.open()
                    continue
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors["http"] += 1
        finally:
            conn.close()

    # warm-up, not measured
    conn = Conn(port)
    await conn.open()
    for b in bodies[:max(2, 50 // rows_per_request)]:
        await conn.post("/v1/predict", b)
    conn.close()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    arr = sorted(lat)

    def pct(p: float) -> float:
        return arr[min(len(arr) - 1, int(p * len(arr)))] * 1000 if arr else float("nan")

    return {"requests": len(lat), "rows_per_request": rows_per_request, "concurrency": concurrency,
            "seconds": round(wall, 2), "req_per_s": round(len(lat) / wall, 1),
            "rows_per_s": round(len(lat) * rows_per_request / wall, 1), "p50_ms": round(pct(0.50), 3),
            "p99_ms": round(pct(0.99), 3), "max_ms": round(arr[-1] * 1000, 3) if arr else None,
            "errors": errors["http"] + errors["transport"]}


class Server:
    """``deepfm serve MODEL_DIR`` on 127.0.0.1 and a free port, in a second process."""

    def __init__(self, model_dir: Path, extra: list[str]) -> None:
        self.port = free_port()
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "deepfm", "serve", str(model_dir), "--host", HOST, "--port", str(self.port),
               *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self) -> None:
        for _ in range(1200):
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                    s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                    if b" 200 " in s.recv(1024):
                        return
            except OSError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                raise SystemExit(self.proc.stderr.read().decode())
        raise SystemExit("server did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def predict_rows_per_s(model_dir: Path, rows: list[dict], n: int) -> float:
    """``deepfm predict``'s rows/s on a file of ``n`` rows (the model loaded; the file read and written),
    the median of three passes."""
    import tempfile

    import polars as pl

    from deepfm.predict import Predictor

    cols = sorted({k for r in rows for k in r})
    frame = pl.DataFrame({c: [None if rows[i % len(rows)].get(c) is None else str(rows[i % len(rows)][c])
                              for i in range(n)] for c in cols})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        frame.write_csv(path)
        predictor = Predictor(model_dir, device="cpu")
        rates = []
        for _ in range(3):  # one pass moved by +-15% from run to run: the median of three
            t0 = time.perf_counter()
            predictor.predict_file(str(path), str(Path(tmp) / "out.csv"), progress=False)
            rates.append(n / (time.perf_counter() - t0))
        print("deepfm predict passes: " + ", ".join(f"{r:,.0f}" for r in rates) + " rows/s", flush=True)
        return sorted(rates)[1]


def ranking(rows: list[dict], size: int, count: int) -> list[bytes]:
    """Requests of ``size`` candidates: one user's fields with different ad fields (here: consecutive rows)."""
    return [json.dumps({"rows": [{"id": j, "features": rows[(i * 7 + j) % len(rows)]} for j in range(size)]}).encode()
            for i in range(count)]


def run_plan(model_dir: Path, extra: list[str], plan: list[tuple], args, results: dict, label: str) -> None:
    server = Server(model_dir, extra)
    try:
        server.wait()
        for name, bodies, conc, count, per in plan:
            r = asyncio.run(scenario(server.port, bodies, conc, count, args.seconds, per))
            r["server_args"] = " ".join(extra)
            results[f"{label}/{name}"] = r
            print(f"{label:10s} {name:13s} {r['requests']:6d} req {r['req_per_s']:8.1f} req/s {r['rows_per_s']:9.1f} "
                  f"rows/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}", flush=True)
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, default=Path("examples/criteo/data/test.tsv"))
    ap.add_argument("--seconds", type=float, default=10.0, help="time limit per scenario")
    ap.add_argument("--requests", type=int, default=5000, help="request limit per single-row scenario")
    ap.add_argument("--serve-args", default="", help="extra arguments for deepfm serve, e.g. '--workers 2'")
    ap.add_argument("--predict-rows", type=int, default=200_000, help="file size for deepfm predict's rows/s")
    ap.add_argument("--workers-plan", type=int, default=os.cpu_count() or 1,
                    help="also run the batched scenarios with --workers K (default: the number of cores; 0 skips)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    rows = load_rows(args.data, args.model_dir)
    random.Random(0).shuffle(rows)
    singles = [json.dumps({"rows": [{"id": i, "features": r}]}).encode() for i, r in enumerate(rows)]
    results: dict = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average before: {results['loadavg_before']} on {os.cpu_count()} cores "
          "(other processes on the machine inflate the tail latencies)", flush=True)
    extra = args.serve_args.split()
    single = [("single-c20", singles, 20, args.requests, 1)]
    run_plan(args.model_dir, [*extra, "--max-batch-rows", "1"], single, args, results, "unbatched")
    rank = [("rank100-c2", ranking(rows, 100, 50), 2, max(100, args.requests // 20), 100),
            ("rank1000-c2", ranking(rows, 1000, 20), 2, max(40, args.requests // 100), 1000)]
    run_plan(args.model_dir, extra, single + rank, args, results, "batched")
    many = f"workers{args.workers_plan}"
    if args.workers_plan > 1:
        run_plan(args.model_dir, [*extra, "--workers", str(args.workers_plan)], single + rank, args, results, many)
    results["predict_rows_per_s"] = round(predict_rows_per_s(args.model_dir, rows, args.predict_rows), 1)
    print(f"deepfm predict on a {args.predict_rows:,}-row file: {results['predict_rows_per_s']:,.0f} rows/s")
    u, b = results["unbatched/single-c20"], results["batched/single-c20"]
    print(f"batching, 20 clients x 1 row: {b['req_per_s'] / u['req_per_s']:.2f}x requests/s, p99 "
          f"{u['p99_ms']:.1f} -> {b['p99_ms']:.1f} ms; 1,000-row requests at "
          f"{results['batched/rank1000-c2']['rows_per_s'] / results['predict_rows_per_s']:.0%} of predict's rows/s")
    if f"{many}/rank1000-c2" in results:
        print(f"with --workers {args.workers_plan}: 1,000-row requests at "
              f"{results[f'{many}/rank1000-c2']['rows_per_s'] / results['predict_rows_per_s']:.0%} of predict's "
              f"rows/s; 20 clients x 1 row: {results[f'{many}/single-c20']['req_per_s']:,.0f} requests/s")
    results["loadavg_after"] = os.getloadavg()
    print(f"load average after: {results['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
