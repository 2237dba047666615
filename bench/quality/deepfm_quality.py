#!/usr/bin/env python3
"""deepfm contender of the quality suite: one training run, one JSON line on stdout.

``--config NAME.yaml`` (bench/quality/configs/) gives fields/model/train for the set; without it deepfm
runs at its defaults (every config default; numeric columns ``kind: numeric`` = log_bucket, categorical
columns ``kind: categorical``, min_count 1).  The data section is always filled in from the set's folder.
Run with the deepfm venv and PYTHONPATH=<worktree>/src.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import save_predictions  # (numpy: after the thread setting)


def build_config(data_dir: str, config: str | None, overrides: list[str], test: bool = True):
    import yaml

    from deepfm.config import config_from_dict

    sc = json.loads((Path(data_dir) / "schema.json").read_text())
    raw = yaml.safe_load(Path(config).read_text()) if config else {}
    raw = raw or {}
    raw["data"] = {"format": "tsv", "header": True, "label": sc["label"],
                   **{s: str(Path(data_dir) / f"{s}.tsv") for s in ("train", "valid", "test") if test or s != "test"},
                   **{k: v for k, v in (raw.get("data") or {}).items() if k not in ("train", "valid", "test")}}
    if "fields" not in raw:
        raw["fields"] = [{"names": sc["categorical"], "kind": "categorical"}]
        if sc["numeric"]:
            raw["fields"].insert(0, {"names": sc["numeric"], "kind": "numeric"})
    return config_from_dict(raw, config or "<defaults>", overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value overrides")
    ap.add_argument("--name", default="deepfm")
    ap.add_argument("--no-test", action="store_true", help="do not read the test file (validation-only tuning)")
    args = ap.parse_args()
    import numpy as np
    import torch

    from deepfm.pipeline import train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args.data, args.config, [
            f"train.seed={args.seed}", "train.num_threads=1", "train.progress=false",
            f"data.cache_dir={tmp}/cache", *args.set], test=not args.no_test)
        res = train(cfg, Path(tmp) / "model", log=lambda m: print(m, file=sys.stderr))
        test = res.data.splits.get("test")
        if test is not None:  # the test rows in file order, for run.py's paired bootstrap (when it asks)
            save_predictions(np.asarray(test.labels), res.trainer.predict(test))
    m = res.metrics
    print(json.dumps({"contender": args.name, "seed": args.seed, "batch_size": cfg.train.batch_size,
                      "valid_auc": m["valid"]["auc"], "valid_logloss": m["valid"]["logloss"],
                      **({"test_auc": m["test"]["auc"], "test_logloss": m["test"]["logloss"]} if "test" in m else {}),
                      "best_epoch": m["train"]["best_epoch"], "epochs_run": m["train"]["epochs_run"],
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)


if __name__ == "__main__":
    main()
