"""Small trained models shared by the serve and export tests: trained once per test process.

``criteo_model()``  the bundled Criteo sample (log-bucketed numeric + categorical fields), 1 epoch.
``multi_model()``   a synthetic CSV that exercises every encoder branch: multi-valued fields (text and
                    weighted tags, mean / sqrtn / sum combiners, max_len), standardized and scaled numeric
                    fields, log1p buckets, a hashed vocabulary and a shared vocabulary.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

from deepfm.config import config_from_dict, load_config
from deepfm.pipeline import train

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT / "examples" / "criteo"


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="deepfm-serve-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _quiet(*_a, **_k) -> None:
    pass


@functools.lru_cache(maxsize=None)
def criteo_model() -> Path:
    out = workdir() / "criteo-model"
    cfg = load_config(CRITEO / "config.yaml", ["train.epochs=1", "model.hidden_units=[32,32]",
                                               "train.progress=false", f"data.cache_dir={workdir() / 'cache'}"])
    train(cfg, out, log=_quiet)
    return out


MULTI_COLUMNS = ["label", "user", "site", "price", "age", "clicks", "tags", "cats", "query"]


def multi_rows(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    tags = [f"t{i}" for i in range(30)]
    rows = []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        chosen = rng.choice(tags, size=k, replace=False)
        tag_cell = "^".join(f"{t}:{rng.uniform(0.1, 2.0):.3f}" if rng.random() < 0.5 else str(t)
                            for t in chosen)
        cats = "^".join(str(c) for c in rng.choice(tags[:10], size=int(rng.integers(0, 4)), replace=False))
        query = "^".join(f"q{int(rng.integers(0, 40))}" for _ in range(int(rng.integers(0, 4))))
        price = "" if rng.random() < 0.1 else f"{rng.lognormal(3, 1):.2f}"
        age = "" if rng.random() < 0.1 else str(int(rng.integers(15, 80)))
        clicks = "" if rng.random() < 0.1 else str(int(rng.integers(0, 500)))
        score = (len(chosen) > 2) + (price != "" and float(price) > 20) + rng.normal(0, 0.7)
        rows.append([str(int(score > 1)), f"u{int(rng.integers(0, 60))}", f"s{int(rng.integers(0, 500))}", price,
                     age, clicks, tag_cell, cats, query])
    return rows


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text(",".join(MULTI_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


@functools.lru_cache(maxsize=None)
def multi_model() -> Path:
    d = workdir() / "multi-data"
    d.mkdir(parents=True, exist_ok=True)
    train_csv = write_csv(d / "train.csv", multi_rows(1500, 1))
    valid_csv = write_csv(d / "valid.csv", multi_rows(300, 2))
    raw = {
        "data": {"format": "csv", "train": str(train_csv), "valid": str(valid_csv),
                 "cache_dir": str(workdir() / "cache")},
        "fields": [
            {"name": "user", "min_count": 2},
            {"name": "site", "hash_buckets": 64},
            {"name": "price", "kind": "numeric", "numeric": "standardize", "log1p": True},
            {"name": "age", "kind": "numeric", "numeric": "scale"},
            {"name": "clicks", "kind": "numeric", "numeric": "log_bucket", "log1p": True},
            {"name": "tags", "kind": "multi", "combiner": "mean", "vocab": "tag"},
            {"name": "cats", "kind": "multi", "combiner": "sqrtn", "vocab": "tag", "max_len": 2},
            {"name": "query", "kind": "multi", "combiner": "sum"},
        ],
        "model": {"embed_dim": 8, "hidden_units": [16, 16]},
        "train": {"epochs": 1, "batch_size": 128, "progress": False},
    }
    out = workdir() / "multi-model"
    train(config_from_dict(raw), out, log=_quiet)
    return out


def children(pid: int) -> set[int]:
    """The pids of a process's children (Linux /proc): a ``deepfm serve --workers N`` parent's workers."""
    return {int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}


def wait_until(check, seconds: float = 120.0):
    """``check()``'s first true value, polled every 0.2 s; the test fails after ``seconds``."""
    import time

    import pytest

    end = time.time() + seconds
    while time.time() < end:
        out = check()
        if out:
            return out
        time.sleep(0.2)
    pytest.fail("timed out")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of Prometheus text (``name`` with exactly ``labels``; the ``pid`` label of a
    per-worker gauge ignored), or None when the server has not written it."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and {k: v for k, v in sample.labels.items() if k != "pid"} == labels:
                return sample.value
    return None


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name``: (labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
