"""Paired A/B of two server sources on loopback: 20 clients x 1-row requests (unbatched and batched) and
2 clients x 1,000-row ranking requests, rounds alternating which side goes first.

    git archive OLD_COMMIT src | tar -x -C /tmp/old
    python bench/serve_ab.py MODEL_DIR DATA --old /tmp/old/src --new src [--rounds 4] [--seconds 20]

Each scenario starts ``deepfm serve`` with that side's source (PYTHONPATH) on 127.0.0.1 and drives it with
``serve_load``'s client; prints each run and the medians per side, --json writes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as sl  # noqa: E402


def start(src: str, model: Path, extra: list[str]) -> sl.Server:
    server = sl.Server.__new__(sl.Server)
    server.port = sl.free_port()
    cmd = [sys.executable, "-m", "deepfm", "serve", str(model), "--host", sl.HOST, "--port", str(server.port), *extra]
    server.proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
    server.wait()
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--old", required=True, help="the old side's src folder")
    ap.add_argument("--new", required=True, help="the new side's src folder")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = sl.load_rows(args.data, args.model_dir)
    single = [json.dumps({"rows": [{"id": i, "features": r}]}).encode() for i, r in enumerate(rows[:5000])]
    plan = [("unbatched", ["--max-batch-rows", "1"], [("single", single, 20, 1)]),
            ("batched", [], [("single", single, 20, 1), ("rank1000", sl.ranking(rows, 1000, 20), 2, 1000)])]
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
            for mode, extra, scenarios in plan:
                server = start(getattr(args, side), args.model_dir, extra)
                try:
                    for name, bodies, clients, per in scenarios:
                        out = asyncio.run(sl.scenario(server.port, bodies, clients, 10**9, args.seconds, per))
                        results.setdefault(f"{side}/{mode}/{name}", []).append(out)
                        print(f"round {r} {side} {mode:9s} {name:8s} {out['req_per_s']:8.1f} req/s "
                              f"{out['rows_per_s']:9.1f} rows/s p50 {out['p50_ms']:7.2f} p99 {out['p99_ms']:7.2f} "
                              f"errors {out['errors']}", flush=True)
                finally:
                    server.stop()
    for key, runs in results.items():
        med = {m: statistics.median(x[m] for x in runs) for m in ("req_per_s", "rows_per_s", "p50_ms", "p99_ms")}
        print(f"{key:26s} median {med['req_per_s']:8.1f} req/s {med['rows_per_s']:9.1f} rows/s "
              f"p50 {med['p50_ms']:7.2f} p99 {med['p99_ms']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
