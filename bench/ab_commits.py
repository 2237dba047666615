"""Paired A/B of two commits' training step and predict pass: ``step_time.py`` run with each commit's code,
taking turns within every round (the order flips each round), so that the machine's drift hits both alike.

    python bench/ab_commits.py --base 5e0569f [--head HEAD] [--precision fp32 bf16] [--rounds 6] [--steps 40]

Each commit's ``src/`` is unpacked with ``git archive`` into a temporary folder and put first on PYTHONPATH;
the harness (this folder: step_time.py, run_deepfm.py's configuration, run_all.py's data) is this tree's for
both. Both sides run with the same process settings, given in the environment (``PROCESS_ENV``: libgomp's
spin count and glibc's malloc thresholds, the values deepfm's entry points apply), so that a commit that moves
where those are applied (the library, or only the command line) is compared on its code alone. Prints every
run's JSON line, then per precision the medians and the head/base ratios (step time: below
1 is faster; samples/s: above 1 is faster). Needs a quiet machine for figures worth writing down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROCESS_ENV = {"GOMP_SPINCOUNT": "5000", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
               "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}


def unpack(rev: str, into: Path) -> Path:
    """``rev``'s ``src/`` under ``into``; returns that ``src`` folder."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run(src: Path, precision: str, steps: int, tag: str) -> dict:
    env = {**os.environ, **PROCESS_ENV, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, str(HERE / "step_time.py"), "--precision", precision, "--steps",
                          str(steps), "--tag", tag], check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{tag}: step_time.py failed with code {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deepfm-ab-") as tmp:
        trees = {"base": unpack(args.base, Path(tmp) / "base"), "head": unpack(args.head, Path(tmp) / "head")}
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
            for precision in args.precision:
                for name in order:
                    got = run(trees[name], precision, args.steps, f"{name} {precision} round {r + 1}")
                    print(json.dumps(got), flush=True)
                    results.setdefault((name, precision), []).append(got)
    for precision in args.precision:
        base, head = results[("base", precision)], results[("head", precision)]
        summary = {"precision": precision, "rounds": args.rounds, "base": args.base, "head": args.head}
        for key in ("step_ms", "train_samples_per_s", "infer_samples_per_s"):
            b, h = median(x[key] for x in base), median(x[key] for x in head)
            summary[key] = {"base": round(b, 2), "head": round(h, 2), "head/base": round(h / b, 3)}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
