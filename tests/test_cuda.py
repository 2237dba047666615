"""On a CUDA device: training, checkpoint resume, save/load and prediction agree with the CPU.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepfm.config import config_from_dict
from deepfm.metrics import auc
from deepfm.pipeline import train
from deepfm.predict import Predictor

from conftest import CRITEO, criteo_config_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = {"log": lambda _m: None}
TEST = str(CRITEO / "data" / "test.tsv")


def _raw(tmp_path, device: str, model_over: dict | None = None, **train_over):
    model_over = model_over or {}
    raw = criteo_config_dict(tmp_path / device, **{"epochs": 2, "batch_size": 256, "device": device,
                                                   "precision": "fp32", "seed": 3, **train_over})
    raw["model"].update(hidden_units=[64, 32], **model_over)
    return raw


def _score(model_dir, device: str) -> tuple[np.ndarray, np.ndarray]:
    pred = Predictor(model_dir, device=device)
    scored = list(pred.score_chunks(TEST, need_labels=True, progress=False))
    return np.concatenate([s.labels for s in scored]), np.concatenate([s.probs for s in scored])


def test_cuda_training_matches_cpu_and_the_artifact_moves_between_devices(tmp_path):
    # no dropout: the CPU and the GPU draw masks from different generators
    cpu = train(config_from_dict(_raw(tmp_path, "cpu", {"dropout": 0.0})), tmp_path / "m-cpu", **QUIET)
    gpu = train(config_from_dict(_raw(tmp_path, "cuda", {"dropout": 0.0})), tmp_path / "m-cuda", **QUIET)
    assert gpu.trainer.device.type == "cuda"
    y, p_cpu = _score(cpu.model_dir, "cpu")
    _, p_gpu = _score(gpu.model_dir, "cuda")
    # same init, same batches, no dropout: only the order of float reductions differs
    assert np.abs(p_cpu - p_gpu).max() < 5e-3
    assert abs(auc(y, p_cpu) - auc(y, p_gpu)) < 5e-3
    # the CUDA-trained artifact scores the same on the CPU, and the CPU-trained one on the GPU
    _, p_gpu_on_cpu = _score(gpu.model_dir, "cpu")
    _, p_cpu_on_gpu = _score(cpu.model_dir, "cuda")
    np.testing.assert_allclose(p_gpu_on_cpu, p_gpu, atol=1e-5)
    np.testing.assert_allclose(p_cpu_on_gpu, p_cpu, atol=1e-5)


def test_cuda_bf16_autocast_learns(tmp_path):
    res = train(config_from_dict(_raw(tmp_path, "cuda", precision="auto", epochs=3)), tmp_path / "m", **QUIET)
    assert res.trainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    y, p = _score(res.model_dir, "cuda")
    assert auc(y, p) > 0.62


def test_cuda_resume_after_a_kill_gives_the_same_model(tmp_path):
    # with dropout: the checkpoint carries the GPU's generator state too
    raw = _raw(tmp_path, "cuda", {"dropout": 0.2}, checkpoint_every_steps=3)
    full = train(config_from_dict(raw), tmp_path / "full", **QUIET)

    class Kill(Exception):
        pass

    def kill_at_5(_trainer, state):
        if state.step == 5:
            raise Kill

    with pytest.raises(Kill):
        train(config_from_dict(raw), tmp_path / "resumed", callbacks=[kill_at_5], **QUIET)
    resumed = train(config_from_dict(raw), tmp_path / "resumed", resume=True, **QUIET)
    wa = load_file(str(full.model_dir / "model.safetensors"))
    wb = load_file(str(resumed.model_dir / "model.safetensors"))
    # scatter_add on CUDA uses atomics, so bit-identity is not promised: agreement to float noise is
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
