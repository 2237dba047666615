"""The model directory: everything needed to predict, described in plain files, written atomically.

    deepfm.json        format name and version, package versions, creation time, data fingerprint
    config.yaml        the resolved config the model was trained with
    layout.json        where each field lives in the embedding table
    encoder.json       fitted vocabularies and numeric statistics (the encoder's whole state)
    model.safetensors  weights (loading never unpickles)
    metrics.json       final validation / test metrics;  metrics.jsonl  one line per epoch
    optimizer.safetensors + optimizer.json   the optimisers' state (train.save_optimizer_state), so that
                       ``deepfm train --init-from`` continues with it; deepfm.json then records the lineage
    plots/             history.png, roc.png, calibration.png
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from deepfm.config import Config, config_from_dict, config_to_dict
from deepfm.data.encoder import Encoder
from deepfm.errors import ArtifactError, ConfigError
from deepfm.io import (StreamedTensor, atomic_directory, atomic_save_tensors, leftover_siblings, load_state,
                       optimizer_state_from_json, save_state)
from deepfm.layout import TableLayout
from deepfm.model import TABLE_KEY, DeepFM
from deepfm.model.embedding import replace_embedding_table
from deepfm.tensorfile import check_tensors, read_header

FORMAT = "deepfm-model"
FORMAT_VERSION = 1
REQUIRED = ("deepfm.json", "config.yaml", "layout.json", "encoder.json", "model.safetensors")


def package_versions() -> dict[str, str]:
    import numpy
    import polars
    import pyarrow

    import deepfm

    return {"deepfm": deepfm.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "polars": polars.__version__, "pyarrow": pyarrow.__version__, "python": platform.python_version()}


@dataclass
class LoadedModel:
    path: Path
    config: Config
    layout: TableLayout
    encoder: Encoder
    model: DeepFM
    info: dict[str, Any]
    metrics: dict[str, Any]

    def optimizer_state(self) -> list[dict[str, Any]] | None:
        """The optimisers' saved state (None when the model was written without it)."""
        if not (self.path / "optimizer.safetensors").is_file():
            return None
        try:
            return [optimizer_state_from_json(s) for s in load_state(self.path / "optimizer")["optimizers"]]
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise ArtifactError(f"{self.path / 'optimizer.safetensors'}: unreadable optimiser state ({err}); "
                                "train with --reset-optimizer to start it afresh") from None


WRITTEN = REQUIRED + ("metrics.json", "metrics.jsonl", "plots", "optimizer.safetensors", "optimizer.json")


def save_model(path: Path, *, config: Config, layout: TableLayout, encoder: Encoder, model: DeepFM,
               metrics: dict[str, Any], history: list[dict[str, Any]], fingerprint: str | None = None,
               extra_files: dict[str, Path] | None = None, optimizers: list[torch.optim.Optimizer] | None = None,
               lineage: dict[str, Any] | None = None, table_blocks: Iterable[torch.Tensor] | None = None,
               optimizer_streams: list[StreamedTensor] | None = None) -> list[str]:
    """Write the model directory atomically: a reader sees the old directory or the complete new one.

    Entries of an existing directory that deepfm does not write itself (``export/`` from ``deepfm export``,
    files a user put there) are carried into the new directory (hard links where possible), so re-training
    never deletes them; their names are returned so the caller can say that they were made from the previous
    model.

    ``table_blocks``: the embedding table's rows in order, block by block, when ``model`` holds only a shard of
    it (row sharding): the table is streamed into ``model.safetensors`` and never held whole here; likewise
    ``optimizer_streams``, the table's optimiser state (``deepfm.train.sharding.optimizer_streams``).
    """
    path = Path(path)
    kept = sorted(p.name for p in path.iterdir() if p.name not in WRITTEN) if path.is_dir() else []

    def fill(tmp: Path) -> None:
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": package_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_fingerprint": fingerprint}
        if lineage is not None:
            info["lineage"] = lineage
        (tmp / "deepfm.json").write_text(json.dumps(info, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        (tmp / "layout.json").write_text(json.dumps(layout.to_json(), indent=1))
        (tmp / "encoder.json").write_text(json.dumps(encoder.to_json()))
        state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in
                 model.state_dict().items()}
        streamed = None
        if table_blocks is not None:
            del state[TABLE_KEY]
            streamed = StreamedTensor(TABLE_KEY, (layout.num_rows, model.cfg.embed_dim + 1), torch.float32,
                                      (b.float() for b in table_blocks))
        atomic_save_tensors(state, tmp / "model.safetensors", metadata={"format": FORMAT}, streamed=streamed)
        if optimizers is not None:
            save_state(tmp / "optimizer", {"optimizers": [o.state_dict() for o in optimizers]}, optimizer_streams)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(src).read_bytes())
        for name in kept:
            copy_entry(path / name, tmp / name)

    atomic_directory(path, fill)
    return kept


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_entry(src: Path, dst: Path) -> None:
    """A file or folder tree, hard-linked where the filesystem allows (the old directory is deleted after the
    swap, so the links cost no space), else copied."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _read_json(path: Path, parse: Callable[[Any], Any] | None = None) -> Any:
    """A JSON file of the model directory, parsed by ``parse``; a truncated or wrong file is an ArtifactError."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: unreadable, not valid JSON ({err}); the model directory is damaged: "
                            "retrain or restore it") from None
    try:
        return raw if parse is None else parse(raw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ArtifactError(f"{path}: not a valid {path.name} ({type(err).__name__}: {what}); the model directory "
                            "is damaged: retrain or restore it") from None


def read_info(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        # only where the swap takes two renames (no renameat2) and a kill fell between them: the previous
        # model, complete, was renamed aside to .NAME.old-*
        aside = [p for p in leftover_siblings(path) if ".old-" in p.name and all((p / f).is_file() for f in REQUIRED)]
        if aside:
            raise ArtifactError(f"{path}: model directory not found, but a write of it was interrupted; the "
                                f"previous model {aside[-1]} is beside it: rename it to {path.name}")
        raise ArtifactError(f"{path}: model directory not found (train one with `deepfm train CONFIG.yaml`)")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"{path}: not a complete deepfm model directory, missing {missing}")
    info = _read_json(path / "deepfm.json")
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != FORMAT:
        raise ArtifactError(f"{path}: not a deepfm model (format {fmt!r})")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        made_by = info.get("versions", {}).get("deepfm", "?")
        raise ArtifactError(
            f"{path}: model format version {version} (written by deepfm {made_by}) is not readable by this "
            f"deepfm, which reads format {FORMAT_VERSION}. Install deepfm {made_by} to use it, or retrain.")
    return info


def mapped_tensor(path: Path, key: str) -> torch.Tensor | None:
    """One float32, float16, int8 or uint8 tensor of a safetensors file as a memory map of the file, not a copy:
    every process that maps it shares the same page-cache pages. The mapping is private (copy-on-write):
    nothing writes it, and a write could never reach the file. None for a tensor of another dtype. The header
    is checked first (``deepfm.tensorfile``): a damaged file is an ``ArtifactError``, never a huge read."""
    import numpy as np

    entries, _ = read_header(path)
    if key not in entries:
        raise ArtifactError(f"{path}: holds no tensor {key!r}; the model directory is damaged: retrain or restore it")
    entry = entries[key]
    dtype = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}.get(entry.dtype)
    if dtype is None:
        return None
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=entry.start, shape=entry.shape))


def mapped_table(weights: Path) -> torch.Tensor:
    """The embedding table of ``model.safetensors``, memory-mapped (``mapped_tensor``) when it is float32, so
    that N server workers hold one table between them."""
    from safetensors import safe_open

    table = mapped_tensor(weights, TABLE_KEY)
    if table is None:  # not a float32 table: an ordinary copy
        with safe_open(str(weights), framework="pt") as f:
            return f.get_tensor(TABLE_KEY)
    return table


def _shared_weights(model: DeepFM, weights: Path) -> dict[str, torch.Tensor]:
    """Put the memory-mapped table into ``model`` (freeing the one its constructor made) and return the
    other weights, read as usual."""
    from safetensors import safe_open

    replace_embedding_table(model, mapped_table(weights))
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != TABLE_KEY}
    return state  # without the table: loading it would write every page of the map (copy_ onto itself)


def load_model(path: Path, device: str | torch.device = "cpu", shared_table: bool = False) -> LoadedModel:
    """Load a model directory (no pickle anywhere) for prediction, in eval mode. ``shared_table`` (CPU only):
    the embedding table is a read-only memory map of ``model.safetensors`` shared by every process that loads
    it that way (``deepfm serve --workers N``), not a copy of its own."""
    path = Path(path)
    info = read_info(path)
    try:
        config = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()), str(path / "config.yaml"))
    except ConfigError as err:
        raise ArtifactError(f"{path}: its config.yaml does not validate with this deepfm:\n{err}") from None
    except yaml.YAMLError as err:
        raise ArtifactError(f"{path / 'config.yaml'}: unreadable YAML ({err}); the model directory is damaged: "
                            "retrain or restore it") from None
    layout = _read_json(path / "layout.json", TableLayout.from_json)
    encoder = _read_json(path / "encoder.json", lambda d: Encoder.from_json(config.fields, config.data, d))
    try:
        model = DeepFM(layout, config.model, sparse=False, logit_shift=config.data.logit_shift)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ArtifactError(f"{path / 'layout.json'}: does not describe a model this config can build ({err})"
                            ) from None
    weights = path / "model.safetensors"
    entries, _ = read_header(weights)  # a damaged file is one clear line, before anything is allocated from it
    check_tensors(weights, entries, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        if shared_table and torch.device(device).type == "cpu":
            state = _shared_weights(model, path / "model.safetensors")
        else:
            state = load_file(str(path / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{path / 'model.safetensors'}: unreadable weights ({err})") from None
    try:
        result = model.load_state_dict(state, strict=TABLE_KEY in state)
        if result.missing_keys not in ([], [TABLE_KEY]) or result.unexpected_keys:
            raise RuntimeError(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not match its layout/config ({err})") from None
    model.to(device).eval()
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return LoadedModel(path, config, layout, encoder, model, info, metrics)
