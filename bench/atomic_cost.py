"""What syncing every write to disk costs a small fit: DeepFMClassifier fits with deepfm.io's fsync calls
counted and timed, against the same fits with fsync made a no-op (the writes before issue 21 synced only
streamed safetensors files).

    .venv/bin/python bench/atomic_cost.py [--fits 20] [--rows 2000]

Prints one JSON line: fsync calls per fit, seconds in fsync per fit, and the median fit time with and
without the syncs (rounds interleaved). Run it on a quiet machine; the figures go to bench/FIGURES.md with
the CPU name (`lscpu | grep 'Model name'`), the disk and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import pandas as pd

from deepfm import DeepFMClassifier
from deepfm import io as deepfm_io


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", type=int, default=20)
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"site": rng.integers(0, 50, args.rows).astype(str), "count": rng.poisson(3, args.rows)})
    y = rng.integers(0, 2, args.rows)
    real_fsync = os.fsync
    spent = {"calls": 0, "seconds": 0.0}

    def timed_fsync(fd: int) -> None:
        t = time.perf_counter()
        real_fsync(fd)
        spent["calls"] += 1
        spent["seconds"] += time.perf_counter() - t

    DeepFMClassifier(train={"epochs": 1, "batch_size": 256}).fit(X, y)  # warm-up: imports, native kernels
    times: dict[str, list[float]] = {"synced": [], "unsynced": []}
    for _ in range(args.fits):
        for mode in ("synced", "unsynced"):
            deepfm_io.os.fsync = timed_fsync if mode == "synced" else (lambda fd: None)
            t0 = time.perf_counter()
            DeepFMClassifier(train={"epochs": 1, "batch_size": 256}).fit(X, y)
            times[mode].append(time.perf_counter() - t0)
    deepfm_io.os.fsync = real_fsync
    print(json.dumps({"fits": args.fits, "rows": args.rows, "fsync_calls_per_fit": spent["calls"] / args.fits,
                      "fsync_seconds_per_fit": round(spent["seconds"] / args.fits, 4),
                      "median_fit_s": {k: round(statistics.median(v), 4) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
