"""int8 serving against float32 on one model and one labelled file: table bytes, AUC and log loss of each,
the largest probability difference, and scoring rows/s.

    python bench/serve_int8.py MODEL_DIR DATA [--rows 200000]

Both score DATA through ``deepfm.serve.state.ServedModel`` (the server's loading: the float32 table mapped,
the int8 one from model.int8.safetensors when the directory holds one, else quantized at load), the
probabilities by ``Predictor.predict_proba``; rows/s on DATA's rows repeated to --rows rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from deepfm.config import CRITEO_COLUMNS
    from deepfm.metrics import summarize
    from deepfm.model.embedding import embedding_table
    from deepfm.serve.state import ServedModel

    frame = pl.read_csv(args.data, separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                        infer_schema_length=0)
    labels = frame["label"].cast(pl.Float64).to_numpy()
    features = frame.drop("label")
    big = pl.concat([features] * (args.rows // features.height + 1)).head(args.rows)
    out: dict = {"model": str(args.model_dir), "data": str(args.data), "rows": features.height}
    probs = {}
    for mode in ("none", "int8"):
        served = ServedModel.load(args.model_dir, quantize=mode)
        model = served.predictor.runtime.model
        table = model.table.nbytes if mode == "int8" else embedding_table(model).numel() * 4
        p = served.predictor.predict_proba(features)
        served.predictor.predict_proba(big.head(20_000))  # warm
        t0 = time.perf_counter()
        served.predictor.predict_proba(big)
        rate = args.rows / (time.perf_counter() - t0)
        probs[mode] = p
        out[mode] = {"table_bytes": table, "rows_per_s": round(rate), **summarize(labels, p)}
        print(f"{mode:5s} table {table / 2**20:9.1f} MiB  AUC {out[mode]['auc']:.6f}  logloss "
              f"{out[mode]['logloss']:.6f}  {rate:,.0f} rows/s", flush=True)
    out["table_ratio"] = out["int8"]["table_bytes"] / out["none"]["table_bytes"]
    out["auc_change"] = out["int8"]["auc"] - out["none"]["auc"]
    out["max_prob_diff"] = float(np.abs(probs["int8"] - probs["none"]).max())
    print(f"int8/fp32 table bytes {out['table_ratio']:.3f}, AUC change {out['auc_change']:+.6f}, "
          f"max |probability difference| {out['max_prob_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
