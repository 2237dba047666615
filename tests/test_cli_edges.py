"""The command line's rough edges: unknown output extensions, the missing-input message, bars only on a
terminal, the default output folder, the learning-rate message, train.min_delta, defaults in --help, and the
Makefile's torch index."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import _serve_models as models
from conftest import criteo_config_dict
from deepfm.cli import build_parser, main
from deepfm.config import TrainConfig, config_from_dict
from deepfm.errors import ConfigError
from deepfm.pipeline import default_output, train
from deepfm.progress import progress_bar
from deepfm.train.optim import LearningRateOnPlateau

ROOT = Path(__file__).resolve().parents[1]
TEST_TSV = models.CRITEO / "data" / "test.tsv"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return models.criteo_model()


@pytest.mark.parametrize("name", ["p.json", "p.parq", "p", "p.tsv"])
def test_an_unknown_output_extension_is_an_error(model_dir, tmp_path, capsys, name):
    assert main(["predict", str(model_dir), str(TEST_TSV), "--output", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    suffix = Path(name).suffix
    assert f"unknown output extension '{suffix}': use .csv, .parquet, .pq" in err
    assert list(tmp_path.iterdir()) == []


def test_predict_on_a_missing_input_names_the_input_not_the_config(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(model_dir), "nope.tsv", "--output", "p.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nope.tsv: file not found (the input file to score; relative paths are read "
                          f"from the current folder {tmp_path})")
    assert "data.train" not in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    assert list(progress_bar(range(5), desc="score", unit="chunk")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # pytest's capture is not a terminal
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(progress_bar(range(5), desc="score", unit="chunk")) == [0, 1, 2, 3, 4]
    assert "score" in term.getvalue() and "chunk" in term.getvalue()
    term2 = _Terminal()
    monkeypatch.setattr(sys, "stderr", term2)
    assert list(progress_bar(range(5), desc="score", enabled=False)) == [0, 1, 2, 3, 4]
    assert term2.getvalue() == ""


def test_evaluate_into_a_pipe_prints_no_bar(model_dir):
    proc = subprocess.run([sys.executable, "-m", "deepfm", "evaluate", str(model_dir), str(TEST_TSV)],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "chunk/s" not in proc.stderr and "it/s" not in proc.stderr and "score:" not in proc.stderr
    assert proc.stdout.splitlines()[0].startswith("auc ") and proc.stderr == ""


def test_default_output_is_named_after_the_config_or_its_folder(tmp_path, capsys, monkeypatch):
    assert default_output("examples/criteo/config.yaml") == Path("runs/criteo")
    assert default_output("configs/bars/criteo_x1.yaml") == Path("runs/criteo_x1")
    assert default_output("runs/tune-config/best.yaml") == Path("runs/tune-config")
    assert default_output(None) == Path("runs/model")
    exp = tmp_path / "ctr-small"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump(criteo_config_dict(tmp_path, epochs=1)))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(exp / "config.yaml"), "--set", "model.hidden_units=[8]"]) == 0
    captured = capsys.readouterr()
    assert f"Output: runs/ctr-small (named after {exp / 'config.yaml'}; choose with --output DIR)" in captured.err
    assert "Model written to runs/ctr-small" in captured.out
    assert (tmp_path / "runs" / "ctr-small" / "model.safetensors").is_file()


def _reduce(factor: float, lr: float, min_lr: float = 1e-6) -> tuple[float, list[str]]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    messages: list[str] = []
    plateau = LearningRateOnPlateau([opt], TrainConfig(lr_plateau_factor=factor, min_lr=min_lr), messages.append)
    plateau.step(0.7)  # the first epoch's score: the best so far
    plateau.step(0.7)  # no gain
    return opt.param_groups[0]["lr"], messages


def test_the_learning_rate_message_appears_only_when_the_rate_changes():
    assert _reduce(1.0, 1e-3) == (1e-3, [])
    assert _reduce(0.1, 1e-6) == (1e-6, [])  # already at min_lr
    lr, messages = _reduce(0.5, 1e-3)
    assert lr == pytest.approx(5e-4)
    assert messages == ["Validation AUC did not improve: learning rate 1.00e-03 -> 5.00e-04"]


def test_min_delta_decides_what_counts_as_a_gain(tmp_path):
    with pytest.raises(ConfigError, match="min_delta"):
        config_from_dict(criteo_config_dict(tmp_path, min_delta=-0.1))
    runs = {}
    for delta in (0.0, 0.5):
        raw = criteo_config_dict(tmp_path, epochs=4, patience=1, min_delta=delta, lr_plateau_factor=1.0, lr=0.01)
        raw["model"].update(hidden_units=[8], embed_dim=4)
        messages: list[str] = []
        res = train(config_from_dict(raw), tmp_path / f"m{delta}", log=messages.append)
        runs[delta] = (res, messages)
    strict, _ = runs[0.5]
    # no epoch can beat the first by 0.5 AUC: stop after patience=1 epoch without gain, keep epoch 1
    assert strict.metrics["train"]["best_epoch"] == 1 and strict.metrics["train"]["epochs_run"] == 2
    loose, messages = runs[0.0]
    aucs = [r["valid_auc"] for r in loose.history]
    assert loose.metrics["train"]["epochs_run"] > 2 or aucs[1] <= aucs[0]  # any gain counted
    assert not any("learning rate" in m for m in messages)  # lr_plateau_factor 1.0: nothing to say


def _help(*argv: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return ""


@pytest.mark.parametrize("command, expected", [
    ("serve", ["TCP port to listen on (default: 8000)", "(default: 1)", "(default: 10000)", "(default: 127.0.0.1)"]),
    ("export", ["(default: onnx)"]),
    ("predict", ["(default: auto)"]),
    ("tune", ["(default 20)", "(default 0)"]),
])
def test_help_shows_defaults(capsys, command, expected):
    _help(command)
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out, (text, out)
    assert "(default: None)" not in out and "(default: False)" not in out


def test_makefile_torch_index_is_plain_pypi_by_default_and_pytorchs_cpu_index_on_request(tmp_path):
    def setup_commands(*extra: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path / 'v'}", *extra], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "pip install" in line and "torch==" in line]

    assert setup_commands() == [f'{tmp_path}/v/bin/pip install -q  "torch==2.13.0"']
    assert setup_commands("TORCH_INDEX=https://download.pytorch.org/whl/cpu") == [
        f'{tmp_path}/v/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"']
    text = (ROOT / "README.md").read_text()
    assert "make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
