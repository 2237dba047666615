"""deepfm tune: a few tiny optuna trials on the bundled Criteo sample, chosen on validation AUC only."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from conftest import criteo_config_dict

pytest.importorskip("optuna")


def _config(tmp_path: Path) -> Path:
    raw = criteo_config_dict(tmp_path, epochs=1, batch_size=512, num_threads=1)
    raw["model"].update(hidden_units=[16], embed_dim=4)
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_tune_cli_picks_max_valid_auc_and_writes_valid_config(tmp_path: Path, capsys) -> None:
    from deepfm.cli import main
    from deepfm.config import load_config

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.hidden_units": {"type": "categorical", "choices": [[16], [8, 8]]},
        "model.init_std": {"type": "categorical", "choices": [1e-4, 1e-2]},
    }))
    out = tmp_path / "tune"
    assert main(["tune", str(_config(tmp_path)), "--trials", "3", "--space", str(space), "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    aucs = [float(r["valid_auc"]) for r in rows]
    assert all(0.5 < a < 1.0 for a in aucs)
    best = rows[max(range(3), key=lambda i: aucs[i])]
    captured = capsys.readouterr()
    assert f"valid AUC {max(aucs):.5f}" in captured.out
    # every trial reports its epochs while it runs (stderr), and the best result is printed once
    for r in rows:
        assert f"trial {r['trial']}: epoch 1 | train logloss" in captured.err
        assert f"trial {r['trial']}: valid AUC {float(r['valid_auc']):.5f}" in captured.err
    assert (captured.out + captured.err).count(f"best trial {best['trial']}") == 1
    assert "best: trial" not in captured.out + captured.err

    cfg = load_config(out / "best.yaml")  # validates
    assert cfg.train.lr == pytest.approx(float(best["train.lr"]))
    assert list(cfg.model.hidden_units) == yaml.safe_load(best["model.hidden_units"])
    assert cfg.model.init_std == pytest.approx(float(best["model.init_std"]))
    assert cfg.data.test is not None and cfg.data.test.endswith("test.tsv")  # restored after the search
    assert cfg.model.embed_dim == 4 and cfg.train.epochs == 1  # the base config's own values stay


def test_tune_never_reads_the_test_split(tmp_path: Path, monkeypatch) -> None:
    from deepfm import pipeline, tune

    seen = []
    real = pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda cfg, out, **kw: seen.append(cfg.data.test) or real(cfg, out, **kw))
    res = tune.tune(str(_config(tmp_path)), 2, space={"model.dropout": {"type": "float", "low": 0.0, "high": 0.5}},
                    output=tmp_path / "t", log=lambda _m: None)
    assert seen == [None, None]
    assert all("test" not in t for t in res["trials"])
    assert res["best"]["valid_auc"] == max(t["valid_auc"] for t in res["trials"])


def test_bad_space_is_a_config_error(tmp_path: Path) -> None:
    from deepfm.cli import main

    bad = tmp_path / "space.yaml"
    bad.write_text("train.lr: {type: uniform, low: 1, high: 2}\n")
    assert main(["tune", str(_config(tmp_path)), "--trials", "1", "--space", str(bad)]) == 2
