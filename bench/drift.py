"""A drifting click stream: is training further each day (``--init-from``) as good as retraining on everything?

    .venv/bin/python bench/drift.py [--days 8] [--rows 100000] [--new-share 0.15] [--out bench/DRIFT.md]

A generator writes ``--days`` daily CSV files (bench/.data/drift/) from a teacher that drifts slowly: an FM over
six categorical fields whose per-id weights are hashed from (seed, field, id) and walk a little every day. Ads,
users, sites and apps are born every day, so that about ``--new-share`` of each day's impressions carry an id
the day before never showed (ads churn fastest), and older ids fade out. Three policies are scored on each next
day d (trained on days before d, evaluated on day d):

- frozen: the day-1 model, never updated;
- daily update: yesterday's model trained further on day d-1 only (``deepfm train --init-from``);
- full retrain: a new model trained from scratch on days 1..d-1.

Every model trains one epoch with the same settings. Prints and writes AUC per day, seconds per update and the
means, and draws AUC per day to ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIELDS = {  # name: (ids alive at once, ids born per day, Zipf exponent of popularity)
    "user": (40_000, 2_000, 1.1),
    "ad": (3_000, 150, 1.1),
    "site": (2_000, 40, 1.2),
    "app": (1_500, 30, 1.2),
    "device": (50, 0, 1.3),
    "hour": (24, 0, 0.3),
}
K = 4  # teacher latent dimension


def _hash_normal(seed: int, field: int, ids: np.ndarray, salt: int, width: int = 1) -> np.ndarray:
    """Deterministic N(0, 1) draws per (seed, field, id, salt): the teacher's weights without storing them."""
    out = np.empty((len(ids), width))
    for j in range(width):
        with np.errstate(over="ignore"):
            z = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(
                (seed * 1_000_003 + field * 7919 + salt * 104_729 + j * 15_485_863) & 0xFFFFFFFFFFFF)
            z = (z ^ (z >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
            z = z ^ (z >> np.uint64(29))
        u1 = ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
        u2 = (((z * np.uint64(0x94D049BB133111EB)) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
        out[:, j] = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    return out


def generate(folder: Path, days: int, rows: int, seed: int) -> dict:
    """Write day1.csv .. dayN.csv; return each day's share of impressions carrying an id no earlier day showed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    new_share = {}
    seen: dict[str, np.ndarray] = {name: np.zeros(0, np.int64) for name in FIELDS}
    for day in range(1, days + 1):
        cols, logit = {}, np.zeros(rows)
        vecs = []
        for f, (name, (alive, born, zipf)) in enumerate(FIELDS.items()):
            newest = alive + born * (day - 1)  # ids 0..newest-1 exist; the alive window slides
            window = np.arange(max(0, newest - alive), newest, dtype=np.int64)
            # each id's popularity is fixed (a hashed rank), whatever its age
            rank = np.argsort(np.argsort(_hash_normal(seed, f, window, salt=4)[:, 0]))
            p = (1.0 + rank) ** -zipf
            ids = rng.choice(window, size=rows, p=p / p.sum())
            cols[name] = ids
            drift = 0.05 * day * _hash_normal(seed, f, ids, salt=2)[:, 0]  # each id's weight walks slowly
            logit += 0.6 * _hash_normal(seed, f, ids, salt=1)[:, 0] + drift
            vecs.append(0.5 * _hash_normal(seed, f, ids, salt=3, width=K))
        v = np.stack(vecs, axis=1)  # [rows, F, K]
        logit += 0.5 * ((v.sum(1) ** 2).sum(-1) - (v ** 2).sum((1, 2)))
        logit += -2.0 - np.median(logit)
        label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        if day > 1:
            fresh = np.zeros(rows, dtype=bool)
            for name, ids in cols.items():
                fresh |= ~np.isin(ids, seen[name])
            new_share[day] = float(fresh.mean())
        seen = {name: np.union1d(seen[name], ids) for name, ids in cols.items()}
        with open(folder / f"day{day}.csv", "w") as fh:
            fh.write("label," + ",".join(FIELDS) + "\n")
            np.savetxt(fh, np.column_stack([label] + [cols[n] for n in FIELDS]), fmt="%d", delimiter=",")
    return new_share


def plot_lines(series: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set(title=title, xlabel="day scored", ylabel="AUC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _config(train: str | list[str], cache: Path, seed: int) -> dict:
    return {"data": {"format": "csv", "train": train, "cache_dir": str(cache)},
            "fields": [{"names": list(FIELDS)}],
            "model": {"embed_dim": 16, "hidden_units": [200, 200]},
            "train": {"epochs": 1, "batch_size": 1024, "lr": 1e-3, "seed": seed, "progress": False,
                      "checkpoint_every_steps": 10_000_000}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=8)
    ap.add_argument("--rows", type=int, default=100_000, help="impressions per day")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "DRIFT.md"))
    ap.add_argument("--plot", default=str(HERE / "drift.png"))
    args = ap.parse_args()

    from deepfm.config import config_from_dict
    from deepfm.pipeline import train
    from deepfm.predict import Predictor

    work = HERE / ".out" / "drift"
    shutil.rmtree(work, ignore_errors=True)
    data = HERE / ".data" / f"drift-{args.seed}-{args.rows}"
    new_share = generate(data, args.days, args.rows, args.seed)
    day = {d: str(data / f"day{d}.csv") for d in range(1, args.days + 1)}
    quiet = lambda _m: None  # noqa: E731

    def fit(name: str, files: list[str], init_from: Path | None = None) -> tuple[Path, float]:
        # the full retrain's history is the list of day files itself: read in order, as one file would be
        out = work / name
        t0 = time.perf_counter()
        spec: str | list[str] = files[0] if len(files) == 1 else files
        train(config_from_dict(_config(spec, work / "cache", args.seed)), out, log=quiet, init_from=init_from)
        return out, time.perf_counter() - t0

    def auc(model: Path, d: int) -> float:
        return float(Predictor(model).evaluate_file(day[d], progress=False)["auc"])

    results: dict[str, dict[int, float]] = {"frozen": {}, "daily update": {}, "full retrain": {}}
    seconds: dict[str, list[float]] = {"daily update": [], "full retrain": []}
    first, _ = fit("day1", [day[1]])
    current = first
    for d in range(2, args.days + 1):
        results["frozen"][d] = auc(first, d)
        if d > 2:
            current, s = fit(f"update{d - 1}", [day[d - 1]], init_from=current)
            seconds["daily update"].append(s)
        results["daily update"][d] = auc(current, d)
        full, s = fit(f"full{d - 1}", [day[k] for k in range(1, d)])
        seconds["full retrain"].append(s)
        results["full retrain"][d] = auc(full, d)
        print(f"day {d}: " + "  ".join(f"{k} {v[d]:.4f}" for k, v in results.items()), flush=True)

    days = list(range(2, args.days + 1))
    plot_lines({k: (days, [v[d] for d in days]) for k, v in results.items()}, Path(args.plot),
               title="AUC on the next day")
    mean = {k: float(np.mean([v[d] for d in days])) for k, v in results.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [f"# Drifting stream ({time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores)", "",
             f"`python bench/drift.py --days {args.days} --rows {args.rows} --seed {args.seed}`: {args.rows:,} "
             "impressions a day; share of a day's impressions carrying an id no earlier day showed: "
             + ", ".join(f"day {d} {s:.0%}" for d, s in new_share.items()) + ". One epoch per model. "
             f"Plot: `{Path(args.plot).name}`.", "",
             "| day scored | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for d in days:
        lines.append(f"| {d} | " + " | ".join(f"{v[d]:.4f}" for v in results.values()) + " |")
    lines.append("| mean | " + " | ".join(f"{mean[k]:.4f}" for k in results) + " |")
    lines += ["", "| policy | seconds per update (median) | trained rows per update |", "|---|---|---|",
              f"| daily update | {np.median(seconds['daily update']):.1f} | {args.rows:,} (one day) |",
              f"| full retrain | {np.median(seconds['full retrain']):.1f} | {args.rows:,} x days so far |", "",
              f"Daily update minus full retrain, mean AUC: {mean['daily update'] - mean['full retrain']:+.4f}; "
              f"daily update minus frozen: {mean['daily update'] - mean['frozen']:+.4f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
