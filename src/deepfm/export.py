"""``deepfm export``: a trained model as ONNX or TorchScript over *encoded* inputs, for serving elsewhere.

The exported graph takes what ``Encoder.transform`` + ``input_from_chunk`` produce (see docs/serving.md):

    cat_ids        int64   [B, Fc]   local vocabulary ids of the categorical (and log-bucketed) fields
    num_values     float32 [B, Fn]   scaled numeric fields, NaN = missing
    multi_ids      int64   [nnz]     local ids of the tags of multi-valued fields   (only if the model has any)
    multi_weights  float32 [nnz]     their weights                                  (only if the model has any)
    multi_bags     int64   [nnz]     field_index * B + row, sorted ascending        (only if the model has any)

and returns ``logits`` float32 [B] and ``probabilities`` float32 [B]; the batch ``B`` and ``nnz`` are dynamic.
A model trained with negative downsampling (``data.negative_sampling_rate`` w) has the correction log(w) in its
graph: both outputs are calibrated, as ``deepfm predict`` and ``deepfm serve`` return them.
``encoder.json``, ``layout.json``, ``config.yaml`` are copied beside the file and ``export.json`` lists
the inputs, the field order along each axis and the vocabulary of each field.

The graph is ``DeepFM.forward`` itself (written with exportable ops: ``scatter_add`` with expanded indices,
``expand`` rather than ``repeat_interleave`` by the batch size); ``tests/test_export.py`` checks onnxruntime
and TorchScript against the PyTorch model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from deepfm.artifact import LoadedModel, load_model
from deepfm.errors import DeepFMError
from deepfm.io import atomic_path, atomic_write_text
from deepfm.model import DeepFM

FORMATS = ("onnx", "torchscript")
SIDE_FILES = ("encoder.json", "layout.json", "config.yaml", "deepfm.json")
OPSET = 17


class ExportError(DeepFMError):
    """The model could not be exported."""


class ExportableDeepFM(nn.Module):
    """``DeepFM.forward`` with the probabilities as a second output; optional multi-valued inputs."""

    def __init__(self, model: nn.Module, has_multi: bool | None = None) -> None:
        super().__init__()
        self.model = model  # a DeepFM, or one with an int8 table (deepfm.quantize.QuantizedDeepFM)
        self.has_multi = model.embedding.num_multi > 0 if has_multi is None else has_multi

    def forward(self, cat_ids: torch.Tensor, num_values: torch.Tensor, multi_ids: torch.Tensor | None = None,
                multi_weights: torch.Tensor | None = None, multi_bags: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if multi_ids is None or multi_weights is None or multi_bags is None:
            multi_ids = multi_bags = torch.zeros(0, dtype=torch.long, device=cat_ids.device)
            multi_weights = torch.zeros(0, dtype=num_values.dtype, device=num_values.device)
        logit = self.model(cat_ids, num_values, multi_ids, multi_weights, multi_bags)
        return logit, torch.sigmoid(logit)


def input_names(loaded: LoadedModel) -> list[str]:
    names = ["cat_ids", "num_values"]
    if loaded.layout.multi_fields:
        names += ["multi_ids", "multi_weights", "multi_bags"]
    return names


def example_inputs(loaded: LoadedModel, batch: int = 5, tags_per_bag: int = 2) -> tuple[torch.Tensor, ...]:
    """A small valid batch to trace with (every id 1 or 0, one missing numeric value)."""
    lay = loaded.layout
    cat = torch.ones(batch, len(lay.cat_fields), dtype=torch.long)
    num = torch.full((batch, len(lay.num_fields)), 0.5, dtype=torch.float32)
    if num.numel():
        num[0, 0] = float("nan")
    out: tuple[torch.Tensor, ...] = (cat, num)
    m = len(lay.multi_fields)
    if m:
        bags = torch.arange(m * batch, dtype=torch.long).repeat_interleave(tags_per_bag)
        out += (torch.ones(len(bags), dtype=torch.long), torch.full((len(bags),), 0.5), bags)
    return out


def default_output(model_dir: Path, fmt: str) -> Path:
    return Path(model_dir) / "export" / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")


def manifest(loaded: LoadedModel, fmt: str, file_name: str) -> dict:
    lay = loaded.layout
    fields = {f["name"]: f for f in loaded.encoder.describe()}
    inputs = [{"name": "cat_ids", "dtype": "int64", "shape": ["batch", len(lay.cat_fields)]},
              {"name": "num_values", "dtype": "float32", "shape": ["batch", len(lay.num_fields)]}]
    if lay.multi_fields:
        inputs += [{"name": "multi_ids", "dtype": "int64", "shape": ["nnz"]},
                   {"name": "multi_weights", "dtype": "float32", "shape": ["nnz"]},
                   {"name": "multi_bags", "dtype": "int64", "shape": ["nnz"]}]
    return {
        "format": fmt, "file": file_name, "opset": OPSET if fmt == "onnx" else None,
        "inputs": inputs,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch"]},
                    {"name": "probabilities", "dtype": "float32", "shape": ["batch"]}],
        # the fields of each input, in its column order, as their codecs describe them
        "cat_fields": [fields[n] for n in lay.cat_fields],
        "num_fields": [fields[n] for n in lay.num_fields],
        "multi_fields": [fields[n] for n in lay.multi_fields],
        # already in the graph's outputs (DeepFM.forward): log(data.negative_sampling_rate), 0 without sampling
        "logit_shift": loaded.model.logit_shift,
        "encoding": "see docs/serving.md; encoder.json holds the vocabularies (id = index in tokens + 1, "
                    "0 = unseen) and numeric statistics",
    }


def export_model(model_dir: str | Path, fmt: str = "onnx", output: str | Path | None = None,
                 quantize: str | None = None) -> Path:
    """Export ``model_dir`` to ``output`` (default ``MODEL_DIR/export/model.onnx`` or ``.torchscript.pt``);
    ``quantize="int8"``: the graph holds the row-wise int8 table (``deepfm.quantize``) and dequantizes the rows
    it looks up."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    loaded = load_model(Path(model_dir), shared_table=quantize == "int8")
    out = Path(output) if output is not None else default_output(Path(model_dir), fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    model: nn.Module = loaded.model
    has_multi = loaded.model.embedding.num_multi > 0
    if quantize == "int8":
        from deepfm.quantize import int8_model

        model = int8_model(loaded)[0]
    wrapper = ExportableDeepFM(model, has_multi).eval()
    args = example_inputs(loaded)
    names = input_names(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            try:
                import onnx  # noqa: F401  (the exporter needs it)
            except ImportError:
                raise ExportError("ONNX export needs the 'onnx' package: pip install 'deepfm[export]'") from None
            dynamic = {"cat_ids": {0: "batch"}, "num_values": {0: "batch"}, "logits": {0: "batch"},
                       "probabilities": {0: "batch"}}
            for n in names[2:]:
                dynamic[n] = {0: "nnz"}
            with atomic_path(out) as tmp:
                torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=names,
                                  output_names=["logits", "probabilities"], dynamic_axes=dynamic)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, args, check_trace=False)
            with atomic_path(out) as tmp:
                torch.jit.save(traced, str(tmp))
    for name in SIDE_FILES:
        src = Path(model_dir) / name
        if src.is_file() and src.resolve() != (out.parent / name).resolve():
            with atomic_path(out.parent / name) as tmp:
                shutil.copyfile(src, tmp)
    info = dict(manifest(loaded, fmt, out.name), quantize=quantize)
    atomic_write_text(out.parent / "export.json", json.dumps(info, indent=1))
    return out
