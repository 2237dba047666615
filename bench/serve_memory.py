"""Memory of ``deepfm serve --workers N`` with a large embedding table: N workers should cost one table (a
shared memory map of model.safetensors) plus N times the rest, not N tables.

    python bench/serve_memory.py [--table-gb 1.0] [--workers 1 4] [--work runs/serve-memory]

Builds (once, cached under --work) a Criteo-shaped model whose C1 field is hashed into enough buckets for a
table of --table-gb GB (embed_dim 16: 68 bytes a row), trained one epoch on the bundled sample. Then, for each
worker count, starts the server on 127.0.0.1, sends a few predictions, and sums the proportional set size
(PSS, from /proc/PID/smaps_rollup: a page shared by k processes counts 1/k in each) over the server's
process tree (one worker: the one process; N workers: the parent and the workers it forked), with the RSS
beside it. Linux only; loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def build_model(work: Path, table_gb: float) -> Path:
    out = work / f"model-{table_gb:g}gb"
    if (out / "model.safetensors").is_file():
        return out
    import yaml

    from deepfm.config import config_from_dict
    from deepfm.pipeline import train

    raw = yaml.safe_load((ROOT / "examples/criteo/config.yaml").read_text())
    data = ROOT / "examples/criteo/data"
    raw["data"].update(train=str(data / "train.tsv"), valid=str(data / "dev.tsv"), test=str(data / "test.tsv"),
                       cache_dir=str(work / "cache"))
    buckets = int(table_gb * 1e9 / (4 * (raw["model"]["embed_dim"] + 1)))
    raw["fields"] = [raw["fields"][0], {"name": "C1", "hash_buckets": buckets},
                     {"names": [f"C{i}" for i in range(2, 27)], "kind": "categorical", "min_count": 2}]
    raw["train"].update(epochs=1, progress=False)
    train(config_from_dict(raw), out, log=lambda m: print(m, flush=True))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out + [g for c in out for g in children(c)]


def rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def settled(pid: int) -> dict[int, dict[str, int]]:
    """smaps_rollup of the server's processes once their total PSS stops moving (every worker done loading:
    a worker's load holds a transient copy of the table)."""
    last = -1.0
    while True:
        per = {p: rollup(p) for p in [pid, *children(pid)]}
        total = sum(r["Pss"] for r in per.values())
        if abs(total - last) < 0.01 * total:
            return per
        last = total
        time.sleep(5)


def http(port: int, request: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def measure(model: Path, workers: int) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", str(model), "--port", str(port),
                               "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL)
    try:
        start = time.time()
        while True:
            try:
                if b" 200 " in http(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() - start > 600:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        time.sleep(2 + workers)  # every worker up (the first answer came from one of them)
        body = json.dumps({"rows": [{"features": {"C1": f"c{i}", "I1": i}} for i in range(50)]}).encode()
        for _ in range(20 * workers):
            http(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
        per = settled(server.pid)
        return {"workers": workers, "processes": len(per),
                "pss_mb": round(sum(r["Pss"] for r in per.values()) / 1024, 1),
                "rss_mb": round(sum(r["Rss"] for r in per.values()) / 1024, 1),
                "per_process_pss_mb": [round(r["Pss"] / 1024, 1) for r in per.values()],
                "startup_s": round(time.time() - start, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-gb", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "serve-memory")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = build_model(args.work, args.table_gb)
    table_mb = (model / "model.safetensors").stat().st_size / 2**20
    results = {"model": str(model), "weights_mb": round(table_mb, 1), "runs": []}
    print(f"model.safetensors: {table_mb:.0f} MiB", flush=True)
    for n in args.workers:
        r = measure(model, n)
        results["runs"].append(r)
        print(f"workers {n}: PSS {r['pss_mb']:.0f} MiB (RSS {r['rss_mb']:.0f} MiB) over {r['processes']} processes "
              f"{r['per_process_pss_mb']}", flush=True)
    base = results["runs"][0]["pss_mb"]
    for r in results["runs"][1:]:
        print(f"PSS {r['workers']} workers / {results['runs'][0]['workers']}: {r['pss_mb'] / base:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
