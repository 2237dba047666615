"""Where and how a model runs: device, precision (bf16 autocast where it pays), and batched inference.

One place for the trainer's evaluation, ``Predictor`` (predict, evaluate, the server's batch path) and the
server's per-record path, so that all of them score a row the same way: logits in float32 from the model,
probabilities by a float64 sigmoid on the host. The model's ``forward`` includes the negative downsampling
correction (``DeepFM.logit_shift``), so every one of them returns calibrated probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepfm.data.batch import ModelInput


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 and on CPUs with AMX or AVX512-BF16; elsewhere it is slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(cpu is not None and (getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                                         or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()))
    return False


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return spec


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for x < -88 (float32): 1 / inf is the right answer, 0, so the warning is noise
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[ModelInput], device: torch.device,
                   precision: str) -> np.ndarray:
    """Logits of every batch, concatenated (float64 numpy)."""
    model.eval()
    out = []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with autocast(device, precision):
            out.append(model(*batch.tensors()).float())
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


@dataclass
class Runtime:
    """A model placed on a device with a precision; ``probabilities`` scores a ``ModelInput`` of any size in
    batches of ``batch_size`` rows."""

    model: nn.Module
    device: torch.device
    precision: str
    batch_size: int = 16384

    @classmethod
    def place(cls, model: nn.Module, device: str = "auto", precision: str = "fp32",
              batch_size: int = 16384) -> Runtime:
        dev = resolve_device(device)
        model.to(dev).eval()
        return cls(model, dev, resolve_precision(precision, dev), batch_size)

    def logits(self, inp: ModelInput) -> np.ndarray:
        """Logits (float64 ``[N]``) of every row of ``inp``."""
        n = len(inp)
        parts = (inp.slice(lo, min(lo + self.batch_size, n)) for lo in range(0, n, self.batch_size))
        return predict_logits(self.model, parts, self.device, self.precision)

    def probabilities(self, inp: ModelInput) -> np.ndarray:
        """Click probabilities (float64 ``[N]``)."""
        return sigmoid(self.logits(inp))
