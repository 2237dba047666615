"""Each bad input gets one clear error naming file, line and field, a non-zero exit, and damages nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deepfm.cli import main
from deepfm.config import load_config

HEADER = "label\tI1\tC1\n"
GOOD_LINES = [f"{i % 2}\t{i}\tc{i % 3}\n" for i in range(40)]
GOOD = "".join(GOOD_LINES)
FIRST, REST = "".join(GOOD_LINES[:10]), "".join(GOOD_LINES[10:])


def _config(tmp_path: Path, train: Path, **extra) -> Path:
    cfg = {"data": {"format": "tsv", "header": True, "train": str(train), "valid": str(train),
                    "cache_dir": str(tmp_path / "cache"), **extra},
           "fields": [{"name": "I1", "kind": "numeric"}, {"name": "C1"}],
           "model": {"hidden_units": [8]}, "train": {"epochs": 1, "batch_size": 16, "progress": False}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(cfg: Path, out: Path, *extra: str) -> int:
    return main(["train", str(cfg), "--output", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("bad_line, message, field", [
    ("1\t5\n", "expected 3 columns, found 2", None),
    ("1\t5\tc1\textra\n", "expected 3 columns, found 4", None),
    ("1\tabc\tc1\n", "'abc' is not a finite number", "I1"),
    ("1\tinf\tc1\n", "'inf' is not a finite number", "I1"),
    ("1\t1e39\tc1\n", "'1e39' is not a finite number", "I1"),
    ("2\t5\tc1\n", "label must be 0 or 1", "label"),
    ("yes\t5\tc1\n", "label must be 0 or 1", "label"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, capsys, bad_line, message, field):
    train = tmp_path / "train.tsv"
    train.write_text(HEADER + FIRST + bad_line + REST)  # data line 11 -> file line 12
    code = _train(_config(tmp_path, train), tmp_path / "model")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{train}, line 12" in err and message in err
    if field:
        assert f"field '{field}'" in err
    assert not (tmp_path / "model").exists()
    assert not any((tmp_path / "cache").glob("*/manifest.json"))  # no cache half-written or trusted


def test_skip_bad_rows_counts_and_writes_them_aside(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text(HEADER + FIRST + "1\tabc\tc1\n" + "1\t5\n" + REST)
    code = _train(_config(tmp_path, train), tmp_path / "model", "--skip-bad-rows")
    err = capsys.readouterr().err
    assert code == 0
    assert "Skipped 4 bad row(s)" in err  # 2 bad rows, once in train and once in the valid file (same file)
    side = next((tmp_path / "cache").glob("*/bad_rows.txt")).read_text().splitlines()
    assert len(side) == 4 and any(":12: field 'I1'" in s for s in side) and any(":13: expected 3" in s for s in side)
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert manifest["splits"]["train"]["rows"] == 40


def test_empty_and_missing_files(tmp_path, capsys):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert _train(_config(tmp_path, empty), tmp_path / "m") == 2
    assert f"{empty}: file is empty" in capsys.readouterr().err
    header_only = tmp_path / "header.tsv"
    header_only.write_text(HEADER)
    assert _train(_config(tmp_path, header_only), tmp_path / "m") == 2
    assert "no data rows" in capsys.readouterr().err
    missing = tmp_path / "nope.tsv"
    assert _train(_config(tmp_path, missing), tmp_path / "m") == 2
    assert f"{missing}: train file not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "no-config.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_unknown_config_key_and_wrong_type(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text(HEADER + GOOD)
    cfg = _config(tmp_path, train)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["hiden_units"] = [8]
    cfg.write_text(yaml.safe_dump(raw))
    assert _train(cfg, tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "model.hiden_units: unknown key" in err
    raw["model"].pop("hiden_units")
    raw["train"]["epochs"] = "many"
    cfg.write_text(yaml.safe_dump(raw))
    assert _train(cfg, tmp_path / "m") == 2
    assert "train.epochs" in capsys.readouterr().err
    assert _train(cfg, tmp_path / "m", "--set", "train.epochs=1", "--set", "model.dropout=2") == 2
    assert "model.dropout" in capsys.readouterr().err
    with pytest.raises(Exception, match="fields.2: Value error, each field needs exactly one"):
        raw["fields"].append({"kind": "categorical"})
        cfg.write_text(yaml.safe_dump(raw))
        load_config(cfg, ["train.epochs=1"])


def test_incompatible_model_directory_and_failed_run_keeps_old_model(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text(HEADER + GOOD)
    out = tmp_path / "model"
    assert _train(_config(tmp_path, train), out) == 0
    before = (out / "model.safetensors").read_bytes()
    # a later run that fails on bad data must not touch the existing model directory
    bad = tmp_path / "bad.tsv"
    bad.write_text(HEADER + "1\tx\tc\n")
    assert _train(_config(tmp_path, bad), out) == 2
    assert (out / "model.safetensors").read_bytes() == before
    info = json.loads((out / "deepfm.json").read_text())
    info["format_version"] = 99
    (out / "deepfm.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model format version 99" in err and "retrain" in err
    assert main(["predict", str(tmp_path / "nowhere"), str(train), "--output", str(tmp_path / "p.csv")]) == 2
    assert "model directory not found" in capsys.readouterr().err
