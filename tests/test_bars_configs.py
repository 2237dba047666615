"""Each BARS config in configs/bars/ runs end to end on a tiny file of the same format (generated here).

The slices have the columns, header and value types of the BARS files (Criteo_x1: normalised floats and
integer ids; Criteo_x4 / Avazu_x4: raw Kaggle values with empty cells; the *_x1 sets: integer ids), so the
configs' column names, label and field kinds are checked against the real layout; only the model is shrunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepfm.cli import main

BARS = Path(__file__).resolve().parents[1] / "configs" / "bars"
ROWS = {"train": 320, "valid": 120, "test": 120}
CRITEO_I = [f"I{i}" for i in range(1, 14)]
CRITEO_C = [f"C{i}" for i in range(1, 27)]
AVAZU_X4 = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
            "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
            "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]

# column -> kind of generated value: label, float01 (normalised numeric), count (raw Criteo integer, may be
# empty), hex (8-hex hash, may be empty), id (small integer id), big (20-digit id), hour (YYMMDDHH)
LAYOUTS = {
    "criteo_x1": {"label": "label", **{c: "float01" for c in CRITEO_I}, **{c: "id" for c in CRITEO_C}},
    "criteo_x4_001": {"Label": "label", **{c: "count" for c in CRITEO_I}, **{c: "hex" for c in CRITEO_C}},
    "avazu_x1": {"label": "label", **{f"feat_{i}": "id" for i in range(1, 23)}},
    "avazu_x4_001": {c: {"id": "big", "click": "label", "hour": "hour"}.get(c, "hex" if c.startswith(("site", "app",
                     "device_id", "device_ip", "device_model")) else "id") for c in AVAZU_X4},
    "frappe_x1": {"label": "label", **{c: "id" for c in ["user", "item", "daytime", "weekday", "isweekend",
                                                           "homework", "cost", "weather", "country", "city"]}},
    "movielenslatest_x1": {"label": "label", "user_id": "id", "item_id": "id", "tag_id": "id"},
}


def _column(kind: str, n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    k = rng.integers(0, 12, n)  # a small vocabulary, so that min_count 10 keeps a few values
    if kind == "float01":
        return [f"{v:.6f}" for v in k / 12.0], k
    if kind == "count":
        return ["" if m else str(int(v)) for v, m in zip(np.expm1(k * 0.8).astype(int), rng.random(n) < 0.2)], k
    if kind == "hex":
        return ["" if m else f"{v * 2654435761 % 2**32:08x}" for v, m in zip(k, rng.random(n) < 0.1)], k
    if kind == "big":
        return [str(10**19 + int(v)) for v in rng.integers(0, 10**12, n)], np.zeros(n)
    if kind == "hour":
        return [str(14102100 + int(v) % 24) for v in k], k
    return [str(int(v)) for v in k], k


def _write_slice(layout: dict[str, str], folder: Path, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    paths = {}
    for split, n in ROWS.items():
        cols: dict[str, list[str]] = {}
        score = np.zeros(n)
        for name, kind in layout.items():
            if kind == "label":
                continue
            cols[name], raw = _column(kind, n, rng)
            score += (raw % 3 == 0) * rng.normal()
        y = (score + rng.normal(size=n) > np.median(score)).astype(int)
        table = {name: (list(map(str, y)) if kind == "label" else cols[name]) for name, kind in layout.items()}
        p = folder / f"{split}.csv"
        with open(p, "w") as f:
            f.write(",".join(layout) + "\n")
            for i in range(n):
                f.write(",".join(table[c][i] for c in layout) + "\n")
        paths[split] = p
    return paths


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_bars_config_runs_end_to_end(name: str, tmp_path: Path) -> None:
    cfg_path = BARS / f"{name}.yaml"
    published = yaml.safe_load(cfg_path.read_text())
    paths = _write_slice(LAYOUTS[name], tmp_path, seed=len(name))
    out = tmp_path / "model"
    rc = main(["train", str(cfg_path), "--output", str(out), "--no-progress",
               *[f"--set=data.{s}={p}" for s, p in paths.items()],
               f"--set=data.cache_dir={tmp_path / 'cache'}", "--set=train.epochs=1", "--set=train.batch_size=64",
               "--set=train.num_threads=1", "--set=model.hidden_units=[16]"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert metrics[split]["rows"] == ROWS[split]
        assert 0.0 <= metrics[split]["auc"] <= 1.0
        assert 0.0 < metrics[split]["logloss"] < 5.0
    used = yaml.safe_load((out / "config.yaml").read_text())
    # the BARS settings reach the trained model unchanged (only epochs/batch/hidden/paths were overridden)
    for key in ("embed_dim", "dropout", "batch_norm"):
        assert used["model"][key] == published["model"][key]
    for key in ("lr", "embedding_l2", "seed", "sparse", "patience"):
        assert used["train"][key] == published["train"][key]
    assert {f["name"]: f["min_count"] for f in used["fields"]} == {
        n: spec.get("min_count", 1) for spec in published["fields"] for n in spec["names"]}
