"""Replicated vs row-sharded embedding table on gloo ranks: samples/s, bytes sent per step, peak memory per rank.

    .venv/bin/python bench/sharding.py [--rows 200000] [--batch 4096] [--buckets 100000] [--ranks 1 2 4]

Generates Criteo-shaped data (``bench/generate.py``, seed 7) if missing, then trains one epoch of the
example's DeepFM (embedding 16, DNN 400-400-400, no dropout, fp32) for each number of ranks, replicated and
row-sharded (one process: one run), each rank wrapped by ``bench/rank.py`` for its peak RSS. The bytes are
deepfm's own count per rank (``table_sent_bytes_per_step``: the all-to-all payload to other ranks under row
sharding, the sparse-gradient all-gather when replicated) and the dense gradients' ring all-reduce,
2 (N-1)/N x the dense weights. Then, on paper, the same counts for 8-64 ranks at a larger global batch,
computed from the data's real ids (owners, unique ids per rank) rather than from a formula's guess.

All ranks share this machine's cores, so samples/s with more ranks than cores measures contention, not
scaling; bytes and memory per rank do not depend on that. Appends a dated section to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical cores"


def data_files(rows: int) -> dict[str, Path]:
    stem = HERE / ".data" / f"shard{rows // 1000}k"
    files = {k: Path(f"{stem}_{k}.tsv") for k in ("train", "valid", "test")}
    if not all(p.is_file() for p in files.values()):
        stem.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(rows), "--seed", "7",
                        "--out", f"{stem}.tsv", "--split", "--quiet"], check=True)
    return files


def write_config(out: Path, files: dict[str, Path], batch: int, buckets: int | None) -> Path:
    raw = yaml.safe_load((ROOT / "examples/criteo/config.yaml").read_text())
    raw["data"].update({k: str(v) for k, v in files.items()})
    if buckets:  # a table of a production-like size (most rows never seen here, but held in memory all the same)
        raw["fields"][1].pop("min_count", None)
        raw["fields"][1]["hash_buckets"] = buckets
    raw["data"]["cache_dir"] = str(out / "cache")
    raw["model"]["dropout"] = 0.0
    raw["train"].update({"epochs": 1, "batch_size": batch, "progress": False, "precision": "fp32",
                         "dist_timeout_s": 600})
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(out: Path, config: Path, ranks: int, sharding: str) -> dict:
    name = f"{sharding}-{ranks}"
    report = out / f"{name}.ranks"
    cmd = [str(HERE / "rank.py"), "--report", str(report), "--", "train", str(config), "--output", str(out / name),
           "--no-progress", "--set", f"train.embedding_sharding={sharding}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.run((launcher if ranks > 1 else [sys.executable]) + cmd, check=False, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    record = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
    per_rank = sorted((json.loads(p.read_text()) for p in report.glob("rank-*.json")), key=lambda r: r["rank"])
    return {"ranks": ranks, "sharding": sharding, "samples_per_s": record["samples_per_s"],
            "table_sent_kib": [round(b / 1024, 1) for b in record.get("table_sent_bytes_per_step", [0])],
            "dense_sent_kib": round(record.get("dense_allreduce_bytes_per_step", 0) / 1024, 1),
            "peak_rss_mib": [r["peak_rss_mib"] for r in per_rank],
            "valid_auc": json.loads((out / name / "metrics.json").read_text())["valid"]["auc"]}


def on_paper(config: Path, global_batch: int, rank_counts: list[int], batches: int = 4) -> list[dict]:
    """Per-rank bytes per step for N ranks, from the prepared data's ids: row exchange vs replicated gather."""

    from deepfm.config import load_config
    from deepfm.data.store import prepare
    from deepfm.model import DeepFM

    cfg = load_config(str(config))
    data = prepare(cfg, progress=False, log=lambda _m: None)
    layout, d1 = data.layout, cfg.model.embed_dim + 1
    ids = np.asarray(data.splits["train"].cat_ids) + np.asarray(layout.cat_offsets)[None, :]
    dense = sum(p.numel() * 4 for n, p in DeepFM(layout, cfg.model).named_parameters() if n != "embedding.weight")
    rows = []
    for n in rank_counts:
        per = -(-layout.num_rows // n)
        row_max, rep_max, uniq_mean = [], [], []
        for b in range(batches):
            batch = ids[b * global_batch:(b + 1) * global_batch]
            if len(batch) < global_batch:
                break
            local = [np.unique(part) for part in np.array_split(batch, n)]  # each rank's unique ids
            asked = np.zeros((n, n), dtype=np.int64)  # asked[r, o]: ids rank r fetches from owner o
            for r, u in enumerate(local):
                asked[r] = np.bincount(u // per, minlength=n)
            # rank r sends: counts, its ids to other owners, rows it serves to others, gradients back to owners
            off = asked - np.diag(np.diag(asked))
            sent = (n - 1) * 8 + off.sum(1) * 8 + off.sum(0) * d1 * 4 + off.sum(1) * d1 * 4
            row_max.append(int(sent.max()))
            longest = max(len(u) for u in local)  # replicated: each rank's padded (id, row) pairs to the others
            rep_max.append((n - 1) * (8 + longest * (8 + d1 * 4)))
            uniq_mean.append(float(np.mean([len(u) for u in local])))
        state = -(-layout.num_rows // n) * d1 * 4 * 3
        rows.append({"ranks": n, "local_batch": global_batch // n, "unique_ids_per_rank": round(np.mean(uniq_mean)),
                     "row_table_mib": round(np.mean(row_max) / 2**20, 2),
                     "replicated_table_mib": round(np.mean(rep_max) / 2**20, 2),
                     "dense_allreduce_mib": round(2 * (n - 1) / n * dense / 2**20, 2),
                     "row_state_mib_per_rank": round(state / 2**20, 1),
                     "replicated_state_mib_per_rank": round(layout.num_rows * d1 * 12 / 2**20, 1)})
    return rows


def markdown(cpu: str, args: argparse.Namespace, measured: list[dict], paper: list[dict], table_rows: int) -> str:
    hashed = f", categorical fields hashed into {args.buckets:,} rows each" if args.buckets else ""
    lines = [f"## {time.strftime('%Y-%m-%d')}: {args.rows:,} generated rows, batch {args.batch}, one epoch{hashed}",
             "", f"CPU: {cpu}. gloo over loopback; every rank on the same cores (torch threads = cores / ranks).",
             f"Embedding table {table_rows:,} rows x 17 (fp32), DNN 400-400-400.", "",
             ("| ranks | sharding | samples/s | table KiB sent / step, per rank | dense all-reduce KiB / step | "
              "peak RSS MiB, per rank | valid AUC |"),
             "|---|---|---|---|---|---|---|"]
    for m in measured:
        lines.append(f"| {m['ranks']} | {m['sharding']} | {m['samples_per_s']:,.0f} | "
                     f"{', '.join(f'{k:,.1f}' for k in m['table_sent_kib'])} | {m['dense_sent_kib']:,.1f} | "
                     f"{', '.join(f'{r:,.0f}' for r in m['peak_rss_mib'])} | {m['valid_auc']:.5f} |")
    lines += ["", (f"On paper, global batch {args.paper_batch:,} (the ids of the first batches of this data; bytes are "
                   "the same over NCCL, only the time differs): MiB each rank sends per step, the most loaded rank."),
              "", ("| ranks | local batch | unique ids / rank | row: table MiB | replicated: table MiB | "
                   "dense all-reduce MiB | table + Adam MiB / rank, row | ... replicated |"),
              "|---|---|---|---|---|---|---|---|"]
    for p in paper:
        lines.append(f"| {p['ranks']} | {p['local_batch']:,} | {p['unique_ids_per_rank']:,} | {p['row_table_mib']} | "
                     f"{p['replicated_table_mib']} | {p['dense_allreduce_mib']} | {p['row_state_mib_per_rank']:,} | "
                     f"{p['replicated_state_mib_per_rank']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--buckets", type=int, default=100_000, help="hash each categorical field into this many rows "
                    "(0: the vocabularies as the example config builds them)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--paper-ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--paper-batch", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=HERE / ".out" / "sharding")
    ap.add_argument("--results", type=Path, default=HERE / "SHARDING.md")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    config = write_config(a.out, data_files(a.rows), a.batch, a.buckets)
    paper = on_paper(config, a.paper_batch, a.paper_ranks)  # prepares the data: no run below pays for that
    for p in paper:
        print(json.dumps(p), flush=True)
    measured = []
    for n in a.ranks:
        for sharding in (["replicated"] if n == 1 else ["replicated", "row"]):
            measured.append(run(a.out, config, n, sharding))
            print(json.dumps(measured[-1]), flush=True)
    table_rows = json.loads((a.out / "replicated-1" / "layout.json").read_text())["num_rows"]
    section = markdown(cpu_name(), a, measured, paper, table_rows)
    previous = a.results.read_text() if a.results.is_file() else ""
    a.results.write_text((previous.rstrip("\n") + "\n\n" if previous else "") + section)
    print(section)


if __name__ == "__main__":
    main()
