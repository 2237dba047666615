"""Row-wise int8 tables: the codes, scales and biases reproduce each row within half a step; a served int8
model scores close to the float32 one (AUC within 0.0005 on the Criteo sample's test split); the model
directory can hold the quantized table, which loading then maps instead of quantizing again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

import _serve_models as models
from deepfm.artifact import load_model
from deepfm.config import CRITEO_COLUMNS
from deepfm.metrics import summarize
from deepfm.quantize import INT8_FILE, quantize_rows, save_int8


def test_quantize_rows_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 17, generator=gen) * torch.logspace(-9, 2, 1000)[:, None]
    table[5] = 0.0  # an all-zero row
    table[6] = 0.25  # a constant row
    codes, scale = quantize_rows(table)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert codes.shape == table.shape and scale.shape == (1000,)
    step = scale.float()[:, None]
    back = codes.float() * step
    # within half a step of the stored (float16) scale, which is never below the row's largest magnitude / 127
    assert torch.all((back - table).abs() <= step / 2 * (1 + 1e-6))
    assert torch.all(step[:, 0] >= table.abs().amax(1) / 127)
    assert torch.all(step[:, 0] <= table.abs().amax(1) / 127 * (1 + 2 ** -10) + 2 ** -24)  # one float16 step up
    assert torch.equal(back[5], table[5]) and scale[5] == 0 and torch.all(codes[5] == 0)
    assert torch.all(codes[6] == 127) and torch.allclose(back[6], table[6], rtol=2 ** -10, atol=0)
    assert torch.all(codes.abs().amax(1)[scale.float() > 2 ** -14] >= 126)  # each normal row spans its range
    ratio = (codes.numel() + 2 * 1000) / (table.numel() * 4)
    assert ratio == pytest.approx((17 + 2) / (17 * 4)) and ratio <= 0.3


def _mapped_from(tensor: torch.Tensor, name: str) -> bool:
    """Whether the tensor's memory is a mapping of a file called ``name`` (Linux /proc)."""
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(name):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def _test_frame() -> pl.DataFrame:
    return pl.read_csv(models.CRITEO / "data" / "test.tsv", separator="\t", has_header=False,
                       new_columns=CRITEO_COLUMNS, infer_schema_length=0)


def test_int8_serving_is_close_and_the_directory_can_hold_the_table(tmp_path):
    from deepfm.serve.state import ServedModel

    model_dir = shutil.copytree(models.criteo_model(), tmp_path / "m")
    df = _test_frame()
    labels = df["label"].cast(pl.Float64).to_numpy()
    fp32 = ServedModel.load(model_dir).predictor.predict_proba(df.drop("label"))
    at_load = ServedModel.load(model_dir, quantize="int8")
    int8 = at_load.predictor.predict_proba(df.drop("label"))
    assert at_load.version.endswith("-int8") and at_load.quantize == "int8"
    assert np.abs(int8 - fp32).max() < 5e-3
    assert abs(summarize(labels, int8)["auc"] - summarize(labels, fp32)["auc"]) <= 5e-4
    # the directory holds the table: loading maps its codes (shared by workers), same numbers
    out = save_int8(load_model(model_dir))
    assert out == model_dir / INT8_FILE
    stored = ServedModel.load(model_dir, quantize="int8")
    table = stored.predictor.runtime.model.table
    assert _mapped_from(table.codes, INT8_FILE)
    assert np.array_equal(stored.predictor.predict_proba(df.drop("label")), int8)
    assert stored.loaded.model.embedding.weight.numel() == 0  # no float32 table held
    # a retrained model.safetensors makes the stored table stale: quantized again at load
    (model_dir / "model.safetensors").touch()
    again = ServedModel.load(model_dir, quantize="int8")
    assert not _mapped_from(again.predictor.runtime.model.table.codes, INT8_FILE)
    assert np.array_equal(again.predictor.predict_proba(df.drop("label")), int8)


def test_a_file_of_the_earlier_layout_is_never_read_as_this_one(tmp_path):
    """The first int8 files (uint8 codes, float32 scale and bias, no layout in the metadata) made from the
    current weights: recognised, and the table quantized at load instead."""
    from safetensors.torch import save_file

    from deepfm.quantize import _fingerprint, stored_int8
    from deepfm.serve.state import ServedModel

    model_dir = shutil.copytree(models.criteo_model(), tmp_path / "m")
    loaded = load_model(model_dir)
    rows = loaded.model.embedding.weight.shape[0]
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items() if k != "embedding.weight"}
    state.update({"embedding.codes": torch.zeros(loaded.model.embedding.weight.shape, dtype=torch.uint8),
                  "embedding.scale": torch.ones(rows), "embedding.bias": torch.zeros(rows)})
    save_file(state, str(model_dir / INT8_FILE),
              metadata={"format": "deepfm-model-int8", "source": _fingerprint(model_dir / "model.safetensors")})
    table, why = stored_int8(model_dir)
    assert table is None and "another layout" in why
    df = _test_frame()
    fresh = ServedModel.load(tmp_path.joinpath("m"), quantize="int8")
    assert not _mapped_from(fresh.predictor.runtime.model.table.codes, INT8_FILE)
    shutil.rmtree(model_dir / "export", ignore_errors=True)
    (model_dir / INT8_FILE).unlink()
    at_load = ServedModel.load(model_dir, quantize="int8").predictor.predict_proba(df.drop("label"))
    assert np.array_equal(fresh.predictor.predict_proba(df.drop("label")), at_load)


def test_serve_and_export_flags(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deepfm.serve.app import ServeSettings, create_app

    model_dir = shutil.copytree(models.criteo_model(), tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "deepfm", "export", str(model_dir), "--quantize", "int8"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (model_dir / INT8_FILE).is_file() and "int8" in done.stdout
    # the ONNX graph holds the int8 table and scores as the int8 server does
    ort = pytest.importorskip("onnxruntime")
    from deepfm.data.batch import input_from_chunk
    from deepfm.data.readers import RawChunk
    from deepfm.serve.state import ServedModel

    assert json.loads((model_dir / "export" / "export.json").read_text())["quantize"] == "int8"
    served = ServedModel.load(model_dir, quantize="int8")
    df = _test_frame()
    enc = served.loaded.encoder.transform(RawChunk("<t>", df, np.arange(1, df.height + 1), 0), labels=False)
    cat, num = (t.numpy() for t in input_from_chunk(enc).tensors()[:2])
    session = ort.InferenceSession(str(model_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probabilities"], {"cat_ids": cat, "num_values": num})[0]
    assert np.abs(onnx_probs - served.predictor.predict_proba(df.drop("label"))).max() < 1e-6
    client = TestClient(create_app(model_dir, ServeSettings(quantize="int8")))
    info = client.get("/v1/model").json()
    assert info["quantize"] == "int8" and info["version"].endswith("-int8")
    row = {"rows": [{"id": 1, "features": {"I1": 3, "C1": "68fd1e64"}}]}
    assert client.post("/v1/predict", json=row).status_code == 200
    refused = client.post("/v1/predict", json={**row, "explain": True})
    assert refused.status_code == 422 and "float32 table" in refused.json()["detail"]
