"""deepfm's scoring pass with and without its native steps, alternated pass by pass in one process.

    python bench/scoring_ab.py [--precision fp32|bf16] [--rounds 40] [--out bench/SCORING.md]

Variants, each a full ``Trainer.predict`` over the test split of the benchmark data (bench/.data/g250000s7,
run_deepfm.py's configuration, batch 4096, after 3 training steps):

- ``torch``: the looked-up rows through the fused head, and torch's Linear + ReLU layers;
- ``bias+relu``: as ``torch``, each float32 hidden layer's bias and ReLU in one native pass after its GEMM;
- ``table``: as ``bias+relu``, the head reading the embedding table itself (``native.head_gather_forward``).

The variants are chosen by replacing ``deepfm.model.paths``' choices for the DNN layers and the table path.

The machine's speed drifts minute to minute (other tenants), so separate runs of two settings compare noise;
here the variants take turns within each round, and the figures are the median over rounds of each variant's
samples/s and of its time ratio to ``torch`` within the round. Writes one JSON line, and ``--out`` a markdown
section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import deepfm.process  # noqa: E402

deepfm.process.tune_process()  # what the deepfm command applies, before torch loads (OpenMP spin)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepfm.model import paths  # noqa: E402
from deepfm import native  # noqa: E402
from deepfm.data.store import prepare  # noqa: E402
from deepfm.pipeline import build_model  # noqa: E402
from deepfm.train.trainer import Trainer  # noqa: E402
from machine import cpu_info  # noqa: E402
from run_deepfm import bench_config  # noqa: E402
from run_all import ensure_data  # noqa: E402  (run_all.py's data)

VARIANTS = {"torch": (False, False), "bias+relu": (True, False), "table": (True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=None, help="append a markdown section with the figures to this file")
    args = ap.parse_args()
    if native.load() is None:
        raise SystemExit("the native kernels are not built (no C compiler, or DEEPFM_NATIVE=0): nothing to compare")
    stem = ensure_data(250_000, 7)
    cfg = bench_config(f"{stem}_train.tsv", f"{stem}_test.tsv", HERE / ".out" / "step_time_cache", seed=1,
                       precision=args.precision, device="cpu", max_steps=3)
    data = prepare(cfg, progress=False, log=lambda _m: None)
    trainer = Trainer(build_model(cfg, data), cfg.train, Path(tempfile.mkdtemp(prefix="deepfm-scoring-")),
                      log=lambda _m: None)
    trainer.fit(data.splits["train"])
    test = data.splits["test"]
    layers_path, gather = paths.layers_path, paths.head_gather_kernel
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    reference = None
    try:
        for _ in range(args.rounds):
            for name, (bias_relu, table) in VARIANTS.items():
                # bias+relu off: the DNN's torch layers (under bf16 autocast that also turns oneDNN's fusion off)
                paths.layers_path = layers_path if bias_relu else (lambda _x: paths.Layers.MODULES)
                paths.head_gather_kernel = gather if table else (lambda *_a: False)
                t0 = time.perf_counter()
                probs = trainer.predict(test)
                times[name].append(time.perf_counter() - t0)
                if reference is None:
                    reference = probs
                elif np.abs(probs - reference).max() > 1e-5:
                    raise SystemExit(f"variant {name} scores differently: max |diff| "
                                     f"{np.abs(probs - reference).max():.2e}")
    finally:
        paths.layers_path, paths.head_gather_kernel = layers_path, gather
    n = len(test)
    base = np.array(times["torch"])
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": cpu_info().get("cpu_model", platform.processor()), "threads": torch.get_num_threads(),
              "precision": trainer.precision, "rounds": args.rounds, "rows": n,
              "samples_per_s": {k: round(n / float(np.median(v))) for k, v in times.items()},
              "speedup_vs_torch": {k: round(float(np.median(base / np.array(v))), 3) for k, v in times.items()}}
    print(json.dumps(result))
    if args.out:
        lines = [f"### {result['date']}, {result['cpu']}, {result['threads']} threads, {result['precision']}, "
                 f"{args.rounds} rounds", "",
                 "| variant | samples/s (median) | speed-up vs torch (median of per-round ratios) |", "|---|---|---|"]
        lines += [f"| {k} | {result['samples_per_s'][k]:,} | {result['speedup_vs_torch'][k]:.3f}x |" for k in VARIANTS]
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
