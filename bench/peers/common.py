"""Shared measurement helpers for the peer runners (bench/peers/run_<peer>.py).

Only numpy, torch and scikit-learn are used here, so this module imports in
every peer venv.  It does no modelling: each runner uses its own library's
public API for preprocessing, the model and training, and uses this module
only to time things and to print the one JSON result line.

Metrics (identical definition for every peer):

* ``prep_rows_per_s``: (train rows + test rows) / wall seconds from the raw
  TSV files to model-ready arrays/loaders, with the library's own
  preprocessing.
* ``train_samples_per_s_median``: the optimizer's ``step`` is wrapped to take a
  timestamp after every step; per-step time = gap between consecutive step
  completions (so it includes the library's own data loading, forward,
  backward and update); median of batch/gap over the steps after a warm-up of
  ``WARMUP_STEPS`` steps.  The last (partial) batch is excluded.
* ``epoch_wall_s``: from the call of the library's fit/train loop to the end
  of the last optimizer step (end-of-epoch evaluation/checkpointing that some
  libraries do inside fit is not included).
* ``infer_samples_per_s``: test rows / wall seconds of the library's predict
  path at batch 4096 over the whole test set; the median of ``INFER_PASSES``
  passes.
* ``latency_ms``: model forward on already-encoded inputs, model.eval(),
  torch.no_grad(), batch 1 and batch 100, ~200 timed calls after 20 warm-up
  calls; median and p99.
* On CUDA every timestamp above is taken after ``torch.cuda.synchronize()``.
* ``peak_rss_mb``: resource.getrusage(RUSAGE_SELF).ru_maxrss of the runner
  process (worker processes a library may spawn are not included; see
  ``peak_rss_children_mb``).
* ``test_auc`` / ``test_logloss``: sklearn roc_auc_score / log_loss on the
  test file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

WARMUP_STEPS = 5
LAT_WARMUP = 20
LAT_CALLS = 200
INFER_PASSES = 3  # predict passes over the test set; the median pass is reported

# On CUDA, kernels run asynchronously: every timestamp waits for the device first (setup_torch sets this),
# so a step's time is its real time on the GPU for every contender alike.
_sync = lambda: None  # noqa: E731


def sync() -> None:
    _sync()


def timed_passes(predict, passes: int = INFER_PASSES):
    """(the last pass's result, the median pass's seconds): one pass over a ~25k-row test set lasts a fraction
    of a second, so a single one is at the mercy of a shared machine; every contender gets the same passes."""
    seconds, out = [], None
    for _ in range(passes):
        sync()
        t0 = time.perf_counter()
        out = predict()
        sync()
        seconds.append(time.perf_counter() - t0)
    return out, float(np.median(seconds))

INT_COLS = [f"I{i}" for i in range(1, 14)]
CAT_COLS = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label"] + INT_COLS + CAT_COLS


def base_parser(desc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=desc)
    ap.add_argument("--train", required=True, help="train TSV (Criteo layout, no header)")
    ap.add_argument("--test", required=True, help="test TSV (Criteo layout, no header)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap training steps (0 = one full epoch)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--workdir", default=None, help="scratch dir (default bench/.out/<peer>)")
    ap.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    return ap


def setup_torch(args) -> int:
    import torch
    n = args.threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    global _sync
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("cuda requested but not available; using cpu")
        args.device = "cpu"
    if args.device.startswith("cuda"):
        _sync = torch.cuda.synchronize
    return n


def workdir(args, peer: str) -> str:
    d = args.workdir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".out", peer)
    os.makedirs(d, exist_ok=True)
    return d


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def count_rows(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                break
            n += b.count(b"\n")
    return n


class StepTimer:
    """Wraps optimizer.step to record a timestamp after every step."""

    def __init__(self, optimizer, batch_size: int, max_steps: int = 0, on_max=None):
        self.opt = optimizer
        self.batch = batch_size
        self.max_steps = max_steps
        self.on_max = on_max
        self.t_start = None
        self.stamps = []
        self._orig = optimizer.step

        def step(*a, **k):
            r = self._orig(*a, **k)
            _sync()
            self.stamps.append(time.perf_counter())
            if self.max_steps and len(self.stamps) == self.max_steps and self.on_max:
                self.on_max()
            return r

        optimizer.step = step

    def start(self):
        self.t_start = time.perf_counter()

    def restore(self):
        self.opt.step = self._orig

    def summary(self, n_train_rows: int) -> dict:
        st = np.array([self.t_start] + self.stamps)
        gaps = np.diff(st)
        n_steps = len(self.stamps)
        full = n_train_rows // self.batch            # steps with a full batch
        use = gaps[WARMUP_STEPS:min(n_steps, full)]
        if use.size == 0:
            use = gaps[min(1, gaps.size - 1):]
        return {
            "steps": n_steps,
            "train_samples_per_s_median": float(np.median(self.batch / use)) if use.size else float("nan"),
            "step_ms_median": float(np.median(use) * 1e3) if use.size else float("nan"),
            "step_ms_p10_p90": [float(np.percentile(use, 10) * 1e3), float(np.percentile(use, 90) * 1e3)] if use.size else None,
            "warmup_steps_ms": [float(g * 1e3) for g in gaps[:WARMUP_STEPS]],
            "epoch_wall_s": float(st[-1] - st[0]) if n_steps else float("nan"),
        }


def latency(forward, make_input, sizes=(1, 100)) -> dict:
    """forward(inp) under no_grad; make_input(bs) -> encoded input for bs rows."""
    import torch
    out = {}
    with torch.no_grad():
        for bs in sizes:
            inp = make_input(bs)
            for _ in range(LAT_WARMUP):
                forward(inp)
            ts = np.empty(LAT_CALLS)
            for i in range(LAT_CALLS):
                t0 = time.perf_counter()
                forward(inp)
                _sync()
                ts[i] = time.perf_counter() - t0
            out[f"b{bs}"] = {"median": float(np.median(ts) * 1e3), "p99": float(np.percentile(ts, 99) * 1e3)}
    return out


def metrics(y_true, y_pred) -> dict:
    from sklearn.metrics import log_loss, roc_auc_score
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.clip(np.asarray(y_pred, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return {"test_auc": float(roc_auc_score(y_true, y_pred)), "test_logloss": float(log_loss(y_true, y_pred))}


def peak_rss() -> dict:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ch_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(self_kb / 1024.0, 1), "peak_rss_children_mb": round(ch_kb / 1024.0, 1)}


_REAL_STDOUT = None


def claim_stdout() -> None:
    """Send everything libraries print to stderr; stdout carries only the JSON line."""
    global _REAL_STDOUT
    if _REAL_STDOUT is None:
        _REAL_STDOUT = sys.stdout
        sys.stdout = sys.stderr


def emit(result: dict, args) -> None:
    # Load average at the end: flags runs that shared the cores with other work.
    result["loadavg_1m_5m"] = [round(x, 2) for x in os.getloadavg()[:2]]
    result["cpus"] = os.cpu_count()
    line = json.dumps(result, sort_keys=False)
    out = _REAL_STDOUT or sys.stdout
    out.write(line + "\n")
    out.flush()
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
