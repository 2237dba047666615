"""Negative downsampling against none, on the generated benchmark data: test AUC, calibration, training time.

    python bench/generate.py --rows 1000000 --seed 1 --out bench/.data/ns1m.tsv --split
    .venv/bin/python bench/negative_sampling.py --data bench/.data/ns1m [--rates 1.0 0.1] [--rounds 2]

Each rate trains deepfm with the Criteo-layout defaults of bench/run_deepfm.py (log-bucketed integers,
categorical vocabularies, embedding 16, DNN 400-400-400, Adam 1e-3, batch 4096, one epoch) on
``<data>_train.tsv`` (validation on ``<data>_valid.tsv``, test on ``<data>_test.tsv``, neither sampled) through
``deepfm.pipeline.train``, so the scores are the ones a user gets: probabilities calibrated back by log(w).
Calibration is mean prediction / observed click rate on the test split; the uncorrected column shows what
the same model would report without the correction. Rounds interleave the rates (the machine may be shared:
training seconds are the median of the rounds, AUC and calibration are the same every round). Writes
``bench/NEGATIVE_SAMPLING.md``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepfm.config import CRITEO_COLUMNS, config_from_dict
from deepfm.data.store import prepare
from deepfm.pipeline import train

INT_COLS = [f"I{i}" for i in range(1, 14)]
CAT_COLS = [f"C{i}" for i in range(1, 27)]


def config(data: str, rate: float, cache: Path, args: argparse.Namespace, seed: int = 2017,
           weighted: dict[str, str] | None = None):
    """``weighted``: the importance-weighted files of ``weighted_files`` instead (no sampling by deepfm)."""
    files = weighted or {s: f"{data}_{s}.tsv" for s in ("train", "valid", "test")}
    layout = ({"columns": CRITEO_COLUMNS + [WEIGHT], "weight_column": WEIGHT} if weighted else
              {"preset": "criteo", "negative_sampling_rate": rate, "sampling_seed": seed})
    return config_from_dict({
        "data": {"format": "tsv", "header": False, **files, "cache_dir": str(cache), **layout},
        "fields": [{"names": INT_COLS, "kind": "numeric", "numeric": "log_bucket"},
                   {"names": CAT_COLS, "kind": "categorical"}],
        "model": {"embed_dim": 16, "hidden_units": [400, 400, 400]},
        "train": {"batch_size": args.batch_size, "eval_batch_size": 16384, "epochs": args.epochs, "lr": 1e-3,
                  "seed": seed, "precision": args.precision, "progress": False, "patience": args.patience,
                  "checkpoint_every_steps": 10**9},
    })


WEIGHT = "weight"


def weighted_files(data: str, rate: float, seed: int, work: Path) -> dict[str, str]:
    """The alternative to ``negative_sampling_rate``: the training file's negatives kept with probability
    ``rate`` (numpy, seeded) and every kept row given an importance weight (1 / rate on negatives, 1 on
    positives) in an extra column, for ``data.weight_column``; valid and test keep every row, weight 1."""
    out = {}
    for split in ("train", "valid", "test"):
        lines = Path(f"{data}_{split}.tsv").read_text().splitlines()
        if split == "train":
            rng = np.random.default_rng(seed)
            draws = rng.random(len(lines))
            lines = [f"{ln}\t1" if ln[0] == "1" else f"{ln}\t{1 / rate!r}" for ln, u in zip(lines, draws)
                     if ln[0] == "1" or u < rate]
        else:
            lines = [f"{ln}\t1" for ln in lines]
        path = work / f"weighted_{split}.tsv"
        path.write_text("\n".join(lines) + "\n")
        out[split] = str(path)
    return out


def run(data: str, rate: float, work: Path, args: argparse.Namespace, seed: int = 2017,
        weights: bool = False) -> dict:
    cfg = config(data, rate, work / "cache", args, seed,
                 weighted_files(data, rate, seed, work) if weights else None)
    t0 = time.perf_counter()
    prepared = prepare(cfg, progress=False, log=lambda m: None)
    prep_s = time.perf_counter() - t0
    out = work / f"model-{rate}"
    result = train(cfg, out, log=lambda m: None)
    assert result is not None
    test = result.metrics["test"]
    labels = np.asarray(prepared.splits["test"].labels, dtype=np.float64)
    probs = np.clip(result.trainer.predict(prepared.splits["test"]), 1e-12, 1 - 1e-12)
    # what the model would score without the correction (importance weights: there is none to undo)
    shift = 0.0 if weights else cfg.data.logit_shift
    uncorrected = 1.0 / (1.0 + np.exp(-(np.log(probs / (1 - probs)) - shift)))
    row = {"rate": rate, "train_rows": len(prepared.splits["train"]),
           "train_positive_share": float(np.mean(np.asarray(prepared.splits["train"].labels))),
           "prep_s": prep_s, "train_s": sum(r["seconds"] for r in result.history),
           "steps": result.metrics["train"]["steps"], "epochs_run": result.metrics["train"]["epochs_run"],
           "best_epoch": result.metrics["train"]["best_epoch"], "auc": test["auc"], "logloss": test["logloss"],
           "calibration": test["calibration"], "uncorrected_calibration": float(uncorrected.mean() / labels.mean()),
           "test_rows": len(labels)}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    return row


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="bench/.data/ns1m", help="stem of <stem>_train/_valid/_test.tsv")
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2017],
                    help="round k trains (and samples) with seed k of this list, cycling; with several seeds the "
                         "table gives means over rounds and each round's paired AUC gap")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--patience", type=int, default=10**6,
                    help="early stopping on validation AUC (default: run every epoch); the best epoch is kept")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--importance-weights", action="store_true",
                    help="also run each rate < 1 as the user's own downsampling with weights 1/rate on the kept "
                         "negatives (data.weight_column) instead of negative_sampling_rate")
    ap.add_argument("--out", default="bench/NEGATIVE_SAMPLING.md")
    ap.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    args = ap.parse_args()

    variants = [(f"{r:g}", r, False) for r in args.rates]
    if args.importance_weights:
        variants += [(f"{r:g} (weights)", r, True) for r in args.rates if r < 1]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="deepfm-ns-") as tmp:
        for rnd in range(args.rounds):
            for name, rate, weights in variants:
                row = run(args.data, rate, Path(tmp), args, args.seeds[rnd % len(args.seeds)], weights)
                runs[name].append(row)
                print(f"round {rnd + 1} {name}: " + ", ".join(
                    f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    base = variants[0][0]
    med = {r: float(np.median([x["train_s"] for x in rows])) for r, rows in runs.items()}
    stopping = args.patience < 10**6
    command = (f"python bench/negative_sampling.py --data {args.data} --rates {' '.join(map(str, args.rates))} "
               f"--rounds {args.rounds} --epochs {args.epochs} --batch-size {args.batch_size}"
               + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [2017] else "")
               + (" --importance-weights" if args.importance_weights else "")
               + (f" --patience {args.patience}" if stopping else ""))
    schedule = (f"at most {args.epochs} epoch(s), early stopping after {args.patience} epoch(s) without a better "
                "validation AUC (the best epoch's weights are scored)") if stopping else f"{args.epochs} epoch(s)"
    head = ["w", "training rows", "positive share", "epochs (best)", "steps", "test AUC", "AUC - no sampling",
            "test log loss", "calibration", "calibration without the correction", "training s (rounds)",
            "time / no sampling", "preparation s"]
    lines = [
        "# Negative downsampling: w against no downsampling",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`.",
        "",
        (f"Machine: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU, "
         f"precision {args.precision}. The machine is shared with other jobs: seconds are noisy "
         "(training: median of the rounds, every round's figure listed)."),
        "",
        (f"Data: `{args.data}_train.tsv` ({runs[base][0]['train_rows']:,} training rows without downsampling), "
         f"test split {runs[base][0]['test_rows']:,} rows; neither valid nor test is sampled. Model: embedding "
         f"16, DNN 400-400-400, Adam 1e-3, batch {args.batch_size}, {schedule}."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    seeded = len(set(args.seeds)) > 1

    def mean(rows: list[dict], key: str) -> float:
        return float(np.mean([x[key] for x in rows])) if seeded else rows[0][key]

    for rate, rows in runs.items():
        r = rows[0]
        times = " / ".join(f"{x['train_s']:.1f}" for x in rows)
        gaps = [x["auc"] - b["auc"] for x, b in zip(rows, runs[base], strict=True)]  # paired: same round, same seed
        gap = f"{np.mean(gaps):+.5f}" + (" (" + " / ".join(f"{g:+.4f}" for g in gaps) + ")" if seeded else "")
        calib = f"{mean(rows, 'calibration'):.4f}" + (
            " (" + " / ".join(f"{x['calibration']:.3f}" for x in rows) + ")" if seeded else "")
        cells = [rate, f"{r['train_rows']:,}", f"{r['train_positive_share']:.3f}",
                 " / ".join(f"{x['epochs_run']} ({x['best_epoch']})" for x in rows) if seeded
                 else f"{r['epochs_run']} ({r['best_epoch']})",
                 str(r["steps"]), f"{mean(rows, 'auc'):.5f}", gap, f"{mean(rows, 'logloss'):.5f}", calib,
                 f"{mean(rows, 'uncorrected_calibration'):.4f}", f"{med[rate]:.1f} ({times})",
                 f"{med[rate] / med[base]:.2f}", f"{np.median([x['prep_s'] for x in rows]):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if seeded:
        lines += ["", (f"Seeds {', '.join(map(str, args.seeds))} (one per round, training and sampling): AUC, log "
                       "loss and calibration are means over the rounds; the gap is paired within each round, "
                       "every round's listed. Steps are the first round's.")]
    lines += [
        "",
        ("Calibration = mean predicted probability / observed click rate on the test split (1.0 = calibrated). "
         "Training seconds are the trainer's epoch time (data loading included, evaluation and preparation "
         "excluded). Preparation (reading, fitting vocabularies, writing the arrays) is separate: with "
         "downsampling it runs deepfm's general path, not the CSV fast path, which declines "
         "`negative_sampling_rate`."),
        "",
    ]
    text = "\n".join(lines)
    if args.append and Path(args.out).is_file():
        text = Path(args.out).read_text().rstrip("\n") + "\n\n" + text.replace("# Negative", "## Negative", 1)
    Path(args.out).write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
