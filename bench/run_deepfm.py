"""deepfm as a benchmark contender: the same protocol and JSON line as bench/peers/run_<peer>.py.

    .venv/bin/python bench/run_deepfm.py --train T.tsv --test E.tsv [--precision auto|fp32|bf16] [--max-steps N]

Preprocessing is deepfm's default for the Criteo layout: integer columns log-squared bucketed
(floor(ln(x)^2) for x > 2) into vocabularies, categorical columns into vocabularies (min count 1), both
fitted on the training file; prepared arrays are memory-mapped (so ``prep_rows_per_s`` includes writing
them to disk). Training: embedding 16, DNN 400-400-400, batch 4096, Adam 1e-3 (row-wise sparse Adam on
the embedding table), one epoch; per-step times come from the trainer's step callback, so they include
deepfm's own data loading.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import common  # noqa: E402  (bench/peers/common.py: the shared measurement protocol)

import deepfm  # noqa: E402

try:
    import deepfm.process  # noqa: E402
except ImportError:  # another commit's tree from before deepfm.process (bench/ab_commits.py): it tuned on import
    pass
else:
    deepfm.process.tune_process()  # what the deepfm command applies (OpenMP spin where torch is not loaded yet, malloc)
from deepfm.config import config_from_dict  # noqa: E402
from deepfm.data.loader import load_batch  # noqa: E402
from deepfm.data.store import prepare  # noqa: E402
from deepfm.pipeline import build_model  # noqa: E402
from deepfm.runtime import resolve_precision  # noqa: E402
from deepfm.train.trainer import Trainer  # noqa: E402


def bench_config(train: str, test: str, cache: Path, *, embed_dim: int = 16, batch_size: int = 4096,
                 **train_options):
    """deepfm's configuration in the shared protocol (module docstring) on Criteo-layout TSVs; ``train_options``
    go to the ``train`` section (lr, seed, precision, device, max_steps, ...)."""
    return config_from_dict({
        "data": {"format": "tsv", "header": False, "preset": "criteo", "train": os.path.abspath(train),
                 "test": os.path.abspath(test), "cache_dir": str(cache)},
        "fields": [{"names": common.INT_COLS, "kind": "numeric", "numeric": "log_bucket"},
                   {"names": common.CAT_COLS, "kind": "categorical"}],
        "model": {"embed_dim": embed_dim, "hidden_units": [400, 400, 400]},
        "train": {"batch_size": batch_size, "eval_batch_size": batch_size, "epochs": 1, "lr": 1e-3, "progress": False,
                  "checkpoint_every_steps": 10**9, **train_options},
    })


def main() -> None:
    ap = common.base_parser("deepfm on Criteo-layout TSVs (one epoch, the shared bench protocol)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--name", default=None, help="name in the JSON line (default deepfm-<precision>)")
    ap.add_argument("--keep-cache", action="store_true", help="keep the prepared arrays")
    args = ap.parse_args()
    common.claim_stdout()
    threads = common.setup_torch(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deepfm-bench-"))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = bench_config(args.train, args.test, cache, embed_dim=args.embedding_dim, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, precision=args.precision, device=args.device, num_threads=threads,
                       **({"max_steps": args.max_steps} if args.max_steps else {}))

    t0 = time.perf_counter()
    data = prepare(cfg, progress=False, log=common.log)
    prep_s = time.perf_counter() - t0
    n_train, n_test = len(data.splits["train"]), len(data.splits["test"])

    model = build_model(cfg, data)
    stamps: list[float] = []
    trainer = Trainer(model, cfg.train, work / "run", log=common.log,
                      callbacks=[lambda _t, _s: (common.sync(), stamps.append(time.perf_counter()))])
    start = time.perf_counter()
    trainer.fit(data.splits["train"])
    st = np.array([start] + stamps)
    gaps = np.diff(st)
    full = n_train // args.batch_size
    use = gaps[common.WARMUP_STEPS:min(len(stamps), full)]
    if use.size == 0:
        use = gaps[1:]

    probs, infer_s = common.timed_passes(lambda: trainer.predict(data.splits["test"]))

    m = trainer.model.eval()
    test = data.splits["test"]

    def make_input(bs: int):
        return load_batch(test, (0, bs)).to(trainer.device).tensors()

    lat = common.latency(lambda inp: m(*inp), make_input)
    result = {
        "name": args.name or f"deepfm-{resolve_precision(args.precision, trainer.device)}",
        "version": deepfm.__version__,
        "device": str(trainer.device),
        "prep_rows_per_s": round((n_train + n_test) / prep_s, 1),
        "prep_s": round(prep_s, 3),
        "steps": len(stamps),
        "train_samples_per_s_median": float(np.median(args.batch_size / use)),
        "step_ms_median": float(np.median(use) * 1e3),
        "epoch_wall_s": float(st[-1] - st[0]) if stamps else float("nan"),
        "infer_samples_per_s": round(n_test / infer_s, 1),
        "latency_ms": lat,
        **common.peak_rss(),
        **common.metrics(np.asarray(test.labels), probs),
        "threads": threads,
    }
    common.emit(result, args)
    if not args.keep_cache and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
