"""Preparation speed: this tree against a baseline commit, measured in one run (medians of interleaved rounds).

    .venv/bin/python bench/prep.py [--baseline 84b3b1a] [--criteo-rows 1000000] [--taobao-rows 1000000]
                                   [--rounds 3] [--scale-rows 0] [--out bench/PREP.md]

Data (generated once into bench/.data/):
- ``criteo``: Criteo-shaped TSV from bench/generate.py (13 numeric log-bucketed + 26 categorical fields);
- ``taobao``: a Taobao-like CSV (user, item, category, brand, price, and ``hist``: the user's ``^``-separated
  click history of 0-50 Zipf-distributed item ids, a third of them weighted as ``item:w``, shared by the user's
  impressions), generated here.
- ``--scale-rows N`` adds bench/scale.py's Criteo-shaped file of N rows (45M: ~11 GB; one round each).

Each measurement is one fresh process that prepares the file into an empty cache with ``deepfm.data.store.prepare``
(engine ``fast``: the default, or ``general``: the fast engine switched off) and reports wall seconds and its peak
resident memory. The baseline runs the same in a git worktree of ``--baseline`` (bench/.envs/prep-baseline), so
both codes see the same machine state; rounds interleave the contenders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"

MEASURE = r"""
import json, shutil, sys, time
from deepfm.config import config_from_dict
from deepfm.data import fastpath
from deepfm.data.store import prepare
raw, engine = json.loads(sys.argv[1]), sys.argv[2]
if engine == "general":
    fastpath.why_not = lambda cfg: "off"
shutil.rmtree(raw["data"]["cache_dir"], ignore_errors=True)
cfg = config_from_dict(raw)
t0, c0 = time.perf_counter(), time.process_time()
data = prepare(cfg, progress=False, log=lambda m: None)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rows = sum(len(s) for s in data.splits.values())
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rows": rows, "fast_path": bool(data.manifest.get("fast_path")),
                  "peak_rss_mb": int(hwm) / 1024}))
shutil.rmtree(raw["data"]["cache_dir"], ignore_errors=True)
"""


def taobao_like(path: Path, rows: int, seed: int = 3) -> None:
    """A Taobao-like click log with a multi-valued click history column (see the module docstring). A user's
    history is one cell shared by all of that user's impressions, as in the Taobao sample of shared/data
    (100 rows: 8 distinct non-empty histories in 25 non-empty cells)."""
    rng = np.random.default_rng(seed)
    n_users = 200_000
    lengths = rng.integers(0, 51, n_users)
    tags = rng.zipf(1.25, int(lengths.sum())) % 300_000
    weighted = rng.random(len(tags)) < 1 / 3
    weights = np.round(rng.random(len(tags)) * 3, 2)
    text = np.where(weighted, np.char.add(np.char.add(tags.astype(str), ":"), weights.astype(str)), tags.astype(str))
    ends = np.cumsum(lengths)
    history = ["^".join(text[e - k:e]) for e, k in zip(ends.tolist(), lengths.tolist())]
    block = 200_000
    with open(path, "w") as fh:
        fh.write("label,user,item,cate,brand,price,hist\n")
        for lo in range(0, rows, block):
            n = min(block, rows - lo)
            user = rng.zipf(1.2, n) % n_users
            item = rng.zipf(1.3, n) % 300_000
            cate = item % 5_000
            brand = (item * 7) % 80_000
            price = np.round(rng.lognormal(3, 1.5, n), 2)
            label = (rng.random(n) < 0.05).astype(int)
            for r in range(n):
                fh.write(f"{label[r]},{user[r]},{item[r]},{cate[r]},{brand[r]},{price[r]},{history[user[r]]}\n")


def configs(args: argparse.Namespace) -> dict[str, dict]:
    DATA.mkdir(parents=True, exist_ok=True)
    sets: dict[str, dict] = {}
    criteo = DATA / f"prep_criteo{args.criteo_rows}.tsv"
    if not criteo.is_file():
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(args.criteo_rows), "--seed", "5",
                        "--out", str(criteo), "--quiet"], check=True)
    criteo_fields = [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "numeric": "log_bucket"},
                     {"names": [f"C{i}" for i in range(1, 27)], "min_count": 2}]
    sets["criteo"] = {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": str(criteo)},
                      "fields": criteo_fields}
    taobao = DATA / f"prep_taobao_users{args.taobao_rows}.csv"
    if not taobao.is_file():
        taobao_like(taobao, args.taobao_rows)
    sets["taobao"] = {"data": {"format": "csv", "train": str(taobao)},
                      "fields": [{"names": ["user", "cate", "brand"]}, {"name": "item", "vocab": "item"},
                                 {"name": "price", "kind": "numeric", "numeric": "log_bucket"},
                                 {"name": "hist", "kind": "multi", "vocab": "item", "combiner": "mean",
                                  "max_len": 50}]}
    if args.scale_rows:
        scale = DATA / f"scale{args.scale_rows}.tsv"  # bench/scale.py's file
        if not scale.is_file():
            subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(args.scale_rows), "--seed",
                            "11", "--out", str(scale), "--quiet"], check=True)
        sets["scale"] = {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": str(scale)},
                         "fields": criteo_fields}
    return sets


def baseline_src(rev: str) -> Path:
    tree = HERE / ".envs" / "prep-baseline"
    if tree.exists():
        subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", rev], check=True)
    else:
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True)
    return tree / "src"


def measure(src: Path, raw: dict, engine: str, cache: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["data"]["cache_dir"] = str(cache)
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(raw), engine], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="84b3b1a", help="commit to compare against (default: before the codecs)")
    ap.add_argument("--criteo-rows", type=int, default=1_000_000)
    ap.add_argument("--taobao-rows", type=int, default=1_000_000)
    ap.add_argument("--scale-rows", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "PREP.md"))
    args = ap.parse_args()
    sets = configs(args)
    contenders = {"this tree": ROOT / "src", f"baseline {args.baseline}": baseline_src(args.baseline)}
    runs: dict[tuple[str, str, str], list[dict]] = {}
    plan = [(s, name, engine) for s in sets for name in contenders for engine in ("fast", "general")
            if not (s == "scale" and engine == "general")]
    for r in range(args.rounds):
        for s, name, engine in plan:
            if s == "scale" and r > 0:
                continue
            res = measure(contenders[name], sets[s], engine, DATA / "prep_cache")
            runs.setdefault((s, name, engine), []).append(res)
            print(f"round {r + 1} {s:7s} {name:18s} {engine:8s} {res['rows'] / res['seconds']:>12,.0f} rows/s "
                  f"peak RSS {res['peak_rss_mb']:,.0f} MB  fast_path={res['fast_path']}", flush=True)
    lines = [f"# Preparation speed ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores)", "",
             f"`python bench/prep.py --rounds {args.rounds} --criteo-rows {args.criteo_rows} "
             f"--taobao-rows {args.taobao_rows}" + (f" --scale-rows {args.scale_rows}" if args.scale_rows else "")
             + f"`: raw file -> prepared arrays, medians of {args.rounds} interleaved rounds (one round for "
             "`scale`), each in a fresh process; `engine` is what was asked for, `ran` what ran (a fast engine "
             "that hands over runs the general one). CPU seconds (all threads of the process) are steadier than "
             "wall seconds on a shared machine.", "",
             "| data | code | engine | ran | rows | rows/s (median) | seconds | CPU seconds | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (s, name, engine), res in runs.items():
        secs = statistics.median(x["seconds"] for x in res)
        rows = res[0]["rows"]
        ran = "fast" if res[0]["fast_path"] else "general"
        cpu = statistics.median(x["cpu_seconds"] for x in res)
        lines.append(f"| {s} | {name} | {engine} | {ran} | {rows:,} | {rows / secs:,.0f} | {secs:.1f} | {cpu:.1f} | "
                     f"{max(x['peak_rss_mb'] for x in res):,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
