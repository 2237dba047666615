"""The quality suite's data: every set as train/valid/test TSV files with a header, plus schema.json.

All contenders read exactly these files (same rows, same splits). Sets:

* ``criteo``: /work/shared/data/criteo_sample train/dev/test (7,200 / 409 / 391 rows), as distributed.
* ``avazu``: /work/shared/data/avazu_sample train/dev/test (8,087 / 480 / 432); ``id`` dropped, every other
  column categorical (``hour`` included, as a token).
* ``adult``: UCI Adult (48,842 rows), a fixed seeded split 80/10/10 (seed 2024, independent of the
  training seeds); label ``income == '>50K'``; 6 numeric + 8 categorical columns.
* ``criteo-cv``, ``avazu-cv``: the same samples pooled (8,000 / 8,999 rows) and cut into 10 seeded parts
  (seed 2024); fold k (0..4) tests on part 2k, validates on part 2k+1 and trains on the other 8 parts, so the
  5 folds test on 5 disjoint tenths (4,000 / 4,500 rows in all, against 391 / 432 in the single split).
* ``synthetic``: bench/generate.py ``--split`` (80/10/10) with ``--rows N --seed 1``; Criteo layout; the
  sidecar JSON gives the hidden teacher's AUC / log loss on each split (the ceiling).

Only numpy/pandas are used (the module also runs in the peer venvs when they import the schema).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED = Path(os.environ.get("DEEPFM_SHARED_DATA", "/work/shared/data"))
DATA_ROOT = ROOT / "bench" / ".data" / "quality"

CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
CRITEO_COLS = ["label"] + CRITEO_INT + CRITEO_CAT
AVAZU_COLS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
              "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
              "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
ADULT_NUM = ["age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week"]
ADULT_CAT = ["workclass", "education", "marital-status", "occupation", "relationship", "race", "gender",
             "native-country"]
ADULT_SPLIT_SEED = 2024
SETS = ("criteo", "avazu", "adult", "synthetic", "criteo-cv", "avazu-cv")
FOLDS, CV_PARTS, CV_SEED = 5, 10, 2024


def set_dir(name: str, rows: int | None = None, fold: int | None = None) -> Path:
    d = DATA_ROOT / (f"synthetic_{rows}" if name == "synthetic" else name)
    return d / f"fold{fold}" if fold is not None else d


def folds(name: str) -> list[int | None]:
    """The folds of a set: 0..FOLDS-1 for the cross-validated sets, else [None] (one split)."""
    return list(range(FOLDS)) if name.endswith("-cv") else [None]


def load_schema(d: str | Path) -> dict:
    return json.loads((Path(d) / "schema.json").read_text())


def _write(df, path: Path) -> None:
    df.to_csv(path, sep="\t", index=False, na_rep="")


def _prepare_cv(name: str, log=print) -> Path:
    """The pooled rows of the base set, cut into folds (see the module docstring)."""
    import numpy as np
    import pandas as pd

    base = prepare(name[: -len("-cv")], log=log)
    sc = load_schema(base)
    pooled = pd.concat([pd.read_csv(base / f"{s}.tsv", sep="\t", dtype=str, keep_default_na=False)
                        for s in ("train", "valid", "test")], ignore_index=True)
    part = np.empty(len(pooled), dtype=np.int64)
    part[np.random.default_rng(CV_SEED).permutation(len(pooled))] = np.arange(len(pooled)) % CV_PARTS
    for k in range(FOLDS):
        d = set_dir(name, fold=k)
        d.mkdir(parents=True, exist_ok=True)
        split = np.where(part == 2 * k, "test", np.where(part == 2 * k + 1, "valid", "train"))
        for s in ("train", "valid", "test"):
            _write(pooled[split == s], d / f"{s}.tsv")
        fold_sc = {**sc, "name": name, "fold": k, "folds": FOLDS, "cv_seed": CV_SEED,
                   "rows_per_split": {s: int((split == s).sum()) for s in ("train", "valid", "test")}}
        (d / "schema.json").write_text(json.dumps(fold_sc, indent=1))
    top = {**fold_sc, "fold": None, "pooled_rows": len(pooled)}  # rows_per_split: fold 4's (all within one row)
    (set_dir(name) / "schema.json").write_text(json.dumps(top, indent=1))
    log(f"prepared {name}: {FOLDS} folds of {len(pooled):,} pooled rows in {set_dir(name)}")
    return set_dir(name)


def prepare(name: str, rows: int = 200_000, log=print) -> Path:
    """Write (once) and return the folder with train.tsv / valid.tsv / test.tsv / schema.json (for a
    cross-validated set: the folder of fold folders, each with those files)."""
    import pandas as pd

    d = set_dir(name, rows)
    if (d / "schema.json").is_file():
        return d
    if name.endswith("-cv"):
        return _prepare_cv(name, log)
    d.mkdir(parents=True, exist_ok=True)
    schema: dict = {"name": name, "sep": "\t", "header": True}
    if name == "criteo":
        src = SHARED / "criteo_sample"
        for split, fname in (("train", "train.tsv"), ("valid", "dev.tsv"), ("test", "test.tsv")):
            df = pd.read_csv(src / fname, sep="\t", header=None, names=CRITEO_COLS, dtype=str, keep_default_na=False)
            _write(df, d / f"{split}.tsv")
        schema.update(label="label", numeric=CRITEO_INT, categorical=CRITEO_CAT, source=str(src))
    elif name == "avazu":
        src = SHARED / "avazu_sample"
        for split, fname in (("train", "train.csv"), ("valid", "dev.csv"), ("test", "test.csv")):
            df = pd.read_csv(src / fname, header=0 if split == "train" else None, names=AVAZU_COLS, dtype=str,
                             keep_default_na=False)
            _write(df.drop(columns=["id"]), d / f"{split}.tsv")
        schema.update(label="click", numeric=[], categorical=AVAZU_COLS[2:], source=str(src))
    elif name == "adult":
        import numpy as np

        df = pd.read_parquet(SHARED / "adult" / "adult.parquet")
        df["income"] = (df["income"].astype(str).str.strip().str.rstrip(".") == ">50K").astype(int)
        df = df[["income"] + ADULT_NUM + ADULT_CAT]
        perm = np.random.default_rng(ADULT_SPLIT_SEED).permutation(len(df))
        n_valid = n_test = int(round(len(df) * 0.1))
        parts = {"valid": perm[:n_valid], "test": perm[n_valid:n_valid + n_test], "train": perm[n_valid + n_test:]}
        for split, idx in parts.items():
            _write(df.iloc[np.sort(idx)], d / f"{split}.tsv")
        schema.update(label="income", numeric=ADULT_NUM, categorical=ADULT_CAT,
                      source=str(SHARED / "adult" / "adult.parquet"), split_seed=ADULT_SPLIT_SEED)
    elif name == "synthetic":
        stem = d / "gen.tsv"
        subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--rows", str(rows), "--seed", "1",
                        "--out", str(stem), "--split", "--workers", "1", "--quiet"], check=True)
        side = json.loads((d / "gen.json").read_text())
        for split in ("train", "valid", "test"):
            raw = d / f"gen_{split}.tsv"
            with open(d / f"{split}.tsv", "w") as out:
                out.write("\t".join(CRITEO_COLS) + "\n")
                with open(raw) as f:
                    for chunk in iter(lambda: f.read(1 << 24), ""):
                        out.write(chunk)
            raw.unlink()
        schema.update(label="label", numeric=CRITEO_INT, categorical=CRITEO_CAT, rows=rows, generator_seed=1,
                      teacher={s: side["splits"][s] for s in ("train", "valid", "test")})
    else:
        raise ValueError(f"unknown set {name!r}; choose from {SETS}")
    for split in ("train", "valid", "test"):
        with open(d / f"{split}.tsv") as f:
            schema.setdefault("rows_per_split", {})[split] = sum(1 for _ in f) - 1
    (d / "schema.json").write_text(json.dumps(schema, indent=1))
    log(f"prepared {name}: {schema['rows_per_split']} in {d}")
    return d


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    for s in a.sets:
        print(prepare(s, a.rows))
