#!/usr/bin/env python3
"""Preparation from many part files: local and in an S3 server, on 1 and N ranks (bench/INGEST.md).

Generates ``--rows`` Criteo-shaped rows (bench/generate.py) cut into ``--parts`` TSV parts, written both plain
and gzip'ed, and measures ``deepfm``'s preparation of them (data.prepare_on: every_rank, run under torchrun
with 1, 2, ... ranks, each case in fresh processes with an empty cache):

- rows/s (wall time of the slowest rank) and CPU-seconds per row (user + system, summed over ranks);
- the bytes (as stored) each rank read, against 1/N of the total;
- peak RSS per rank (includes torch's import, ~0.3-0.5 GB, measured alone as ``baseline``).

Cases: ``plain`` and ``gzip`` local parts; ``s3`` the gzip'ed parts in a SeaweedFS server on 127.0.0.1
(tests/s3server.py), whose own CPU-seconds per row are reported apart (on a real deployment the store runs
elsewhere; here it shares the CPUs with the ranks). With ``--rounds R`` the cases alternate R times. Targets (issue 22): gzip <= 1.3x the CPU of plain; s3 <= 1.2x local gzip; CPU-seconds per
row not growing with ranks.

    python bench/ingest.py --rows 10000000 --parts 64 --ranks 1 2        # the quiet-machine run (~30 min)
    python bench/ingest.py --rows 200000 --parts 8 --ranks 1 2 --rounds 1    # proves it works
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_parts(rows: int, parts: int, folder: Path) -> tuple[Path, Path]:
    """``plain/part-NNNNN.tsv`` and ``gzip/part-NNNNN.tsv.gz`` (level 6, as gzip's default) of the rows."""
    plain, gz = folder / "plain", folder / "gzip"
    if (folder / "done").is_file():
        return plain, gz
    shutil.rmtree(folder, ignore_errors=True)
    plain.mkdir(parents=True)
    gz.mkdir(parents=True)
    whole = folder / "all.tsv"
    subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(rows), "--seed", "1", "--out",
                    str(whole), "--quiet"], check=True)
    per = -(-rows // parts)
    with open(whole, "rb") as src:
        for k in range(parts):
            lines = [src.readline() for _ in range(per)]
            block = b"".join(lines)
            (plain / f"part-{k:05d}.tsv").write_bytes(block)
            (gz / f"part-{k:05d}.tsv.gz").write_bytes(gzip.compress(block, 6))
    whole.unlink()
    (folder / "done").write_text("")
    return plain, gz


def config(train: str, cache: Path) -> dict:
    raw = {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": train, "cache_dir": str(cache),
                    "prepare_on": "every_rank"},
           "fields": [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "numeric": "log_bucket",
                       "min_count": 2},
                      {"names": [f"C{i}" for i in range(1, 27)], "kind": "categorical", "min_count": 2}],
           "model": {"embed_dim": 16, "hidden_units": [64]}, "train": {"progress": False}}
    return raw


def worker() -> None:
    """Under torchrun: prepare, then write this rank's measurements to ``<out>.<rank>.json``."""
    import torch.distributed as tdist

    from deepfm.config import config_from_dict
    from deepfm.data.ranked import prepare_on_ranks
    from deepfm.train import distributed as ddp

    spec = json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tdist.init_process_group("gloo")
    before = resource.getrusage(resource.RUSAGE_SELF)
    base_rss = before.ru_maxrss
    t0 = time.perf_counter()
    data = prepare_on_ranks(config_from_dict(spec["config"]), ddp.DistContext(rank, world), progress=False,
                            log=lambda _m: None)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    mine = data.manifest["ranks"]["train_files"]
    from deepfm.data import sources

    read = sum(s.size for s in sources.resolve(mine)) if mine else 0
    Path(f"{spec['out']}.{rank}.json").write_text(json.dumps({
        "wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024, "rss_before_mb": base_rss / 1024, "bytes_read": read,
        "rows": len(data.splits["train"]), "files": len(mine)}))
    tdist.barrier()
    tdist.destroy_process_group()


def process_cpu_s(pid: int | None) -> float:
    """User + system seconds of a process (the S3 server), from /proc; 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(name: str, train: str, ranks: int, work: Path, env: dict[str, str], store_pid: int | None = None) -> dict:
    cache = work / f"cache-{name}-{ranks}"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / f"{name}-{ranks}"
    spec = {"config": config(train, cache), "out": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    store_before = process_cpu_s(store_pid)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **env, "OMP_NUM_THREADS": "1",
                                                   "PYTHONPATH": str(ROOT / "src")})
    store_cpu = process_cpu_s(store_pid) - store_before
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]
    shutil.rmtree(cache, ignore_errors=True)
    rows = sum(p["rows"] for p in per_rank)
    wall = max(p["wall_s"] for p in per_rank)
    cpu = sum(p["cpu_s"] for p in per_rank)
    total = sum(p["bytes_read"] for p in per_rank)
    return {"case": name, "ranks": ranks, "rows": rows, "rows_per_s": rows / wall, "wall_s": wall,
            "cpu_us_per_row": cpu / rows * 1e6, "store_cpu_us_per_row": store_cpu / rows * 1e6, "bytes_share": [p["bytes_read"] / total for p in per_rank],
            "peak_rss_mb": [round(p["peak_rss_mb"]) for p in per_rank],
            "rss_before_mb": [round(p["rss_before_mb"]) for p in per_rank]}


def _median_of(runs: list[dict]) -> dict:
    """The run of median rows/s, with every number that is a per-row cost replaced by its median."""
    ordered = sorted(runs, key=lambda r: r["rows_per_s"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    for key in ("rows_per_s", "wall_s", "cpu_us_per_row", "store_cpu_us_per_row"):
        mid[key] = statistics.median(r[key] for r in runs)
    return mid


def report(results: list[dict], args) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    lines = ["# Preparation from part files (bench/ingest.py)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} CPUs; "
             f"{args.rows:,} generated Criteo-shaped rows in {args.parts} parts; "
             f"`python bench/ingest.py --rows {args.rows} --parts {args.parts} --ranks {' '.join(map(str, args.ranks))} "
             f"--cases {' '.join(args.cases)} --rounds {args.rounds}`",
             f"{args.rounds} round(s), the cases alternating within each; figures are medians over the rounds",
             "", "| case | ranks | rows/s | rows/s of each round | CPU us/row (ranks) | store CPU us/row | bytes read "
             "per rank (share) | peak RSS per rank MB (before preparing) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rounds: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        rounds.setdefault((r["case"], r["ranks"]), []).append(r)
    by = {key: _median_of(runs) for key, runs in rounds.items()}
    for (case, n), r in by.items():
        shares = ", ".join(f"{s:.3f}" for s in r["bytes_share"])
        rss = ", ".join(f"{a} ({b})" for a, b in zip(r["peak_rss_mb"], r["rss_before_mb"], strict=True))
        each = ", ".join(f"{x['rows_per_s']:,.0f}" for x in rounds[case, n])
        store = f"{r['store_cpu_us_per_row']:.2f}" if case == "s3" else "-"
        lines.append(f"| {case} | {n} | {r['rows_per_s']:,.0f} | {each} | {r['cpu_us_per_row']:.2f} | {store} | "
                     f"{shares} | {rss} |")
    lines.append("")
    for n in args.ranks:
        if ("gzip", n) in by and ("plain", n) in by:
            lines.append(f"- {n} rank(s): gzip / plain CPU per row = "
                         f"{by['gzip', n]['cpu_us_per_row'] / by['plain', n]['cpu_us_per_row']:.2f} (target <= 1.3)")
        if ("s3", n) in by and ("gzip", n) in by:
            lines.append(f"- {n} rank(s): s3 / local gzip wall time = "
                         f"{by['gzip', n]['rows_per_s'] / by['s3', n]['rows_per_s']:.2f} (target <= 1.2)")
    one = min(args.ranks)
    for n in args.ranks:
        if n != one and ("gzip", n) in by:
            lines.append(f"- gzip CPU per row, {n} ranks / {one}: "
                         f"{by['gzip', n]['cpu_us_per_row'] / by['gzip', one]['cpu_us_per_row']:.2f} (target: not above 1)"
                         f"; preparation time {by['gzip', n]['wall_s'] / by['gzip', one]['wall_s']:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=64)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-s3", action="store_true", help="leave out the S3 server case")
    ap.add_argument("--cases", nargs="+", default=["plain", "gzip", "s3"], choices=["plain", "gzip", "s3"])
    ap.add_argument("--rounds", type=int, default=1, help="repeat every case; the report gives medians")
    ap.add_argument("--out", default=str(HERE / ".out" / "ingest.md"),
                    help="where the report goes (bench/INGEST.md keeps the runs worth quoting, by hand)")
    args = ap.parse_args()
    work = HERE / ".out" / "ingest"
    work.mkdir(parents=True, exist_ok=True)
    plain, gz = make_parts(args.rows, args.parts, HERE / ".data" / f"ingest-{args.rows}-{args.parts}")
    results: list[dict] = []
    cases = [c for c in args.cases if not (c == "s3" and args.no_s3)]
    with contextlib.ExitStack() as stack:
        env, pid = {}, None
        if "s3" in cases:
            sys.path.insert(0, str(ROOT / "tests"))
            from s3server import S3Server

            shutil.rmtree(work / "s3", ignore_errors=True)
            server = stack.enter_context(S3Server(work / "s3"))
            server.upload(gz, "bench", "criteo")
            env, pid = server.env(), server.proc.pid
        for _ in range(args.rounds):
            for n in args.ranks:
                for case in cases:
                    train = {"plain": str(plain), "gzip": str(gz), "s3": "s3://bench/criteo/"}[case]
                    results.append(run_case(case, train, n, work, env if case == "s3" else {},
                                            pid if case == "s3" else None))
    text = report(results, args)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
