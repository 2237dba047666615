"""int8 serving and bf16 matrix products against float32 on one model and one labelled file: table bytes, AUC
and log loss of each, the largest probability difference from float32, and scoring rows/s.

    python bench/serve_int8.py MODEL_DIR DATA [--rows 200000] [--no-bf16]

Cases: the table (float32, int8) x the forward pass's precision (``deepfm serve --precision``). bf16 pays
on CPUs with AMX (or AVX512-BF16) and on GPUs; elsewhere autocast emulates it and is slower (the CPU's
flags are printed).

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
    ap.add_argument("--no-bf16", action="store_true", help="float32 matrix products only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from deepfm.runtime import bf16_supported
    from deepfm.config import CRITEO_COLUMNS
    from deepfm.metrics import summarize
    from deepfm.model.embedding import embedding_table
    from deepfm.serve.state import ServedModel

    frame = pl.read_csv(args.data, separator="\t", has_header=False, new_columns=CRITEO_COLUMNS,
                        infer_schema_length=0)
    labels = frame["label"].cast(pl.Float64).to_numpy()
    features = frame.drop("label")
    big = pl.concat([features] * (args.rows // features.height + 1)).head(args.rows)
    out: dict = {"model": str(args.model_dir), "data": str(args.data), "rows": features.height,
                 "bf16_supported": bf16_supported(torch.device("cpu")), "threads": torch.get_num_threads()}
    print(f"bf16 on this CPU: {'yes (AMX or AVX512-BF16)' if out['bf16_supported'] else 'emulated (slower)'}; "
          f"{out['threads']} torch threads")
    probs = {}
    for precision in ("fp32",) if args.no_bf16 else ("fp32", "bf16"):
        for mode in ("none", "int8"):
            case = ("int8" if mode == "int8" else "fp32-table") + ("" if precision == "fp32" else f"+{precision}")
            served = ServedModel.load(args.model_dir, quantize=mode, precision=precision)
            model = served.predictor.runtime.model
            table = model.table.nbytes if mode == "int8" else embedding_table(model).numel() * 4
            p = served.predictor.predict_proba(features)
            served.predictor.predict_proba(big.head(20_000))  # warm
            t0 = time.perf_counter()
            served.predictor.predict_proba(big)
            rate = args.rows / (time.perf_counter() - t0)
            probs[case] = p
            out[case] = {"table_bytes": table, "rows_per_s": round(rate), **summarize(labels, p)}
            if case != "fp32-table":
                out[case].update(auc_change=out[case]["auc"] - out["fp32-table"]["auc"],
                                 max_prob_diff=float(np.abs(p - probs["fp32-table"]).max()))
            change = "" if case == "fp32-table" else \
                f"  AUC change {out[case]['auc_change']:+.6f}  max |p diff| {out[case]['max_prob_diff']:.2e}"
            print(f"{case:16s} table {table / 2**20:9.1f} MiB  AUC {out[case]['auc']:.6f}  logloss "
                  f"{out[case]['logloss']:.6f}  {rate:,.0f} rows/s{change}", flush=True)
    if "int8" in out:
        out["table_ratio"] = out["int8"]["table_bytes"] / out["fp32-table"]["table_bytes"]
        print(f"int8/fp32 table bytes {out['table_ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
