"""Atomic writes and pickle-free tensor state.

Model weights and optimiser state are stored as safetensors (loading never unpickles) plus JSON for the
non-tensor parts. Every file and folder is written under a temporary name and renamed into place, so a
crash leaves either the old version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
                        ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmp)`` and swap it in for ``final`` (an existing one is replaced)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        fill(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def state_to_tensors(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state (dicts, lists) by a reference, collecting the tensors."""
    if isinstance(state, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = state
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {str(k): state_to_tensors(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [state_to_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def state_from_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: state_from_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_from_tensors(v, tensors) for v in obj]
    return obj


def optimizer_state_from_json(state: dict) -> dict:
    """Optimiser ``state`` keys are parameter indices: JSON made them strings."""
    out = dict(state)
    out["state"] = {int(k): v for k, v in state["state"].items()}
    for group in out["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return out


def save_state(path: Path, state: dict[str, Any]) -> None:
    """A nested state with tensors -> ``path.safetensors`` + ``path.json``, both atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = state_to_tensors(state, "s", tensors)
    atomic_save_tensors(tensors, path.with_suffix(".safetensors"))
    atomic_write_text(path.with_suffix(".json"), json.dumps(skeleton))


def load_state(path: Path) -> dict[str, Any]:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return state_from_tensors(json.loads(path.with_suffix(".json").read_text()), tensors)
