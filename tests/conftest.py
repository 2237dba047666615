from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT / "examples" / "criteo"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def criteo_dir() -> Path:
    return CRITEO / "data"


def logged_epochs(model_dir: Path) -> list[tuple[int, float, float]]:
    """Each epoch's logged training log loss and validation AUC (``metrics.jsonl`` of a model directory): what a
    resumed run must log as an uninterrupted one did."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_logloss"], r["valid_auc"]) for r in records]


def as_written_before_rank_parts(last: Path) -> None:
    """Rewrite a replicated checkpoint's optimiser state as it was before checkpoints kept each rank's own part
    (RNG state and running loss): rank 0's RNG state at the top, the running loss in state.json alone."""
    skeleton_file = last / "optimizers.json"
    skeleton = json.loads(skeleton_file.read_text())
    own = skeleton.pop("ranks")["0"]  # rank 0 wrote it
    del skeleton["world_size"]
    skeleton["rng"] = own["rng"]
    skeleton_file.write_text(json.dumps(skeleton))


def criteo_config_dict(tmp_path: Path, **train) -> dict:
    """The example's Criteo config as a dict, with a private cache and small, fast settings."""
    import yaml

    raw = yaml.safe_load((CRITEO / "config.yaml").read_text())
    for key in ("train", "valid", "test"):
        raw["data"][key] = str(CRITEO / raw["data"][key])
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    raw["train"].update({"progress": False, **train})
    return raw


@pytest.fixture
def write_text(tmp_path: Path):
    def write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write
