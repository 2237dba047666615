"""deepfm's training step and predict pass on the benchmark data, for A/B runs of one setting against another.

    python bench/step_time.py [--precision fp32] [--steps 40] [--busy 1] [--tag NAME]
    GOMP_SPINCOUNT=300000 python bench/step_time.py --tag "libgomp default"      # an environment setting
    PYTHONPATH=/path/to/other/tree/src python bench/step_time.py --tag baseline  # another commit's code

Prints one JSON line: the median step time over the steps after 5 warm-up steps (data loading included) and
the best of 5 predict passes over the test split. Uses bench/.data/g250000s7 (run_all.py's data; generated
when missing) and run_deepfm.py's configuration (batch 4096). ``--busy N`` runs N busy-looping
processes beside it. Interleave the settings in rounds and compare medians (bench/THREADS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
try:
    import deepfm.process  # noqa: E402
except ImportError:  # another commit's tree from before deepfm.process (bench/ab_commits.py): it tuned on import
    import deepfm  # noqa: E402,F401
else:
    deepfm.process.tune_process()  # what the deepfm command applies, before torch loads (OpenMP spin)
import common  # noqa: E402
import numpy as np  # noqa: E402

from deepfm.data.store import prepare  # noqa: E402
from deepfm.pipeline import build_model  # noqa: E402
from deepfm.train.trainer import Trainer  # noqa: E402
from run_all import ensure_data  # noqa: E402  (run_all.py's data)
from run_deepfm import bench_config  # noqa: E402  (the shared protocol's deepfm configuration)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--busy", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    stem = ensure_data(250_000, 7)
    work = Path(tempfile.mkdtemp(prefix="deepfm-step-"))
    cfg = bench_config(f"{stem}_train.tsv", f"{stem}_test.tsv", HERE / ".out" / "step_time_cache", seed=1,
                       precision=args.precision, device="cpu", max_steps=args.steps)
    data = prepare(cfg, progress=False, log=lambda _m: None)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        stamps: list[float] = []
        trainer = Trainer(build_model(cfg, data), cfg.train, work / "run", log=lambda _m: None,
                          callbacks=[lambda _t, _s: stamps.append(time.perf_counter())])
        t0 = time.perf_counter()
        trainer.fit(data.splits["train"])
        gaps = np.diff(np.array([t0] + stamps))[common.WARMUP_STEPS:]
        test = data.splits["test"]
        passes = []
        for _ in range(5):
            t1 = time.perf_counter()
            trainer.predict(test)
            passes.append(time.perf_counter() - t1)
    finally:
        for proc in busy:
            proc.kill()
    print(json.dumps({"tag": args.tag, "precision": trainer.precision, "busy": args.busy,
                      "step_ms": float(np.median(gaps) * 1e3), "train_samples_per_s": 4096 / float(np.median(gaps)),
                      "infer_samples_per_s": len(test) / float(np.min(passes))}))


if __name__ == "__main__":
    main()
