#!/usr/bin/env python3
"""Check deepfm's defaults on VALIDATION AUC only (the test file is never read: ``--no-test``).

From a baseline (deepfm's defaults, with the suite's per-set batch size) one knob at a time is changed;
each variant is trained with several seeds and the mean validation AUC / log loss are reported with the
difference to the baseline and the baseline's seed spread.  Results: bench/.out/quality/sweep.jsonl
(reused), table on stdout and in bench/quality/SWEEP.md.

    python bench/quality/sweep.py --sets criteo,avazu,adult --seeds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import datasets  # noqa: E402
import run  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "baseline (defaults)": [],
    "init_std=1e-2": ["model.init_std=0.01"],
    "init_std=1e-3": ["model.init_std=0.001"],
    "numeric=standardize": ["@numeric=standardize"],
    "numeric=scale": ["@numeric=scale"],
    "embedding_l2=1e-5": ["train.embedding_l2=1e-5"],
    "embedding_l2=1e-4": ["train.embedding_l2=1e-4"],
    "embedding_l2=1e-3": ["train.embedding_l2=1e-3"],
    "dropout=0.2": ["model.dropout=0.2"],
    "dropout=0.5": ["model.dropout=0.5"],
    "no lr decay (plateau factor 1)": ["train.lr_plateau_factor=1.0"],
    "lr=3e-3": ["train.lr=0.003"],
    "batch=1024": ["@batch=1024"],
    "batch=4096 (default)": ["@batch=4096"],
    "min_count=2": ["@min_count=2"],
    "hidden=[200,200,200]": ["model.hidden_units=[200,200,200]"],
}


def variant_args(set_name: str, spec: list[str]) -> tuple[list[str], str | None]:
    """--set overrides and, for field-level knobs, a config file with the fields written out."""
    sets = [f"train.batch_size={run.BATCH[set_name]}", f"train.epochs={run.EPOCHS}", f"train.patience={run.PATIENCE}"]
    field_opts: dict = {}
    for s in spec:
        if s.startswith("@batch="):
            sets[0] = f"train.batch_size={s.split('=')[1]}"
        elif s.startswith("@numeric="):
            field_opts["numeric"] = s.split("=")[1]
        elif s.startswith("@min_count="):
            field_opts["min_count"] = int(s.split("=")[1])
        else:
            sets.append(s)
    return sets, field_opts or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="criteo,avazu,adult")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    args = ap.parse_args()
    import yaml

    out = HERE.parents[1] / "bench" / ".out" / "quality"
    out.mkdir(parents=True, exist_ok=True)
    store = out / "sweep.jsonl"
    done = {}
    if store.is_file():
        for ln in store.read_text().splitlines():
            r = json.loads(ln)
            done[(r["set"], r["variant"], r["seed"], r.get("rows"))] = r
    names = [v for v in VARIANTS if args.variants is None or v in args.variants.split(",")]
    lines = ["# deepfm defaults checked on validation AUC (test rows never read)", "",
             f"Command: `python bench/quality/sweep.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {run.machine()}", ""]
    for s in [x for x in args.sets.split(",") if x]:
        d = datasets.prepare(s, args.rows)
        sc = datasets.load_schema(d)
        rows = args.rows if s == "synthetic" else None
        for v in names:
            if v.startswith("numeric=") and not sc["numeric"]:
                continue
            sets, field_opts = variant_args(s, VARIANTS[v])
            for seed in range(run.SEED0, run.SEED0 + args.seeds):
                if (s, v, seed, rows) in done:
                    continue
                cmd = [run.DEEPFM_PY, str(HERE / "deepfm_quality.py"), "--data", str(d), "--seed", str(seed),
                       "--no-test", "--name", v]
                for x in sets:
                    cmd += ["--set", x]
                if field_opts:
                    fields = [{"names": sc["categorical"], "kind": "categorical",
                               **{k: val for k, val in field_opts.items() if k == "min_count"}}]
                    if sc["numeric"]:
                        fields.insert(0, {"names": sc["numeric"], "kind": "numeric", **field_opts})
                    cfg = out / f"sweep_{s}_{abs(hash(v)) % 10**8}.yaml"
                    cfg.write_text(yaml.safe_dump({"fields": fields}))
                    cmd += ["--config", str(cfg)]
                rec = run.run_one(cmd, 3600, out / "sweep.log")
                if rec is None:
                    print(f"[{s}] {v} seed {seed}: FAILED", file=sys.stderr)
                    continue
                rec.update(set=s, variant=v, seed=seed, rows=rows)
                done[(s, v, seed, rows)] = rec
                with open(store, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[{s}] {v:32s} seed {seed}: valid AUC {rec['valid_auc']:.4f} "
                      f"(epochs {rec['epochs_run']}, {rec['seconds']:.0f}s)", file=sys.stderr, flush=True)
        base = [done[k]["valid_auc"] for k in done if k[0] == s and k[1] == names[0] and k[3] == rows]
        if not base:
            continue
        b = statistics.fmean(base)
        sd = statistics.stdev(base) if len(base) > 1 else 0.0
        r = sc["rows_per_split"]
        lines += [f"## {s} (train {r['train']:,} / valid {r['valid']:,} rows; baseline batch {run.BATCH[s]})", "",
                  "| variant | seeds | valid AUC mean | Δ vs baseline | valid log loss | best epoch |",
                  "|---|---|---|---|---|---|"]
        for v in names:
            rs = [done[k] for k in done if k[0] == s and k[1] == v and k[3] == rows]
            if not rs:
                continue
            m = statistics.fmean(x["valid_auc"] for x in rs)
            lines.append(f"| {v} | {len(rs)} | {m:.4f}" + (f" ± {statistics.stdev([x['valid_auc'] for x in rs]):.4f}"
                                                          if len(rs) > 1 else "")
                         + f" | {m - b:+.4f} | {statistics.fmean(x['valid_logloss'] for x in rs):.4f} | "
                         f"{statistics.fmean(x['best_epoch'] for x in rs):.1f} |")
        lines += ["", f"(baseline seed spread: sd {sd:.4f})", ""]
    text = "\n".join(lines) + "\n"
    (HERE / "SWEEP.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
