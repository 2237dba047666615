"""A table too big for one rank's memory cap: row-sharded ranks train it, replicated ranks fail cleanly.

    .venv/bin/python bench/memory_cap.py [--buckets 400000] [--cap-mib 3800] [--ranks 2] [--out bench/.out/cap]

The bundled Criteo sample with its 26 categorical fields hashed into ``--buckets`` rows each (26 x 400k =
10.4M rows x 17 floats: 0.7 GB of weights, 2.1 GB with Adam's two moments). Three runs, the same seed and
global batch, no dropout:

1. one process, no cap: the reference AUC;
2. ``--ranks`` replicated ranks, each under ``RLIMIT_AS = --cap-mib`` (``bench/rank.py``): must fail, with
   deepfm's message naming the cap;
3. ``--ranks`` row-sharded ranks under the same cap: must finish with the reference's AUC.

Prints one JSON object (AUCs, exit codes, the error line, per-rank peak RSS / address space); exits 1 if
any of the three outcomes differs from the above.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def write_config(out: Path, buckets: int) -> Path:
    raw = yaml.safe_load((ROOT / "examples/criteo/config.yaml").read_text())
    for key in ("train", "valid", "test"):
        raw["data"][key] = str(ROOT / "examples/criteo" / raw["data"][key])
    raw["data"]["cache_dir"] = str(out / "cache")
    raw["fields"][1].pop("min_count", None)
    raw["fields"][1]["hash_buckets"] = buckets
    raw["model"]["dropout"] = 0.0
    raw["train"].update({"epochs": 2, "progress": False, "precision": "fp32", "dist_timeout_s": 300})
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(out: Path, name: str, config: Path, ranks: int, cap_mib: int | None, sharding: str) -> dict:
    report = out / f"{name}.ranks"
    wrapper = [str(HERE / "rank.py"), "--report", str(report)] + (["--cap-mib", str(cap_mib)] if cap_mib else [])
    deepfm = ["--", "train", str(config), "--output", str(out / name), "--no-progress",
              "--set", f"train.embedding_sharding={sharding}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = (launcher if ranks > 1 else [sys.executable]) + wrapper + deepfm
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    metrics = out / name / "metrics.json"
    ranks_seen = sorted(report.glob("rank-*.json")) if report.is_dir() else []
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "valid_auc": json.loads(metrics.read_text())["valid"]["auc"] if metrics.is_file() else None,
            "error": errors[0] if errors else None,
            "ranks": [json.loads(p.read_text()) for p in ranks_seen],
            "tail": None if proc.returncode == 0 or errors else (proc.stdout + proc.stderr)[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=int, default=400_000)
    ap.add_argument("--cap-mib", type=int, default=3800)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / ".out" / "cap")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    config = write_config(a.out, a.buckets)
    result = {"buckets": a.buckets, "table_rows": 26 * a.buckets, "cap_mib": a.cap_mib, "ranks": a.ranks,
              "reference": run(a.out, "reference", config, 1, None, "replicated"),
              "replicated_capped": run(a.out, "replicated", config, a.ranks, a.cap_mib, "replicated"),
              "row_capped": run(a.out, "row", config, a.ranks, a.cap_mib, "row")}
    print(json.dumps(result, indent=1))
    ref, rep, row = result["reference"], result["replicated_capped"], result["row_capped"]
    ok = (ref["exit"] == 0 and rep["exit"] != 0 and rep["error"] is not None and f"{a.cap_mib:,} MiB" in rep["error"]
          and row["exit"] == 0 and abs(row["valid_auc"] - ref["valid_auc"]) <= 1e-4)
    print("as expected: replicated fails naming the cap, row-sharded trains to the reference AUC" if ok
          else "UNEXPECTED outcome (see above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
