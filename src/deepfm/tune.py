"""``deepfm tune``: hyperparameter search with optuna, chosen on validation AUC only.

    deepfm tune CONFIG.yaml --trials 20 [--space space.yaml] [--output DIR] [--set section.key=value]

Every trial trains the config with some keys replaced (the search space) and early-stops on the validation
split as ``deepfm train`` does; its score is the best validation AUC. The test file is never read during the
search (``data.test`` is dropped for the trials; with ``data.split`` the test fraction is still held out and
its metrics are ignored). Writes to DIR (default ``runs/tune-<config name>``):

* ``best.yaml``: the complete config of the best trial (test file restored), ready for ``deepfm train``;
* ``trials.csv``: one row per trial: number, state, valid AUC / log loss, best epoch, seconds, parameters.

The search space is YAML, one entry per dotted config key::

    train.lr:            {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.dropout:       {type: float, low: 0.0, high: 0.5}
    train.batch_size:    {type: categorical, choices: [256, 1024, 4096]}
    model.hidden_units:  {type: categorical, choices: [[400, 400, 400], [200, 200]]}
    model.embed_dim:     {type: int, low: 8, high: 32, step: 8}

Without ``--space`` the search uses DEFAULT_SPACE. Needs optuna: ``pip install 'deepfm[tune]'``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from deepfm.config import read_yaml_mapping
from deepfm.errors import ConfigError, DeepFMError

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "train.embedding_l2": {"type": "categorical", "choices": [0.0, 1e-6, 1e-5, 1e-4]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "model.init_std": {"type": "categorical", "choices": [1e-4, 1e-3, 1e-2]},
    "model.embed_dim": {"type": "categorical", "choices": [8, 16, 32]},
    "train.batch_size": {"type": "categorical", "choices": [256, 1024, 4096]},
}
_TYPES = ("float", "int", "categorical")


def load_space(path: str | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return DEFAULT_SPACE
    p = Path(path)
    space = read_yaml_mapping(p, "search space", "the search space must be a non-empty mapping of dotted config keys")
    for key, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
            raise ConfigError(f"{p}: '{key}' needs a mapping with type: {' | '.join(_TYPES)}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ConfigError(f"{p}: '{key}': a categorical entry needs a non-empty 'choices' list")
        elif "low" not in spec or "high" not in spec or not spec["low"] <= spec["high"]:
            raise ConfigError(f"{p}: '{key}': a {spec['type']} entry needs low <= high")
    return space


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "float":
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                              step=spec.get("step"))
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                            step=int(spec.get("step", 1)))
        else:
            # optuna stores only None/bool/int/float/str choices: lists (hidden_units) go in as JSON strings
            choices = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in spec["choices"]]
            value = trial.suggest_categorical(key, choices)
            params[key] = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
    return params


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def tune(config_path: str, trials: int, *, space: dict[str, dict[str, Any]] | None = None,
         output: str | Path | None = None, overrides: list[str] | None = None, seed: int = 0,
         timeout: float | None = None, log=print) -> dict[str, Any]:
    """Run the search; returns ``{"best": {...}, "trials": [...], "best_config": path, "trials_csv": path}``."""
    try:
        import optuna
    except ImportError:
        raise DeepFMError("deepfm tune needs optuna: pip install 'deepfm[tune]'") from None
    from deepfm.config import SplitConfig, config_to_dict, load_config
    from deepfm.io import atomic_path, atomic_write_text
    from deepfm.pipeline import train

    space = space or DEFAULT_SPACE
    base_overrides = list(overrides or [])
    base = load_config(config_path, base_overrides)  # a bad config fails here, before any trial
    split = base.data.split
    if base.data.valid is None and (split is None or isinstance(split, SplitConfig) and split.valid <= 0):
        raise ConfigError("deepfm tune chooses on validation AUC: the config needs data.valid, data.split.valid or "
                          "a time split (data.split.by)")
    out = Path(output or Path("runs") / f"tune-{Path(config_path).stem}")
    out.mkdir(parents=True, exist_ok=True)
    trial_fixed = ["train.progress=false", "data.test=null"]
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        params = suggest(trial, space)
        cfg = load_config(config_path, base_overrides + _overrides(params) + trial_fixed)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            # each trial's epochs are reported as they end: a long trial is never silent
            result = train(cfg, Path(tmp) / "model", log=lambda m: log(f"  trial {trial.number}: {m}"))
        assert result is not None
        result.data.close()
        valid = result.metrics["valid"]
        row = {"trial": trial.number, "valid_auc": valid["auc"], "valid_logloss": valid["logloss"],
               "best_epoch": result.metrics["train"]["best_epoch"],
               "epochs_run": result.metrics["train"]["epochs_run"],
               "seconds": round(time.perf_counter() - t0, 2), **params}
        rows.append(row)
        trial.set_user_attr("valid_logloss", valid["logloss"])
        log(f"trial {trial.number}: valid AUC {valid['auc']:.5f}  log loss {valid['logloss']:.5f}  "
            + "  ".join(f"{k}={v}" for k, v in params.items()))
        return float(valid["auc"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, timeout=timeout)
    best_row = max(rows, key=lambda r: r["valid_auc"])
    assert best_row["trial"] == study.best_trial.number
    best_params = {k: best_row[k] for k in space}
    best_cfg = load_config(config_path, base_overrides + _overrides(best_params))  # test file kept
    best_yaml = out / "best.yaml"
    header = (f"# deepfm tune: best of {len(rows)} trial(s) on validation AUC ({best_row['valid_auc']:.5f}, "
              f"trial {best_row['trial']}) from {config_path}\n# parameters: {json.dumps(best_params)}\n")
    atomic_write_text(best_yaml, header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
    trials_csv = out / "trials.csv"
    cols = ["trial", "valid_auc", "valid_logloss", "best_epoch", "epochs_run", "seconds", *space]
    with atomic_path(trials_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in sorted(rows, key=lambda r: r["trial"]):
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return {"best": best_row, "trials": rows, "best_config": best_yaml, "trials_csv": trials_csv}


def cmd_tune(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.trials < 1:
        raise ConfigError("--trials must be at least 1")
    res = tune(args.config, args.trials, space=load_space(args.space), output=args.output, overrides=overrides,
               seed=args.seed, timeout=args.timeout, log=lambda m: print(m, file=sys.stderr, flush=True))
    b = res["best"]
    print(f"best trial {b['trial']}: valid AUC {b['valid_auc']:.5f}, log loss {b['valid_logloss']:.5f}\n"
          f"config: {res['best_config']}\ntrials: {res['trials_csv']}\n"
          f"Next: deepfm train {res['best_config']}")
    return 0


def register(sub: Any) -> None:
    """Add ``deepfm tune`` to the CLI's subparsers (called from ``deepfm.cli.build_parser``)."""
    t = sub.add_parser("tune", help="hyperparameter search (optuna) on validation AUC; writes best.yaml + trials.csv")
    t.add_argument("config", help="YAML config to start from (needs a validation split)")
    t.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    t.add_argument("--space", help="search-space YAML (default: lr, embedding_l2, dropout, init_std, embed_dim, "
                                   "batch_size)")
    t.add_argument("--output", "-o", help="folder for best.yaml and trials.csv (default runs/tune-<config name>)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    t.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    t.set_defaults(func=cmd_tune)
