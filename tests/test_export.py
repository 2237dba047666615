"""deepfm export: ONNX (onnxruntime) and TorchScript give the PyTorch model's probabilities (<= 1e-5)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import polars as pl
import pytest
import torch

import _serve_models as models
from deepfm.artifact import load_model
from deepfm.cli import main as cli_main
from deepfm.config import CRITEO_COLUMNS
from deepfm.data.loader import input_from_chunk
from deepfm.data.readers import RawChunk
from deepfm.export import export_model

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-5


def _rows(which: str) -> tuple:
    if which == "criteo":
        df = pl.read_csv(models.CRITEO / "data" / "train.tsv", separator="\t", has_header=False,
                         new_columns=CRITEO_COLUMNS, infer_schema_length=0, n_rows=1000)
        return models.criteo_model(), df.drop("label")
    model_dir = models.multi_model()  # writes the data it trains on
    df = pl.read_csv(models.workdir() / "multi-data" / "train.csv", infer_schema_length=0, n_rows=1000)
    return model_dir, df.drop("label")


def _inputs(loaded, df: pl.DataFrame) -> tuple[torch.Tensor, ...]:
    enc = loaded.encoder.transform(RawChunk("<t>", df, np.arange(1, df.height + 1), 0), labels=False)
    t = input_from_chunk(enc).tensors()
    return t if loaded.layout.multi_fields else t[:2]


def _reference(loaded, df: pl.DataFrame) -> np.ndarray:
    enc = loaded.encoder.transform(RawChunk("<t>", df, np.arange(1, df.height + 1), 0), labels=False)
    with torch.no_grad():
        return torch.sigmoid(loaded.model(*input_from_chunk(enc).tensors())).numpy()


@pytest.mark.parametrize("which", ["criteo", "multi"])
def test_onnx_matches_pytorch(which, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model_dir, df = _rows(which)
    out = export_model(model_dir, "onnx", tmp_path / "m.onnx")
    for side in ("encoder.json", "layout.json", "config.yaml", "export.json"):
        assert (tmp_path / side).is_file()
    manifest = json.loads((tmp_path / "export.json").read_text())
    loaded = load_model(model_dir)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == [i["name"] for i in manifest["inputs"]]
    assert manifest["cat_fields"][0]["name"] == loaded.layout.cat_fields[0]
    diffs = {}
    for n in (1, 1000, 7):
        part = df.head(n)
        got = sess.run(["probabilities"], dict(zip(names, (t.numpy() for t in _inputs(loaded, part)))))[0]
        ref = _reference(loaded, part)
        assert got.shape == ref.shape == (n,)
        diffs[n] = float(np.abs(got - ref).max())
    print(f"{which} onnx max |diff|", diffs)
    assert max(diffs.values()) <= TOL, diffs
    if which == "multi":  # a batch without any tag: nnz = 0
        empty = df.head(3).with_columns(pl.lit(None, pl.Utf8).alias(c) for c in ("tags", "cats", "query"))
        inp = _inputs(loaded, empty)
        assert inp[2].numel() == 0
        got = sess.run(["probabilities"], dict(zip(names, (t.numpy() for t in inp))))[0]
        assert np.abs(got - _reference(loaded, empty)).max() <= TOL


@pytest.mark.parametrize("which", ["criteo", "multi"])
def test_torchscript_matches_pytorch(which, tmp_path):
    model_dir, df = _rows(which)
    assert cli_main(["export", str(model_dir), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]) == 0
    ts = torch.jit.load(str(tmp_path / "m.pt"))
    loaded = load_model(model_dir)
    diffs = {}
    for n in (1, 1000):
        part = df.head(n)
        with torch.no_grad():
            logits, probs = ts(*_inputs(loaded, part))
        ref = _reference(loaded, part)
        diffs[n] = float(np.abs(probs.numpy() - ref).max())
    print(f"{which} torchscript max |diff|", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_export_cli_errors(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", str(models.criteo_model()), "--format", "pickle"])
