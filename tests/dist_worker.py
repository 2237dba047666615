"""Run under torchrun by test_distributed.py: train a config, optionally failing or stopping on a rank, each rank
optionally in folders of its own (``per_rank``: as if on machines that share no filesystem)."""

from __future__ import annotations

import json
import os
import sys

from deepfm.config import config_from_dict
from deepfm.pipeline import train


class Stop(Exception):
    pass


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))

    def hook(trainer, state):
        if spec.get("fail_rank") == rank and state.step == spec.get("fail_step"):
            raise RuntimeError(f"injected failure on rank {rank} at step {state.step}")
        if spec.get("stop_step") == state.step:
            raise Stop
        if spec.get("table_bytes") and state.step == 1:  # after the first update: the optimiser state exists
            from deepfm.train.memory import table_state_bytes

            size = table_state_bytes(trainer.model, trainer.optimizers)
            with open(f"{spec['table_bytes']}.{rank}", "w") as fh:
                fh.write(str(size))

    # a rank of its own "machine": its own output (checkpoint) and cache folders, no path shared with the others
    own = spec.get("per_rank", {}).get(str(rank), {})
    config = spec["config"]
    if "cache_dir" in own:
        config = {**config, "data": {**config["data"], "cache_dir": own["cache_dir"]}}
    try:
        train(config_from_dict(config), own.get("output", spec["output"]), resume=spec.get("resume", False),
              log=lambda m: print(m, flush=True), callbacks=[hook], init_from=spec.get("init_from"))
    except Stop:
        sys.exit(3)


if __name__ == "__main__":
    main()
