"""Arguments and output of the multi-epoch "quality" peer runners (numpy/pandas/sklearn only)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "peers"))
import common  # noqa: E402  bench/peers/common.py: metrics, log, claim_stdout, emit

sys.path.insert(0, os.path.dirname(HERE))
from stats import save_predictions  # bench/quality/stats.py

common.claim_stdout()


def parser(desc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--data", required=True, help="folder with train.tsv / valid.tsv / test.tsv / schema.json")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10, help="most epochs; early stopping on valid ends sooner")
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    return ap


def schema(args) -> dict:
    with open(os.path.join(args.data, "schema.json")) as f:
        return json.load(f)


def path(args, split: str) -> str:
    return os.path.join(args.data, f"{split}.tsv")


def setup(args):
    import numpy as np
    import random
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    return time.perf_counter()


def finish(name: str, version: str, args, t0: float, y_valid, p_valid, y_test, p_test, **extra) -> None:
    m_test = common.metrics(y_test, p_test)
    m_valid = common.metrics(y_valid, p_valid)
    res = {"contender": name, "version": version, "seed": args.seed, "batch_size": args.batch_size,
           "valid_auc": m_valid["test_auc"], "valid_logloss": m_valid["test_logloss"],
           "test_auc": m_test["test_auc"], "test_logloss": m_test["test_logloss"],
           "seconds": round(time.perf_counter() - t0, 2), **extra}
    save_predictions(y_test, p_test)
    out = common._REAL_STDOUT or sys.stdout
    out.write(json.dumps(res) + "\n")
    out.flush()
