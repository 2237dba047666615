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
from deepfm.data.ranked import prepare_for_ranks
from deepfm.data.store import PreparedData
from deepfm.model import DeepFM, embedding_table
from deepfm.plots import plot_calibration, plot_history, plot_roc
from deepfm.train import distributed as ddp
from deepfm.train import folders
from deepfm.data.vocab import growth
from deepfm.train.memory import explain_out_of_memory
from deepfm.train.placement import TablePlacement, placement_for
from deepfm.train.rowshare import row_share
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


def build_model(cfg: Config, data: PreparedData, dist: ddp.DistContext = ddp.SINGLE,
                placement: TablePlacement | None = None) -> DeepFM:
    """The initial model, with the rows of the table this rank holds (all, or its shard under row sharding)."""
    torch.manual_seed(cfg.train.seed)
    placement = placement or placement_for(cfg.train, dist)
    return DeepFM(data.layout, cfg.model, sparse=cfg.train.sparse, logit_shift=cfg.data.logit_shift,
                  table_rows=placement.table_rows(data.layout.num_rows))


def train(cfg: Config, output: Path, *, resume: bool = False, log=print, callbacks=None,
          init_from: str | Path | None = None, reset_optimizer: bool = False) -> TrainResult | None:
    """Run the whole job. Under ``torchrun`` every rank calls this; rank 0 returns the result, others None.
    ``init_from``: a model directory to train further on this config's data (``deepfm.train.warm``)."""
    dist = ddp.from_env()
    placement_for(cfg.train, dist).check_init_from(init_from)
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
    data = prepare_for_ranks(cfg, dist, progress=cfg.train.progress, log=log, parent=grow_from)
    splits = data.splits
    log(f"Data: {', '.join(f'{k} {len(v):,} rows' for k, v in splits.items())}; "
        f"embedding table {data.layout.num_rows:,} rows x {cfg.model.embed_dim + 1} "
        f"({len(data.layout.field_order)} fields)")
    n_train, batch = len(splits["train"]), cfg.train.batch_size
    suggested = auto_batch_size(n_train)
    if batch != "auto" and n_train < 20 * batch and suggested < batch:
        log(f"Note: {n_train:,} training rows make only {-(-n_train // batch)} step(s) per epoch at batch {batch}; "
            f"small data trains better with more steps: try --set train.batch_size={suggested} (or auto)")
    placement = placement_for(cfg.train, dist)
    with explain_out_of_memory(cfg, data.layout.num_rows, dist, placement):
        return _fit_and_save(cfg, data, output, resume=resume, log=log, callbacks=callbacks, dist=dist,
                             placement=placement, parent=parent, reset_optimizer=reset_optimizer)


def _fit_and_save(cfg: Config, data: PreparedData, output: Path, *, resume: bool, log, callbacks,
                  dist: ddp.DistContext, placement: TablePlacement, parent: LoadedModel | None,
                  reset_optimizer: bool) -> TrainResult | None:
    """Build, train, score the held-out splits and write the model directory (rank 0 returns the result)."""
    model = build_model(cfg, data, dist, placement)
    run_dir = _fresh_run_dir(run_dir_for(output), resume, dist, placement)
    warm = _WarmStart(parent, data, model) if parent is not None else None
    trainer = Trainer(model, cfg.train, run_dir, log=log, callbacks=callbacks, dist=dist, placement=placement,
                      rows=row_share(data.manifest, dist.rank, dist.world_size))
    if warm is not None:
        warm.carry_optimizer(trainer, reset_optimizer, log)
    state = trainer.fit(data.splits["train"], data.splits.get("valid"), resume=resume)
    metrics, preds = _held_out_metrics(trainer, data.splits)
    metrics["train"] = {"best_epoch": state.best_epoch, "epochs_run": len(state.history), "steps": state.step,
                        "ranks": dist.world_size}
    kept: list[str] = []

    def write(**streamed: Any) -> None:  # rank 0
        with tempfile.TemporaryDirectory() as tmp:
            kept.extend(save_model(
                output, config=cfg, layout=data.layout, encoder=data.encoder, model=trainer.model, metrics=metrics,
                history=state.history, fingerprint=data.manifest["fingerprint"],
                extra_files=_plots(state.history, data.splits, preds, Path(tmp)),
                optimizers=trainer.optimizers if cfg.train.save_optimizer_state else None,
                lineage=None if warm is None else warm.lineage, **streamed))

    wrote = placement.write_model(trainer.model, trainer.optimizers if cfg.train.save_optimizer_state else None,
                                  write)
    dist.barrier()  # the model directory is complete: the checkpoints can go (each machine's, by its first rank)
    if placement.folders.is_leader:
        shutil.rmtree(run_dir, ignore_errors=True)
    if not wrote:
        return None
    if kept:
        log(f"Kept {', '.join(kept)} from the previous {output} (not written by training; an export there was "
            f"made from the previous weights: run `deepfm export {output}` again)")
    return TrainResult(output, metrics, state.history, data, trainer)


def _fresh_run_dir(run_dir: Path, resume: bool, dist: ddp.DistContext, placement: TablePlacement) -> Path:
    """The checkpoint folder of this run: a previous run's removed unless resuming it (rank 0 removes; on
    machines that share no folder, each machine's first rank its own: ``deepfm.train.folders``)."""
    if not resume and run_dir.exists() and dist.is_main:
        shutil.rmtree(run_dir)
    dist.barrier()
    share = folders.probe(run_dir, dist)
    if not resume and not share.with_main and share.is_leader:
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    dist.barrier()
    placement.use_folders(share)
    return run_dir


class _WarmStart:
    """Training further from a parent model (``--init-from``): its weights moved into the new model's rows,
    then its optimiser state into the trainer's optimisers."""

    def __init__(self, parent: LoadedModel, data: PreparedData, model: DeepFM) -> None:
        self.parent = parent
        self.source = table_source(parent.layout, data.layout, parent.encoder.fitted_state()[0],
                                   data.encoder.fitted_state()[0])
        warm_start(model, parent.model.state_dict(), self.source)
        self.lineage = _lineage(parent, data)

    def carry_optimizer(self, trainer: Trainer, reset_optimizer: bool, log) -> None:
        parent, lineage = self.parent, self.lineage
        saved = parent.optimizer_state()
        carried = saved is not None and not reset_optimizer
        if carried:
            carry_optimizer_state(trainer.optimizers, saved, embedding_table(trainer.model), self.source,
                                  parent.layout.num_rows)
        log(f"Training further from {parent.path} (generation {lineage['generation']}): " + ", ".join(
            f"{name} +{g['added']:,}" + (f" -{g['evicted']:,}" if g["evicted"] else "")
            for name, g in lineage["vocabularies"].items() if g["added"] or g["evicted"])
            + ("; optimiser state carried over" if carried else "; optimiser state afresh"))


def _held_out_metrics(trainer: Trainer, splits: dict[str, Any]
                      ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Metrics and predictions of the valid and test splits (every rank takes part)."""
    metrics: dict[str, dict[str, float]] = {}
    preds: dict[str, np.ndarray] = {}
    for name in ("valid", "test"):
        split = splits.get(name)
        if split is not None and len(split):
            preds[name] = trainer.predict(split)
            metrics[name] = trainer.evaluate(split, preds[name])
    return metrics, preds


def _plots(history: list[dict[str, Any]], splits: dict[str, Any], preds: dict[str, np.ndarray], folder: Path
           ) -> dict[str, Path]:
    """The training history, and ROC and calibration of the last held-out split, drawn into ``folder``: their
    names in the model directory -> where they are."""
    plots: dict[str, Path] = {}
    if history:
        plot_history(history, folder / "history.png")
        plots["plots/history.png"] = folder / "history.png"
    final = "test" if "test" in preds else ("valid" if "valid" in preds else None)
    if final is not None:
        labels = np.asarray(splits[final].labels)
        if 0 < labels.sum() < len(labels):
            plot_roc(labels, preds[final], folder / "roc.png", title=f"ROC ({final})")
            plot_calibration(labels, preds[final], folder / "calibration.png", title=f"Calibration ({final})")
            plots["plots/roc.png"] = folder / "roc.png"
            plots["plots/calibration.png"] = folder / "calibration.png"
    return plots


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
