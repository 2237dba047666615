"""What explaining a model costs: seconds of ``deepfm explain`` on the bundled example, rows/s of per-row
attributions.

    python bench/explain_cost.py runs/criteo          # after `make example`; figures go in bench/EXPLAIN.md

Importance: ``explain_data`` on the example's test split (391 rows x 39 fields x (5 shuffles + 1 missing)
scoring passes), median of ``--repeat`` runs. Attributions: ``attribute_input`` on the training split's
7,200 rows (bias + linear + FM exactly, the DNN by DeepLIFT), in batches of 4,096, median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from deepfm.artifact import load_model
from deepfm.data.batch import input_from_chunk
from deepfm.data.readers import read_chunks
from deepfm.explain import attribute_input, explain_data
from deepfm.explain.importance import concat_encoded
from deepfm.predict import infer_data_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "criteo" / "data"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    loaded = load_model(Path(args.model_dir))
    seconds = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        explain_data(loaded, str(DATA / "test.tsv"))
        seconds.append(time.perf_counter() - started)
    cfg, _ = infer_data_config(loaded.config.data, str(DATA / "train.tsv"))
    enc = concat_encoded([loaded.encoder.transform(c, labels=True) for c in read_chunks(str(DATA / "train.tsv"),
                                                                                        cfg, None)])
    inp = input_from_chunk(enc)
    rates = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        attribute_input(loaded, inp)
        rates.append(len(inp) / (time.perf_counter() - started))
    print(f"{time.strftime('%Y-%m-%d')}  {cpu_name()}  torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"deepfm explain on test.tsv (391 rows, 39 fields, 5 shuffles): {statistics.median(seconds):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"per-row attributions on train.tsv ({len(inp):,} rows): {statistics.median(rates):,.0f} rows/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
