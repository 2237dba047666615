#!/usr/bin/env python3
"""Memory of preparation against rows at fixed distinct values (issue 22: "memory flat in the data size").

One block of ``--block-rows`` generated Criteo-shaped rows (bench/generate.py, seed 1) is hard-linked ``r`` times
as the parts ``part-00000.tsv`` ... of a dataset, for each ``r`` of ``--repeats``: every dataset holds exactly
the same distinct values, only the row count grows. Each case prepares one dataset in a fresh process with an
empty cache, through the path ``deepfm train`` takes:

- ``fast``: ``data.prepare_on: rank0`` in one process (``store.prepare``), where the CSV/TSV fast path applies;
- ``general``: the same with ``data.skip_bad_rows: true``, which turns the fast path off (same prepared bytes);
- ``ranks``: ``data.prepare_on: every_rank`` under ``torchrun`` with ``--ranks`` ranks (``ranked.prepare_on_ranks``,
  the general readers on each rank's share of the parts).

The parent samples each preparing process's ``/proc/<pid>/status`` every ~10 ms: peak ``RssAnon`` (heap: what
grows when state is kept per row) and peak ``RssFile`` (file-backed pages, e.g. touched memory maps: page cache
the kernel can reclaim), and the child reports ``ru_maxrss`` (peak of RssAnon + RssFile + RssShmem, what
bench/ingest.py shows). ``import`` is a process that only imports deepfm and torch (the floor).

    python bench/prep_memory.py --block-rows 500000 --repeats 1 4 16 --cases fast general ranks   # quiet machine
    python bench/prep_memory.py --block-rows 50000 --repeats 1 4 --cases fast general --out /tmp/m.md  # proves it
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def config(train: str, cache: str, case: str) -> dict:
    return {"data": {"format": "tsv", "header": False, "preset": "criteo", "train": train, "cache_dir": cache,
                     "prepare_on": "every_rank" if case == "ranks" else "rank0",
                     "skip_bad_rows": case == "general"},
            "fields": [{"names": [f"I{i}" for i in range(1, 14)], "kind": "numeric", "numeric": "log_bucket",
                        "min_count": 2},
                       {"names": [f"C{i}" for i in range(1, 27)], "kind": "categorical", "min_count": 2}],
            "model": {"embed_dim": 16, "hidden_units": [64]}, "train": {"progress": False}}


def status_kb(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of a process, in kB (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "RssShmem")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def child_pids(pid: int) -> list[int]:
    """Every descendant of ``pid`` (torchrun's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except FileNotFoundError:
            kids = []
        out += kids
        todo += kids
    return out


def worker(spec: dict) -> None:
    """Prepare (or only import, for the floor) and write this process's ru_maxrss to ``<out>.<rank>.json``."""
    import torch  # noqa: F401 (the floor includes torch, as ``deepfm train`` does)

    from deepfm.config import config_from_dict

    rank = int(os.environ.get("RANK", "0"))
    t0 = time.perf_counter()
    rows = 0
    if spec["case"] != "import":
        cfg = config_from_dict(spec["config"])
        if spec["case"] == "ranks":
            import torch.distributed as tdist

            from deepfm.data.ranked import prepare_on_ranks
            from deepfm.train import distributed as ddp

            tdist.init_process_group("gloo")
            data = prepare_on_ranks(cfg, ddp.DistContext(rank, int(os.environ["WORLD_SIZE"])), progress=False,
                                    log=lambda _m: None)
        else:
            from deepfm.data.store import prepare

            data = prepare(cfg, progress=False, log=lambda _m: None)
        rows = len(data.splits["train"])
        fast = data.manifest.get("fast_path", False)
        data.close()
    else:
        fast = False
    Path(f"{spec['out']}.{rank}.json").write_text(json.dumps({
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows,
        "wall_s": time.perf_counter() - t0, "fast_path": fast}))
    if spec["case"] == "ranks":
        tdist.barrier()
        tdist.destroy_process_group()


def run_case(case: str, train: str, ranks: int, work: Path) -> dict:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / "result"
    for old in work.glob("result.*.json"):
        old.unlink()
    spec = {"case": case, "config": config(train, str(cache), case), "out": str(out)}
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *me] \
        if case == "ranks" else [sys.executable, *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    peak: dict[int, dict[str, int]] = {}
    while proc.poll() is None:
        for pid in [proc.pid] if case != "ranks" else child_pids(proc.pid):
            for key, kb in status_kb(pid).items():
                mine = peak.setdefault(pid, {})
                mine[key] = max(mine.get(key, 0), kb)
        time.sleep(0.01)
    if proc.returncode:
        raise SystemExit(f"{case} failed with exit status {proc.returncode}")
    shutil.rmtree(cache, ignore_errors=True)
    n = ranks if case == "ranks" else 1
    results = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(n)]
    # torchrun's own process is not a rank: keep the n busiest (by peak anonymous memory) descendants
    sampled = sorted(peak.values(), key=lambda p: -p.get("RssAnon", 0))[:n]
    return {"case": case, "ranks": n, "rows": sum(r["rows"] for r in results),
            "wall_s": max(r["wall_s"] for r in results), "fast_path": results[0]["fast_path"],
            "maxrss_mb": [round(r["maxrss_mb"]) for r in results],
            "anon_mb": [round(p.get("RssAnon", 0) / 1024) for p in sampled],
            "file_mb": [round(p.get("RssFile", 0) / 1024) for p in sampled]}


def make_datasets(block_rows: int, repeats: list[int], folder: Path) -> dict[int, Path]:
    """``folder/b<block rows>-x<r>/part-NNNNN.tsv``: ``r`` hard links of one generated block (same distinct
    values)."""
    block = folder / f"block-{block_rows}.tsv"
    if not block.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(block_rows), "--seed", "1",
                        "--out", str(block), "--quiet"], check=True)
    out = {}
    for r in repeats:
        d = folder / f"b{block_rows}-x{r}"
        if not d.is_dir() or len(list(d.iterdir())) != r:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            for k in range(r):
                os.link(block, d / f"part-{k:05d}.tsv")
        out[r] = d
    return out


def report(results: list[dict], args) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} CPUs; one block of "
             f"{args.block_rows:,} generated rows repeated as parts; "
             f"`python bench/prep_memory.py --block-rows {args.block_rows} --repeats {' '.join(map(str, args.repeats))}"
             f" --cases {' '.join(args.cases)}`", "",
             "| case | ranks | rows | fast path | wall s | peak RssAnon MB | peak RssFile MB | ru_maxrss MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['case']} | {r['ranks']} | {r['rows']:,} | {'yes' if r['fast_path'] else 'no'} | "
                     f"{r['wall_s']:.1f} | {', '.join(map(str, r['anon_mb']))} | {', '.join(map(str, r['file_mb']))} "
                     f"| {', '.join(map(str, r['maxrss_mb']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-rows", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cases", nargs="+", default=["fast", "general", "ranks"],
                    choices=["fast", "general", "ranks"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the table here (default: print only)")
    args = ap.parse_args()
    work = HERE / ".out" / "prep_memory"
    work.mkdir(parents=True, exist_ok=True)
    sets = make_datasets(args.block_rows, args.repeats, HERE / ".data" / "prep_memory")
    results = [run_case("import", "", 1, work)]
    for case in args.cases:
        for r in args.repeats:
            results.append(run_case(case, str(sets[r]), args.ranks, work))
            print(json.dumps(results[-1]), flush=True)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
