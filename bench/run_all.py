"""One command for the whole speed benchmark: peers set up, data generated, every contender run one after
another in one run (so the ratios hold on a noisy machine), and bench/RESULTS.md written.

    make bench                     # = .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --rows 250000 [--skip-setup] [--contenders deepfm-bf16,deepctr,...]
                                       [--rounds 3 (default)] [--max-steps N] [--device cuda]

Contenders: deepfm (its default precision: bf16 autocast where the CPU or GPU supports bf16, else fp32; the
result line says which), deepfm-fp32, deepctr (DeepCTR-Torch 0.3.0), fuxictr (FuxiCTR 2.3.x), torchrec (torchrec 1.8.0).
Same configuration for all: embedding 16, DNN 400-400-400, batch 4096, Adam 1e-3, one epoch.
Before each contender the script waits (up to --quiet-wait s) for the 1-minute load average to drop
below --quiet-load, and records the load in the JSON line. ``--busy N`` instead shares the machine on purpose:
N busy-looping processes run beside every contender (the machine's bound is measured before they start).

Every contender's figures are also given as a fraction of the machine's FLOP bound: the DNN's GEMM FLOPs per
sample (3.42 MFLOP training, 1.14 inference for deepfm) at the machine's square-GEMM rate in the contender's
precision, measured just before and after each contender (bench/machine.py --square-only; with --busy,
bench/machine.py before the busy processes start), so the figures carry across machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from machine import mlp_flops  # bench/machine.py, beside this script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = {"deepctr": "run_deepctr.py", "fuxictr": "run_fuxictr.py", "torchrec": "run_torchrec.py"}
ALL = ["deepfm", "deepfm-fp32", "deepctr", "fuxictr", "torchrec"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_quiet(load: float, max_wait: float) -> None:
    t0 = time.time()
    while os.getloadavg()[0] >= load and time.time() - t0 < max_wait:
        time.sleep(5)


def run_json(cmd: list[str], err_path: Path, timeout: float) -> dict | None:
    log("$ " + " ".join(cmd))
    with open(err_path, "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            log(f"  timed out after {timeout:.0f} s (see {err_path})")
            return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log(f"  failed with exit code {proc.returncode} (see {err_path})")
        return None
    return json.loads(lines[-1])


def ensure_data(rows: int, seed: int) -> Path:
    stem = HERE / ".data" / f"g{rows}s{seed}"
    if not Path(f"{stem}_test.tsv").is_file():
        (HERE / ".data").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--rows", str(rows), "--seed", str(seed),
                        "--out", f"{stem}.tsv", "--split"], check=True, cwd=ROOT)
    return stem


def warm_page_cache(paths: list[str]) -> None:
    """Read the data files once, so that no contender's preparation pays for cold disk reads (the first one
    would otherwise: measured 250k rows/s cold vs 440k warm for the same code)."""
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _median(values: list):
    values = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _per_round(r: dict) -> str:
    return " (" + " / ".join(fmt(v) for v in r["rounds"]) + ")"


def aggregate(results: list[dict]) -> list[dict]:
    """Runs of the same contender (one per round) -> one row each: the median of every figure across rounds,
    and ``rounds``: its training samples/s in each round."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for name, runs in by_name.items():
        row: dict = {"name": name, "rounds": [r.get("train_samples_per_s_median") for r in runs]}
        for key in runs[0]:
            if key in ("name", "round"):
                continue
            if key == "latency_ms":
                row[key] = {b: {q: _median([r.get(key, {}).get(b, {}).get(q) for r in runs])
                                for q in runs[0][key][b]} for b in runs[0][key]}
            elif isinstance(runs[0][key], (int, float)) and not isinstance(runs[0][key], bool):
                row[key] = _median([r.get(key) for r in runs])
            else:
                row[key] = runs[0][key]
        rows.append(row)
    return rows


# Forward GEMM FLOPs per sample of each contender's model at the benchmark's configuration (embedding 16, DNN
# 400-400-400): deepfm and FuxiCTR embed all 39 fields (the 13 integers bucketed), so their DNN reads 39 x 16 =
# 624 inputs; DeepCTR-Torch feeds the 13 integers raw (26 x 16 + 13 = 429); torchrec projects them through its
# dense arch 13 -> 400 -> 16 into one more field (27 x 16 = 432) and ends in Linear(417 -> 1).
FWD_FLOPS = {"deepfm": mlp_flops(624), "fuxictr": mlp_flops(624), "deepctr-torch": mlp_flops(429),
             "torchrec": mlp_flops(432, extra_macs=13 * 400 + 400 * 16 + 17)}


def square_rates(machine: dict | None) -> dict[str, float]:
    """The machine's square-GEMM rate (GFLOP/s) per precision from a bench/machine.py result."""
    return {p: g["matmul_4096_gflops"] for p, g in (machine or {}).get("gemm", {}).items()
            if g.get("matmul_4096_gflops")}


def bound_fractions(r: dict, rates: dict[str, float]) -> tuple[float, float, float] | None:
    """(forward MFLOP per sample, training, inference samples/s of ``r`` as fractions of what the square-GEMM
    rate ``rates`` in its precision allows for that model's GEMMs: 3x forward FLOPs a training sample)."""
    rate = rates.get("bf16" if r["name"].endswith("bf16") else "fp32")
    flops = FWD_FLOPS.get(r["name"].split("-bf16")[0].split("-fp32")[0])
    if not rate or flops is None:
        return None
    rate *= 1e9
    return (flops / 1e6, r["train_samples_per_s_median"] * 3 * flops / rate, r["infer_samples_per_s"] * flops / rate)


def square_rate(precision: str, device: str, threads: list[str], out: Path) -> float | None:
    """The machine's square-GEMM rate (GFLOP/s) in ``precision`` now (bench/machine.py --square-only)."""
    got = run_json([sys.executable, str(HERE / "machine.py"), "--square-only", precision, "--device", device,
                    *threads], out / "machine-square.err", 300)
    return got and got.get("square_gflops")


@functools.lru_cache(maxsize=None)
def bf16_default(device: str) -> bool:
    """Whether deepfm's default precision on ``device`` is bf16 (deepfm.runtime decides it in the contender)."""
    got = subprocess.run([sys.executable, "-c", "import torch; from deepfm.runtime import resolve_precision as r; "
                          f"print(r('auto', torch.device('{device}')))"], capture_output=True, text=True, cwd=ROOT)
    return got.stdout.strip() == "bf16"


def note_fractions(r: dict, rates: dict[str, float]) -> None:
    """Add to a run's result its fractions of the bound at ``rates`` (measured around it); ``aggregate`` then
    takes their median over the rounds like any other figure."""
    f = bound_fractions(r, rates)
    if f is not None:
        r["bound_gflops"] = rates["bf16" if r["name"].endswith("bf16") else "fp32"]
        r["train_bound_fraction"], r["infer_bound_fraction"] = f[1], f[2]


def write_results(path: Path, results: list[dict], machine: dict | None, teacher: dict, command: str,
                  busy: int = 0) -> None:
    runs = results
    results = aggregate(results)
    n_rounds = max((len(r["rounds"]) for r in results), default=1)
    peers = [r for r in results if not r["name"].startswith("deepfm")]
    best = {k: max((r.get(k) or 0) for r in peers) if peers else None
            for k in ("train_samples_per_s_median", "infer_samples_per_s", "prep_rows_per_s")}
    lines = ["# Benchmark results", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`.", ""]
    if machine:
        flags = ", ".join(k for k, v in (machine.get("flags") or {}).items() if v) or "?"
        lines += [f"Machine: {machine.get('cpu_model', platform.processor())}, "
                  f"{machine.get('logical_cpus', os.cpu_count())} logical CPUs, torch {machine.get('torch', '?')}, "
                  f"device {machine.get('device', 'cpu')}. CPU flags: {flags}.", ""]
    if busy:
        lines += [f"**Shared machine**: {busy} busy-looping process(es) ran beside every contender (started after "
                  "the machine's bound was measured).", ""]
    if n_rounds > 1:
        lines += [(f"Every contender ran {n_rounds} times, in {n_rounds} rounds of the whole list; each figure is the "
                   "median over the rounds (the train column lists each round's figure too)."), ""]
    lines += ["| contender | prep rows/s | train samples/s (median) | epoch s | infer samples/s | "
              "latency b1 ms (p50/p99) | latency b100 ms (p50/p99) | peak RSS MB | test AUC | test logloss | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lat = r.get("latency_ms", {})
        b1, b100 = lat.get("b1", {}), lat.get("b100", {})
        lines.append(
            f"| {r['name']} | {fmt(r.get('prep_rows_per_s'))} | {fmt(r.get('train_samples_per_s_median'))}"
            f"{_per_round(r) if n_rounds > 1 else ''} | "
            f"{fmt(r.get('epoch_wall_s'), '.2f')} | {fmt(r.get('infer_samples_per_s'))} | "
            f"{fmt(b1.get('median'), '.3f')} / {fmt(b1.get('p99'), '.3f')} | "
            f"{fmt(b100.get('median'), '.3f')} / {fmt(b100.get('p99'), '.3f')} | {fmt(r.get('peak_rss_mb'))} | "
            f"{fmt(r.get('test_auc'), '.4f')} | {fmt(r.get('test_logloss'), '.4f')} | "
            f"{fmt((r.get('loadavg_1m_5m') or [None])[0], '.2f')} |")
    if teacher:
        lines += ["", f"Teacher (the hidden model that drew the labels) test AUC: {teacher.get('teacher_auc', '?')}: "
                      "the ceiling any model can reach on this data."]
    if best["train_samples_per_s_median"]:
        lines += ["", "## Ratios against the fastest peer of the same run", "",
                  "| contender | train | inference | preparation | AUC - best peer AUC |", "|---|---|---|---|---|"]
        best_auc = max(r.get("test_auc") or 0 for r in peers)
        for r in results:
            if r["name"].startswith("deepfm"):
                lines.append(
                    f"| {r['name']} | {r['train_samples_per_s_median'] / best['train_samples_per_s_median']:.2f}x | "
                    f"{r['infer_samples_per_s'] / best['infer_samples_per_s']:.2f}x | "
                    f"{r['prep_rows_per_s'] / best['prep_rows_per_s']:.2f}x | {r['test_auc'] - best_auc:+.4f} |")
    fractions = []
    for r in results:
        if "train_bound_fraction" in r:  # per round: at the rate measured at its start
            rates = {"bf16" if r["name"].endswith("bf16") else "fp32": r["bound_gflops"]}
            f = bound_fractions(r, rates)
            f = f and (f[0], r["train_bound_fraction"], r["infer_bound_fraction"])
        else:
            f = bound_fractions(r, square_rates(machine))
        fractions.append((r["name"], f))
    per_round = any("train_bound_fraction" in r for r in results)
    if any(f for _, f in fractions):
        where = ("measured just before and just after each contender ran (bench/machine.py --square-only, "
                 "their mean; the figure is the median over rounds of each run's fraction: the machine's speed "
                 "drifts during a run)" if per_round else
                 "of bench/machine.py (same run)")
        lines += ["", "## Fraction of the machine's FLOP bound", "",
                  "Each contender's own DNN GEMM FLOPs per sample (forward; training 3x) at the square-GEMM rate "
                  f"{where}, in its precision (bf16 for deepfm-bf16, fp32 for the rest). The "
                  "models differ: deepfm and FuxiCTR embed all 39 fields (DNN input 624), DeepCTR-Torch feeds the "
                  "13 integers raw (429), torchrec projects them into one field (432). Embeddings, FM and "
                  "optimizer are not counted, so 100% is out of reach.", "",
                  "| contender | precision | forward MFLOP/sample | square GEMM GFLOP/s | train | inference |",
                  "|---|---|---|---|---|---|"]
        for r, (name, f) in zip(results, fractions):
            if f:
                precision = "bf16" if name.endswith("bf16") else "fp32"
                rate = r.get("bound_gflops") or square_rates(machine).get(precision, float("nan"))
                lines.append(f"| {name} | {precision} | {f[0]:.3f} | {rate:,.0f} | {f[1]:.0%} | {f[2]:.0%} |")
    if n_rounds > 1 and best["train_samples_per_s_median"]:
        for key, what in (("train_samples_per_s_median", "Training"), ("infer_samples_per_s", "Inference")):
            lines += ["", f"{what} ratio within each round (deepfm / that round's fastest peer):", ""]
            for name in [r["name"] for r in results if r["name"].startswith("deepfm")]:
                ratios = []
                for k in range(n_rounds):
                    in_round = [r for r in runs if r.get("round", 0) == k]
                    mine = [r for r in in_round if r["name"] == name]
                    rivals = [r[key] for r in in_round if not r["name"].startswith("deepfm")]
                    if mine and rivals:
                        ratios.append(mine[0][key] / max(rivals))
                lines.append(f"- {name}: " + ", ".join(f"{x:.2f}x" for x in ratios))
        bounded = [r for r in runs if "bound_gflops_before_after" in r and r["name"].startswith("deepfm")]
        if bounded:
            lines += ["", "deepfm's fraction of the bound in each round (train / inference; square-GEMM GFLOP/s "
                      "before -> after):", ""]
            for name in sorted({r["name"] for r in bounded}):
                lines.append(f"- {name}: " + ", ".join(
                    f"{r['train_bound_fraction']:.0%} / {r['infer_bound_fraction']:.0%} "
                    f"({r['bound_gflops_before_after'][0]:,.0f} -> {r['bound_gflops_before_after'][1]:,.0f})"
                    for r in bounded if r["name"] == name))
    if machine:
        lines += ["", "## Machine ceiling (bench/machine.py)", "", "```", json.dumps(machine, indent=1), "```"]
    lines += ["", "Raw JSON lines: `bench/.out/results.jsonl`. Protocol: bench/README.md."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=250_000, help="generated rows (80/10/10 train/valid/test)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--contenders", default=",".join(ALL))
    ap.add_argument("--skip-setup", action="store_true", help="do not (re)install the peers' venvs")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run the whole contender list this many times; the table shows medians over rounds")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per contender (0 = all cores)")
    ap.add_argument("--quiet-load", type=float, default=1.0)
    ap.add_argument("--quiet-wait", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per contender, seconds")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--busy", type=int, default=0,
                    help="run this many busy-looping processes beside every contender (a shared machine)")
    args = ap.parse_args()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    out = HERE / ".out"
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_setup and any(c in PEERS for c in contenders):
        subprocess.run(["bash", str(HERE / "peers" / "setup.sh"), *[c for c in contenders if c in PEERS]],
                       check=True, cwd=ROOT)
    stem = ensure_data(args.rows, args.seed)
    teacher = json.loads(Path(f"{stem}.json").read_text()) if Path(f"{stem}.json").is_file() else {}
    teacher = teacher.get("splits", {}).get("test", teacher)
    threads = ["--threads", str(args.threads)] if args.threads else []
    machine = run_json([sys.executable, str(HERE / "machine.py"), "--device", args.device, *threads],
                       out / "machine.err", 600)
    train, test = f"{stem}_train.tsv", f"{stem}_test.tsv"
    common = ["--train", train, "--test", test, "--device", args.device, *threads]
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    warm_page_cache([train, test])
    results = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run_rounds(args, contenders, common, out, results)
    finally:
        for proc in busy:
            proc.kill()
    command = "python bench/run_all.py " + " ".join(sys.argv[1:])
    write_results(Path(args.results), results, machine, teacher, command.strip(), args.busy)
    log(f"Wrote {args.results}")


def run_rounds(args: argparse.Namespace, contenders: list[str], common: list[str], out: Path,
               results: list[dict]) -> None:
    threads = ["--threads", str(args.threads)] if args.threads else []
    for round_no, name in [(k, c) for k in range(max(args.rounds, 1)) for c in contenders]:
        if not args.busy:
            wait_quiet(args.quiet_load, args.quiet_wait)
        if name.startswith("deepfm"):
            precision = name.split("-", 1)[1] if "-" in name else "auto"
            cmd = [sys.executable, str(HERE / "run_deepfm.py"), *common, "--precision", precision]
        elif name in PEERS:
            python = HERE / ".envs" / name / "bin" / "python"
            if not python.exists():
                log(f"  {name}: no venv at {python.parent.parent}; run without --skip-setup to install it")
                continue
            cmd = [str(python), str(HERE / "peers" / PEERS[name]), *common]
        else:
            raise SystemExit(f"unknown contender {name!r}; choose from {ALL}")
        in_bf16 = name.endswith("bf16") or (name == "deepfm" and bf16_default(args.device))
        bound_precision = "bf16" if in_bf16 else "fp32"
        # the bound just before and just after the contender (unless --busy: then the one measured before the
        # busy processes started): the machine's speed drifts over a run, and one measure would credit or blame
        # the contenders for it
        square = [] if args.busy else [square_rate(bound_precision, args.device, threads, out)]
        r = run_json(cmd, out / f"{name}.err", args.timeout)
        if not args.busy:
            square.append(square_rate(bound_precision, args.device, threads, out))
        if r is not None:
            r["round"] = round_no
            if square and all(square):
                r["bound_gflops_before_after"] = square
                note_fractions(r, {bound_precision: sum(square) / 2})
            results.append(r)
            with open(out / "results.jsonl", "a") as fh:
                fh.write(json.dumps(r) + "\n")
            log(f"  {name}: {r.get('train_samples_per_s_median', 0):,.0f} samples/s, AUC {r.get('test_auc', 0):.4f}")


if __name__ == "__main__":
    main()
