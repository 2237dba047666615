"""Scale check: a Criteo-sized file (45M rows by default) prepares and trains one epoch with bounded memory.

    .venv/bin/python bench/scale.py [--rows 45000000] [--keep]

Generates the file with bench/generate.py if it is missing (~11 GB), then in this process: preparation
(raw TSV -> memory-mapped typed arrays), one training epoch (embedding 16, DNN 400-400-400, batch 4096,
Adam), and evaluation on a separate 200k-row test file. Prints one JSON line with the wall time of each
stage and the peak resident memory (ru_maxrss) after each; the target is peak RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mb() -> float | None:
    """Resident memory now (peak RSS only ever grows: this shows what a stage holds after an earlier peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=45_000_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-steps", type=int, default=0, help="stop the epoch early (0 = the whole epoch)")
    ap.add_argument("--keep", action="store_true", help="keep the prepared arrays")
    args = ap.parse_args()
    data = HERE / ".data"
    data.mkdir(parents=True, exist_ok=True)
    train, test = data / f"scale{args.rows}.tsv", data / f"scale_test{args.seed}.tsv"
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    # the test file: same seed (same teacher), rows from far along the seed's stream (never in the train file)
    for path, rows, first_block in ((train, args.rows, 0), (test, 200_000, 1_000_000)):
        if not path.is_file():
            subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(rows), "--seed",
                            str(args.seed), "--first-block", str(first_block), "--out", str(path), "--quiet"],
                           check=True)
    stages["generate_s"] = round(time.perf_counter() - t0, 1)

    import deepfm.process

    deepfm.process.tune_process()  # what `deepfm train` applies, before torch loads
    import torch

    from deepfm.config import config_from_dict
    from deepfm.data.store import prepare
    from deepfm.pipeline import build_model
    from deepfm.train.trainer import Trainer

    cache = data / "scale_cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = config_from_dict({
        "data": {"format": "tsv", "header": False, "preset": "criteo", "train": str(train), "test": str(test),
                 "cache_dir": str(cache)},
        "fields": [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "numeric": "log_bucket"},
                   {"names": [f"C{i}" for i in range(1, 27)], "min_count": 2}],
        "model": {"embed_dim": 16, "hidden_units": [400, 400, 400]},
        "train": {"batch_size": 4096, "epochs": 1, "progress": True, "checkpoint_every_steps": 2000,
                  **({"max_steps": args.max_steps} if args.max_steps else {})},
    })
    result: dict = {"rows": args.rows, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=True)
    stages["prepare_s"] = round(time.perf_counter() - t0, 1)
    result["rss_after_prepare_mb"] = rss_mb()
    result["prepare_rows_per_s"] = round((args.rows + 200_000) / stages["prepare_s"])
    result["embedding_rows"] = prepared.layout.num_rows
    trainer = Trainer(build_model(cfg, prepared), cfg.train, cache / "run")
    t0 = time.perf_counter()
    state = trainer.fit(prepared.splits["train"])
    stages["train_epoch_s"] = round(time.perf_counter() - t0, 1)
    result["rss_after_train_mb"] = rss_mb()
    result["rss_now_after_train_mb"] = current_rss_mb()
    result["train_samples_per_s"] = state.history[-1]["samples_per_s"] if state.history else None
    t0 = time.perf_counter()
    result["test"] = trainer.evaluate(prepared.splits["test"])
    stages["evaluate_s"] = round(time.perf_counter() - t0, 1)
    result["stages"] = stages
    result["peak_rss_mb"] = rss_mb()
    result["peak_rss_target_met"] = result["peak_rss_mb"] <= 4096
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
