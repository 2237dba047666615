"""Preparation speed of one CSV/TSV file (Criteo layout, no header): rows/s of ``prepare`` into a fresh cache.

    python bench/prepare_speed.py bench/.data/c1m.tsv --repeat 3 [--general]

Prints one JSON line: the file, its rows, whether the fast path ran, each run's wall and CPU seconds (all threads
of this process: steadier than wall time on a shared machine) and the best rows/s by each. ``--general`` sets
``data.skip_bad_rows``, which sends preparation down the general path.
Generate the file first with ``bench/generate.py`` (``--rows 1000000 --seed 1 --out bench/.data/c1m.tsv``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from deepfm.config import config_from_dict
from deepfm.data.store import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--general", action="store_true", help="the general path (data.skip_bad_rows: true)")
    args = ap.parse_args()
    runs, cpu, fast, rows = [], [], None, 0
    for _ in range(args.repeat):
        cache = Path(tempfile.mkdtemp(prefix="deepfm-prep-"))
        try:
            cfg = config_from_dict({
                "data": {"format": "tsv", "header": False, "preset": "criteo", "train": args.file,
                         "cache_dir": str(cache), "skip_bad_rows": args.general},
                "fields": [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "min_count": 2},
                           {"names": [f"C{i}" for i in range(1, 27)], "min_count": 2}],
                "model": {}, "train": {}})
            t0, c0 = time.perf_counter(), time.process_time()
            data = prepare(cfg, progress=False, log=lambda _msg: None)
            runs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            fast, rows = data.manifest["fast_path"], data.manifest["splits"]["train"]["rows"]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"file": args.file, "rows": rows, "fast_path": fast, "seconds": [round(s, 2) for s in runs],
                      "cpu_seconds": [round(s, 2) for s in cpu], "rows_per_s": round(rows / min(runs)),
                      "rows_per_cpu_s": round(rows / min(cpu)), "cpu": platform.processor() or platform.machine()}))


if __name__ == "__main__":
    main()
