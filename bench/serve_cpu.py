"""CPU time of one predict request inside one process, stage by stage: the short lane's parse of the body, the
checks of each value (``ServedModel.validate``), encoding + forward pass (``score_rows``, the path the server
takes) and the answer (the response object, written). No HTTP, so the figures move less on a busy machine
than ``serve_load.py``'s; torch runs 1 thread, as ``deepfm serve`` does on 2 cores.

    python bench/serve_cpu.py runs/g250k bench/.data/g250k_test.tsv --rows 1000
    PYTHONPATH=/tmp/old/src python bench/serve_cpu.py ...   # another source tree, for a comparison
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import load_rows  # noqa: E402

from deepfm.serve import routes  # noqa: E402
from deepfm.serve.batcher import score_rows  # noqa: E402
from deepfm.serve.lane import plain_rows  # noqa: E402
from deepfm.serve.settings import ServeSettings  # noqa: E402
from deepfm.serve.state import ServingState  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--rows", type=int, default=1000, help="rows per request")
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = ServeSettings()
    served = ServingState(settings, args.model_dir).model
    feats = load_rows(args.data, args.model_dir)[:args.rows]
    body = json.dumps({"rows": [{"id": i, "features": f} for i, f in enumerate(feats)]}).encode()
    respond = getattr(routes, "FastJSONResponse", routes.JSONResponse)

    def request() -> tuple[np.ndarray, str]:
        t = [time.process_time()]
        ids, rows = plain_rows(body, settings.max_json_depth, settings.max_rows)
        t.append(time.process_time())
        checked = served.validate(rows)
        t.append(time.process_time())
        probs, path = score_rows(served, checked, settings.fast_path_max_rows)
        t.append(time.process_time())
        routes.check_finite(probs)
        respond({"model_version": served.version,
                 "predictions": [{"id": i, "probability": p} for i, p in zip(ids, probs.tolist())]})
        t.append(time.process_time())
        return np.diff(t), path

    runs = [request() for _ in range(args.reps)]
    ms = np.median([r[0] for r in runs], axis=0) * 1e3
    print(f"{len(feats)} rows, path {runs[0][1]}: parse {ms[0]:.2f}  checks {ms[1]:.2f}  encode+forward "
          f"{ms[2]:.2f}  answer {ms[3]:.2f}  total {ms.sum():.2f} ms CPU (median of {args.reps})")


if __name__ == "__main__":
    main()
