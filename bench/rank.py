"""Run ``deepfm ARGS`` as one rank, optionally under a memory cap, and record that rank's peak memory.

    torchrun --nproc-per-node 2 bench/rank.py [--cap-mib N] [--report DIR] -- train CONFIG --output OUT

``--cap-mib``: ``resource.setrlimit(RLIMIT_AS)`` on this process before deepfm starts (address space, so a
rank whose table does not fit fails at its allocation rather than being killed by the kernel later).
``--report DIR``: at exit, ``DIR/rank-R.json`` holds the exit status, peak resident memory (ru_maxrss) and
peak address space (VmPeak) of this rank.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import runpy
import sys
from pathlib import Path


def _vm_peak_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-mib", type=int, default=None)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    rank = int(os.environ.get("RANK", "0"))
    if a.cap_mib is not None:
        cap = a.cap_mib << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    status: dict[str, object] = {"rank": rank, "cap_mib": a.cap_mib, "exit": None}

    def report() -> None:
        if a.report is None:
            return
        a.report.mkdir(parents=True, exist_ok=True)
        status.update(peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      vm_peak_mib=round((_vm_peak_kib() or 0) / 1024, 1))
        (a.report / f"rank-{rank}.json").write_text(json.dumps(status))

    atexit.register(report)
    sys.argv = ["deepfm", *args]
    try:
        runpy.run_module("deepfm", run_name="__main__")
    except SystemExit as done:
        status["exit"] = done.code if isinstance(done.code, int) else 1
        raise


if __name__ == "__main__":
    main()
