"""The whole training job, as the CLI and the Python API run it:

config -> prepare (or reuse) data -> build DeepFM -> Trainer.fit -> evaluate valid/test -> plots ->
model directory (atomic).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfm.artifact import LoadedModel, load_model, save_model
from deepfm.config import Config, auto_batch_size
from deepfm.errors import ConfigError
from deepfm.data.store import PreparedData, prepare
from deepfm.model import DeepFM
from deepfm.plots import plot_calibration, plot_history, plot_roc
from deepfm.train import distributed as ddp
from deepfm.data.vocab import growth
from deepfm.train import sharding
from deepfm.train.trainer import Trainer
from deepfm.train.warm import carry_optimizer_state, check_compatible, table_source, warm_start


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    data: PreparedData
    trainer: Trainer


GENERIC_CONFIG_NAMES = ("config", "deepfm", "train", "best")


def default_output(config_path: str | Path | None) -> Path:
    """``runs/<name>``: the config file's name, or its folder's when the file has a generic name
    (``examples/criteo/config.yaml`` -> ``runs/criteo``, ``ctr-small.yaml`` -> ``runs/ctr-small``)."""
    if not config_path:
        return Path("runs") / "model"
    path = Path(config_path).resolve()
    name = path.stem
    if name.lower() in GENERIC_CONFIG_NAMES and path.parent.name:
        name = path.parent.name
    return Path("runs") / name


def run_dir_for(output: Path) -> Path:
    """Checkpoints of a training run in progress, next to the model directory they will become."""
    return output.parent / f".{output.name}.run"


def build_model(cfg: Config, data: PreparedData, dist: ddp.DistContext = ddp.SINGLE) -> DeepFM:
    """The initial model; under row sharding (several ranks) with only this rank's rows of the table."""
    torch.manual_seed(cfg.train.seed)
    rows = ddp.shard_bounds(data.layout.num_rows, dist) if row_sharded(cfg, dist) else None
    return DeepFM(data.layout, cfg.model, sparse=cfg.train.sparse, logit_shift=cfg.data.logit_shift,
                  table_rows=rows)


def row_sharded(cfg: Config, dist: ddp.DistContext) -> bool:
    return dist.enabled and cfg.train.embedding_sharding == "row"


def train(cfg: Config, output: Path, *, resume: bool = False, log=print, callbacks=None,
          init_from: str | Path | None = None, reset_optimizer: bool = False) -> TrainResult | None:
    """Run the whole job. Under ``torchrun`` every rank calls this; rank 0 returns the result, others None.
    ``init_from``: a model directory to train further on this config's data (``deepfm.train.warm``)."""
    dist = ddp.from_env()
    if init_from is not None and row_sharded(cfg, dist):
        raise ConfigError(f"--init-from {init_from}: training further with train.embedding_sharding: row is "
                          "not supported yet (it would load the whole parent table on every rank); train further "
                          "with embedding_sharding: replicated")
    if dist.enabled:
        ddp.init(dist, ddp.device_for(dist, cfg.train.device), cfg.train.dist_timeout_s)
    try:
        parent = None
        if init_from is not None:
            parent = load_model(Path(init_from))
            check_compatible(parent.config, cfg)
        result = _train(cfg, Path(output), resume=resume, log=log if dist.is_main else (lambda _m: None),
                        callbacks=callbacks, dist=dist, parent=parent, reset_optimizer=reset_optimizer)
        # leave together: a rank that tears down its process group while rank 0 is still writing the model
        # directory can abort ("terminate called without an active exception") and fail the whole job
        dist.barrier()
        return result
    finally:
        if dist.enabled:
            ddp.shutdown()


def _train(cfg: Config, output: Path, *, resume: bool, log, callbacks, dist: ddp.DistContext,
           parent: LoadedModel | None = None, reset_optimizer: bool = False) -> TrainResult | None:
    grow_from = None if parent is None else parent.encoder
    if dist.is_main:
        data = prepare(cfg, progress=cfg.train.progress, log=log, parent=grow_from)
    dist.barrier()  # the others wait for rank 0's preparation, then map the same files
    if not dist.is_main:
        data = prepare(cfg, progress=False, log=lambda _m: None, parent=grow_from)
    splits = data.splits
    log(f"Data: {', '.join(f'{k} {len(v):,} rows' for k, v in splits.items())}; "
        f"embedding table {data.layout.num_rows:,} rows x {cfg.model.embed_dim + 1} "
        f"({len(data.layout.field_order)} fields)")
    n_train, batch = len(splits["train"]), cfg.train.batch_size
    suggested = auto_batch_size(n_train)
    if batch != "auto" and n_train < 20 * batch and suggested < batch:
        log(f"Note: {n_train:,} training rows make only {-(-n_train // batch)} step(s) per epoch at batch {batch}; "
            f"small data trains better with more steps: try --set train.batch_size={suggested} (or auto)")
    with sharding.explain_out_of_memory(cfg, data.layout.num_rows, dist):
        return _fit_and_save(cfg, data, output, resume=resume, log=log, callbacks=callbacks, dist=dist,
                             parent=parent, reset_optimizer=reset_optimizer)


def _fit_and_save(cfg: Config, data: PreparedData, output: Path, *, resume: bool, log, callbacks,
                  dist: ddp.DistContext, parent: LoadedModel | None, reset_optimizer: bool) -> TrainResult | None:
    splits = data.splits
    model = build_model(cfg, data, dist)
    run_dir = run_dir_for(output)
    if not resume and run_dir.exists() and dist.is_main:
        shutil.rmtree(run_dir)
    dist.barrier()
    lineage = None
    if parent is not None:
        source = table_source(parent.layout, data.layout, parent.encoder.fitted_state()[0],
                              data.encoder.fitted_state()[0])
        warm_start(model, parent.model.state_dict(), source)
        lineage = _lineage(parent, data)
    trainer = Trainer(model, cfg.train, run_dir, log=log, callbacks=callbacks, dist=dist)
    if parent is not None:
        saved = parent.optimizer_state()
        if saved is not None and not reset_optimizer:
            carry_optimizer_state(trainer.optimizers, saved, trainer.model.embedding.weight, source,
                                  parent.layout.num_rows)
        log(f"Training further from {parent.path} (generation {lineage['generation']}): " + ", ".join(
            f"{name} +{g['added']:,}" + (f" -{g['evicted']:,}" if g["evicted"] else "")
            for name, g in lineage["vocabularies"].items() if g["added"] or g["evicted"])
            + ("; optimiser state carried over" if saved is not None and not reset_optimizer
               else "; optimiser state afresh"))
    state = trainer.fit(splits["train"], splits.get("valid"), resume=resume)

    metrics: dict[str, dict[str, float]] = {}
    preds: dict[str, np.ndarray] = {}
    for name in ("valid", "test"):
        split = splits.get(name)
        if split is not None and len(split):
            preds[name] = trainer.predict(split)
            metrics[name] = trainer.evaluate(split, preds[name])
    metrics["train"] = {"best_epoch": state.best_epoch, "epochs_run": len(state.history), "steps": state.step,
                        "ranks": dist.world_size}
    # row sharding: the table and its optimiser state reach rank 0 block by block, as it writes them
    blocks, streams = None, None
    if row_sharded(cfg, dist):
        blocks = sharding.table_blocks(trainer.model.embedding, dist)
        if cfg.train.save_optimizer_state:
            streams = sharding.optimizer_streams(trainer.optimizers, trainer.model.embedding, dist)
    if not dist.is_main:
        for stream in [blocks or ()] + [st.blocks for st in streams or []]:
            for _ in stream:  # sends this rank's rows
                pass
        return None

    with tempfile.TemporaryDirectory() as tmp:
        plots: dict[str, Path] = {}
        if state.history:
            plot_history(state.history, Path(tmp) / "history.png")
            plots["plots/history.png"] = Path(tmp) / "history.png"
        final = "test" if "test" in preds else ("valid" if "valid" in preds else None)
        if final is not None:
            labels = np.asarray(splits[final].labels)
            if 0 < labels.sum() < len(labels):
                plot_roc(labels, preds[final], Path(tmp) / "roc.png", title=f"ROC ({final})")
                plot_calibration(labels, preds[final], Path(tmp) / "calibration.png",
                                 title=f"Calibration ({final})")
                plots["plots/roc.png"] = Path(tmp) / "roc.png"
                plots["plots/calibration.png"] = Path(tmp) / "calibration.png"
        kept = save_model(output, config=cfg, layout=data.layout, encoder=data.encoder, model=trainer.model,
                   metrics=metrics, history=state.history, fingerprint=data.manifest["fingerprint"],
                   extra_files=plots, optimizers=trainer.optimizers if cfg.train.save_optimizer_state else None,
                   lineage=lineage, table_blocks=blocks, optimizer_streams=streams)
    if kept:
        log(f"Kept {', '.join(kept)} from the previous {output} (not written by training; an export there was "
            f"made from the previous weights: run `deepfm export {output}` again)")
    shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(output, metrics, state.history, data, trainer)


def _lineage(parent: LoadedModel, data: PreparedData) -> dict[str, Any]:
    """Where a model trained further comes from: its parent, the parent's ancestry, and how every vocabulary
    changed (ids added, evicted)."""
    parent_vocabs, vocabs = parent.encoder.fitted_state()[0], data.encoder.fitted_state()[0]
    changes = {}
    for name, vocab in vocabs.items():
        g = growth(parent_vocabs[name], vocab)
        changes[name] = {"rows": vocab.size, "added": g.added, "evicted": g.evicted}
    before = parent.info.get("lineage") or {}
    ancestry = list(before.get("ancestry", [])) + [{
        "path": str(parent.path.resolve()), "created": parent.info.get("created"),
        "data_fingerprint": parent.info.get("data_fingerprint")}]
    return {"generation": int(before.get("generation", 0)) + 1, "parent": ancestry[-1], "ancestry": ancestry,
            "data_fingerprint": data.manifest["fingerprint"], "vocabularies": changes}


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    rows = [(name, m) for name, m in metrics.items() if "auc" in m]
    if not rows:
        return "(no validation or test split: no metrics)"
    extra = ["gauc"] if any("gauc" in m for _, m in rows) else []
    head = ["split", "rows", "AUC", "log loss", "calibration"] + [e.upper() for e in extra]
    lines = [head]
    for name, m in rows:
        lines.append([name, f"{m['rows']:,}", f"{m['auc']:.5f}", f"{m['logloss']:.5f}",
                      f"{m['calibration']:.3f}"] + [f"{m[e]:.5f}" for e in extra])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), sep] + [fmt(r) for r in lines[1:]])
