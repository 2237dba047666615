#!/usr/bin/env python3
"""Model-quality suite: deepfm against its peers on the same splits, several seeds, early stopping on valid.

    python bench/quality/run.py --sets criteo,avazu,adult,synthetic --seeds 3 --rows 200000

Every run is a subprocess (one thread) that prints one JSON line; results are appended to
bench/.out/quality/results.jsonl and reused by the next invocation (same set/rows/contender/seed/settings),
so an interrupted suite resumes.  The table (mean +- sample standard deviation over seeds of test AUC and
log loss) goes to bench/quality/RESULTS.md (``--out``) and stdout.  See bench/quality/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import datasets  # noqa: E402
import stats  # noqa: E402

ENVS = Path(os.environ.get("DEEPFM_PEER_ENVS", "/work/wt-bench/bench/.envs"))
DEEPFM_PY = os.environ.get("DEEPFM_PYTHON", sys.executable)
# Settings shared by every contender on a set: batch size (small sets need small batches: 4096 would be
# 2 steps per epoch on 7k rows), the epoch cap and the early-stopping patience.  Everything else is each
# library's own default.
BATCH = {"criteo": 256, "avazu": 256, "adult": 512, "synthetic": 4096, "criteo-cv": 256, "avazu-cv": 256}
EPOCHS, PATIENCE = 10, 2
CONTENDERS = ("deepfm", "deepfm-tuned", "deepctr-torch", "fuxictr")
SEED0 = 2017
# Sets whose test split has at most this many rows get the paired bootstrap (each run's test scores are kept
# in bench/.out/quality/preds/; a cached run without them is rerun): there the test rows, not the seeds,
# decide how far apart two mean AUCs must be to differ.  Synthetic's 200k test rows resolve ~0.002.
PAIRED_MAX_TEST_ROWS = 10_000
RESAMPLES = 2000


def command(contender: str, data: Path, set_name: str, seed: int) -> list[str] | None:
    bs = BATCH[set_name]
    if contender in ("deepfm", "deepfm-tuned"):
        cmd = [DEEPFM_PY, str(HERE / "deepfm_quality.py"), "--data", str(data), "--seed", str(seed),
               "--name", contender, "--set", f"train.epochs={EPOCHS}", "--set", f"train.patience={PATIENCE}"]
        if contender == "deepfm-tuned":
            cfg = HERE / "configs" / f"{set_name.removesuffix('-cv')}.yaml"  # the CV sets: the base set's
            if not cfg.is_file():
                return None
            return cmd + ["--config", str(cfg)]  # the tuned config's own batch size
        return cmd + ["--set", f"train.batch_size={bs}"]
    peer = {"deepctr-torch": "deepctr", "fuxictr": "fuxictr"}[contender]
    py = ENVS / peer / "bin" / "python"
    return [str(py), str(HERE / "peers" / f"{peer}_quality.py"), "--data", str(data), "--seed", str(seed),
            "--batch-size", str(bs), "--epochs", str(EPOCHS), "--patience", str(PATIENCE), "--threads", "1"]


def deepfm_code_version() -> str:
    """A hash of deepfm's source (Python and C): a cached deepfm result holds only for the code that made it."""
    h = hashlib.sha1()
    src = ROOT / "src" / "deepfm"
    for path in sorted(p for p in src.rglob("*") if p.suffix in (".py", ".c")):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def key_of(cmd: list[str], set_name: str, rows: int, contender: str, seed: int) -> str:
    extra = ""
    if "--config" in cmd:
        extra = Path(cmd[cmd.index("--config") + 1]).read_text()
    if contender.startswith("deepfm"):
        extra += deepfm_code_version()
    h = hashlib.sha1((" ".join(cmd[1:]).replace(str(ROOT), "") + extra).encode()).hexdigest()[:10]
    return f"{set_name}|{rows if set_name == 'synthetic' else ''}|{contender}|{seed}|{h}"


def predictions_path(results_path: Path, key: str) -> Path:
    return results_path.parent / "preds" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")


def paired(set_name: str, rows: int) -> bool:
    sc = datasets.load_schema(datasets.set_dir(set_name, rows))
    return sc["rows_per_split"]["test"] <= PAIRED_MAX_TEST_ROWS


def run_one(cmd: list[str], timeout: int, log_path: Path, predictions: Path | None = None) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src"), "RAY_DEDUP_LOGS": "0"}
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        env["QUALITY_PREDICTIONS"] = str(predictions)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if p.returncode == 0 and lines else None


def fmt(vals: list[float], digits: int = 4) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


CV_INTRO = ("\n## Cross-validated samples\n\nThe ~400-row test splits above cannot separate contenders (AUC "
            "standard error ~0.02). The `-cv` sets pool each sample and test on five disjoint tenths (4,000 / 4,500 "
            "test rows).")


def table(results: dict, sets: list[str], contenders: list[str], rows: int, seeds: dict[str, int],
          res_path: Path) -> str:
    out = []
    for s in sets:
        if s.endswith("-cv") and s == next(x for x in sets if x.endswith("-cv")) and len(sets) > 1:
            out.append(CV_INTRO + f" Seeds per fold: {seeds[s]}.")
        d = datasets.set_dir(s, rows)
        sc = datasets.load_schema(d)
        r = sc["rows_per_split"]
        cv = s.endswith("-cv")
        what = (f"{sc['pooled_rows']:,} rows in {sc['folds']} folds; train / valid / test rows per fold: " if cv else
                "train / valid / test rows: ")
        out.append(f"\n### {s}  ({what}{r['train']:,} / {r['valid']:,} / {r['test']:,}; "
                   f"batch {BATCH[s]} unless the tuned config says otherwise)\n")
        out.append(f"| contender | {'folds x seeds' if cv else 'seeds'} | test AUC (mean ± sd) | "
                   "test log loss (mean ± sd) | valid AUC | epochs run | s / run |")
        out.append("|---|---|---|---|---|---|---|")
        by_fold: dict[str, dict] = {}
        for c in contenders:
            rs = current(results, s, c, rows, seeds[s])
            if not rs:
                continue
            by_fold[c] = {}
            for x in rs:
                by_fold[c].setdefault(x.get("fold"), []).append(x["test_auc"])
            ep = [x.get("epochs_run") for x in rs if x.get("epochs_run")]
            out.append(f"| {c} | {len(rs)} | {fmt([x['test_auc'] for x in rs])} | "
                       f"{fmt([x['test_logloss'] for x in rs])} | {fmt([x['valid_auc'] for x in rs])} | "
                       f"{statistics.fmean(ep):.1f} | {statistics.fmean(x['seconds'] for x in rs):.0f} |"
                       if ep else "")
        if cv and "deepfm" in by_fold:
            out.append("\nPaired by fold (each fold's mean over seeds), deepfm's test AUC minus the other's:\n")
            for c, folds in by_fold.items():
                common = sorted(set(folds) & set(by_fold["deepfm"]))
                if c == "deepfm" or len(common) < 2:
                    continue
                diff = [statistics.fmean(by_fold["deepfm"][f]) - statistics.fmean(folds[f]) for f in common]
                se = statistics.stdev(diff) / len(diff) ** 0.5
                out.append(f"- vs {c}: {' / '.join(f'{d:+.4f}' for d in diff)}; mean {statistics.fmean(diff):+.4f} "
                           f"± {se:.4f} (standard error); deepfm ahead in {sum(d > 0 for d in diff)} of {len(diff)} folds")
        out += bootstrap_lines(results, s, contenders, rows, seeds[s], res_path)
        if s == "synthetic":
            t = sc["teacher"]["test"]
            out.append(f"| *teacher (ceiling)* | - | {t['teacher_auc']:.4f} | {t['teacher_logloss']:.4f} | "
                       f"{sc['teacher']['valid']['teacher_auc']:.4f} | - | - |")
            out.append(f"\n(constant-rate log loss on test: {t['base_logloss']:.4f}; click rate "
                       f"{t['click_rate']:.3f})")
    return "\n".join(out)


def test_labels(data: Path) -> np.ndarray:
    label = datasets.load_schema(data)["label"]
    with open(data / "test.tsv") as f:
        col = f.readline().rstrip("\n").split("\t").index(label)
        return np.array([int(float(ln.split("\t")[col])) for ln in f if ln.strip()], dtype=np.int8)


def bootstrap_lines(results: dict, set_name: str, contenders: list[str], rows: int, seeds: int,
                    res_path: Path) -> list[str]:
    """deepfm's mean test AUC minus each peer's, with a 95% interval from resampling the test rows (paired:
    both contenders' runs scored on the same resample).  Only where every run's test scores are stored and
    their labels are the test file's, row for row."""
    if not paired(set_name, rows) or "deepfm" not in contenders:
        return []
    folds = datasets.folds(set_name)
    labels = {f: test_labels(datasets.set_dir(set_name, rows, f)) for f in folds}
    scores: dict[str, dict] = {}
    for c in contenders:
        runs: dict = {}
        for x in current(results, set_name, c, rows, seeds):
            p = predictions_path(res_path, x["key"])
            if not p.is_file():
                runs = {}
                break
            d = np.load(p)
            if not np.array_equal(d["y"], labels[x.get("fold")]):
                print(f"[{set_name}] {c}: stored test labels differ from the test file; no paired test",
                      file=sys.stderr)
                runs = {}
                break
            runs.setdefault(x.get("fold"), []).append(d["p"])
        if runs and set(runs) == set(folds):
            scores[c] = runs
    if "deepfm" not in scores or len(scores) < 2:
        return []
    n = sum(len(v) for v in labels.values())
    where = " within each fold's test tenth" if len(folds) > 1 else ""
    head = (f"\nPaired bootstrap ({RESAMPLES:,} resamples of the {n:,} test rows{where}; every run scored on "
            "the same resample), deepfm's mean test AUC minus the other's, with its 95% interval:\n")
    lines = [head]
    for c, runs in scores.items():
        if c == "deepfm":
            continue
        r = stats.paired_bootstrap([(labels[f], scores["deepfm"][f], runs[f]) for f in folds], RESAMPLES)
        verdict = ("deepfm ahead" if r.low > 0 else "deepfm behind" if r.high < 0
                   else "not resolved by these test rows")
        lines.append(f"- vs {c}: {r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}]; deepfm >= in {100 * r.a_ahead:.0f}% "
                     f"of resamples: {verdict}")
    return lines


def current(results: dict, set_name: str, contender: str, rows: int, seeds: int) -> list[dict]:
    """The stored runs of ``contender`` on ``set_name`` that the current command, config and (for deepfm) code
    would make: results of an older deepfm or config are kept in the file but not shown."""
    out = []
    for fold, seed in [(f, sd) for f in datasets.folds(set_name) for sd in range(SEED0, SEED0 + seeds)]:
        cmd = command(contender, datasets.set_dir(set_name, rows, fold), set_name, seed)
        label = set_name if fold is None else f"{set_name}#{fold}"
        if cmd is not None and (k := key_of(cmd, label, rows, contender, seed)) in results:
            out.append(results[k])
    return out


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (each run: 1 thread), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="criteo,avazu,adult,synthetic")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cv-seeds", type=int, default=None, help="seeds per fold on the -cv sets (default: --seeds)")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows (80/10/10 split); the issue's 2M: 2000000")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--results", default=str(ROOT / "bench" / ".out" / "quality" / "results.jsonl"))
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--table-only", action="store_true", help="no training: table from stored results")
    args = ap.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    seeds = {s: args.cv_seeds if s.endswith("-cv") and args.cv_seeds else args.seeds for s in sets}
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if res_path.is_file():
        for line in res_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                results[rec["key"]] = rec
    t_start = time.time()
    for s in sets:
        datasets.prepare(s, args.rows, log=lambda m: print(m, file=sys.stderr))
        for fold, seed in [(f, sd) for f in datasets.folds(s) for sd in range(SEED0, SEED0 + seeds[s])]:
            d = datasets.set_dir(s, args.rows, fold)
            label = s if fold is None else f"{s}#{fold}"
            for c in contenders:
                cmd = None if args.table_only else command(c, d, s, seed)
                if cmd is None:
                    continue
                k = key_of(cmd, label, args.rows, c, seed)
                preds = predictions_path(res_path, k) if paired(s, args.rows) else None
                if k in results and (preds is None or preds.is_file()):
                    continue
                t0 = time.time()
                rec = run_one(cmd, args.timeout, res_path.parent / "runs.log", preds)
                if rec is None:
                    print(f"[{s}] {c} seed {seed}: FAILED (see {res_path.parent / 'runs.log'})", file=sys.stderr)
                    continue
                rec.update(key=k, set=s, fold=fold, seed=seed, contender=c)
                results[k] = rec
                with open(res_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[{label}] {c:14s} seed {seed}: test AUC {rec['test_auc']:.4f} logloss {rec['test_logloss']:.4f} "
                      f"(valid AUC {rec['valid_auc']:.4f}, {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    body = table(results, sets, contenders, args.rows, seeds, res_path)
    cmdline = "python bench/quality/run.py " + " ".join(sys.argv[1:])
    md = (f"# deepfm model-quality results\n\nCommand: `{cmdline}`  \n"
          f"Machine: {machine()}  \nDate: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  \n"
          f"Seeds: {args.seeds} ({SEED0}..{SEED0 + args.seeds - 1}); synthetic rows: {args.rows:,}; "
          f"every contender: at most {EPOCHS} epochs, early stopping on validation AUC (patience {PATIENCE}), "
          f"the best validation epoch's weights are tested. Spread = sample standard deviation over seeds.\n"
          f"How the contenders are set up: bench/quality/README.md.\n{body}\n")
    Path(args.out).write_text(md)
    print(md)
    print(f"suite wall time {time.time() - t_start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
