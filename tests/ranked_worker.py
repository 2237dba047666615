"""Run under torchrun by test_ranked.py: prepare a config on every rank and dump what this rank holds."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from deepfm.config import config_from_dict
from deepfm.data.ranked import prepare_for_ranks
from deepfm.train import distributed as ddp


def main() -> None:
    spec = json.loads(sys.argv[1])
    dist = ddp.from_env()
    ddp.init(dist, ddp.device_for(dist, "cpu"), 60)
    try:
        parent = None
        if spec.get("parent"):  # training further: vocabularies grown from the parent's
            from deepfm.artifact import load_model

            parent = load_model(spec["parent"]).encoder
        data = prepare_for_ranks(config_from_dict(spec["config"]), dist, progress=False, log=lambda _m: None,
                                 parent=parent)
        out = spec["dump"] + f".{dist.rank}.npz"
        arrays = {}
        for name, split in data.splits.items():
            arrays[f"{name}_labels"] = np.asarray(split.labels)
            arrays[f"{name}_cat_ids"] = np.asarray(split.cat_ids)
            arrays[f"{name}_num_values"] = np.asarray(split.num_values)
        np.savez(out, **arrays)
        with open(spec["dump"] + f".{dist.rank}.json", "w") as fh:
            json.dump({"encoder": data.encoder.to_json(), "manifest": data.manifest}, fh, sort_keys=True)
        dist.barrier()
    finally:
        ddp.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
