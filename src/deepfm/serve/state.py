"""What the routes share: ``ServedModel`` (one loaded model, never mutated) and ``ServingState`` (the
settings, the metrics and the model being served now, swapped by a reload).

A request takes one reference to the served model when it starts and keeps it to the end, so a reload (which
builds the new model completely before swapping one attribute) never disturbs requests in flight.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepfm.artifact import LoadedModel, load_model
from deepfm.errors import DeepFMError
from deepfm.model.embedding import embedding_table
from deepfm.predict import Predictor
from deepfm.runtime import Runtime, resolve_device
from deepfm.serve.encode import FastEncoder, RequestRows, frame_probs, request_codecs, validate_rows
from deepfm.serve.metrics import Metrics
from deepfm.serve.settings import ServeSettings

if TYPE_CHECKING:
    from deepfm.serve.peers import ParentLink


@dataclass
class ServedModel:
    """A loaded model and everything a request needs from it; never mutated after construction."""

    predictor: Predictor
    fast: FastEncoder
    version: str
    loaded_at: float
    fields: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None  # "int8": the table is row-wise int8 (deepfm.quantize)

    @property
    def loaded(self) -> LoadedModel:
        return self.predictor.loaded

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", quantize: str = "none",
             precision: str = "fp32") -> ServedModel:
        path = Path(model_dir)
        loaded = load_model(path, resolve_device(device), shared_table=True)  # workers share one table (mmap)
        predictor = Predictor(loaded, device=device, precision=precision)
        table = embedding_table(loaded.model)
        if quantize == "int8":
            from deepfm.quantize import int8_model

            model, source = int8_model(loaded)
            predictor.runtime = Runtime.place(model, device, predictor.precision, predictor.runtime.batch_size)
            codes, scale = model.table.codes, model.table.scale
            float(codes[:: max(1, 4096 // codes.shape[1])].sum())  # read every page once now (see below)
            float(scale[::2048].float().sum())
        elif table is not None and table.device.type == "cpu":
            float(table.sum())  # read every page once now, so that no request waits for the disk
        digest = hashlib.sha256()
        for name in ("model.safetensors", "encoder.json"):
            with open(path / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        # the numbers differ from the float32 model's: the version says so
        version = digest.hexdigest()[:16] + ("-int8" if quantize == "int8" else "") + \
            ("-bf16" if predictor.precision == "bf16" else "")
        codecs = request_codecs(predictor.loaded.encoder.codecs, predictor.config.data)
        served = cls(predictor, FastEncoder(predictor), version, time.time(), {c.name: c for c in codecs},
                     quantize if quantize != "none" else None)
        served.warm_up()
        return served

    def warm_up(self) -> None:
        """One prediction through each path, so the first request is not slower (and a broken model fails
        here, before it is swapped in)."""
        rows = self.validate([{}])
        p2 = frame_probs(self.predictor, rows)
        p1 = self.fast.probs(rows) if self.fast.enabled else p2
        if not np.array_equal(p1, p2):
            raise DeepFMError(f"{self.loaded.path}: the fast encoding path disagrees with the batch path "
                              f"({p1} vs {p2}); this is a deepfm bug")

    def validate(self, rows: list[dict[str, Any]]) -> RequestRows:
        return validate_rows(rows, self.fields, self.predictor.config.data.label)

    def info(self, max_rows: int) -> dict[str, Any]:
        m = self.loaded
        return {"version": self.version, "path": str(m.path), "created": m.info.get("created"),
                "format_version": m.info.get("format_version"), "versions": m.info.get("versions"),
                "label": m.config.data.label, "fields": m.encoder.describe(), "metrics": m.metrics,
                "loaded_at": self.loaded_at, "max_rows": max_rows, "quantize": self.quantize,
                "precision": self.predictor.precision}


class ServingState:
    """The server's state: typed, one per app (``app.state.serving``). ``peers``: in a forked worker
    (``deepfm serve --workers N``), its link to the parent, through which a reload reaches every worker."""

    def __init__(self, settings: ServeSettings, model_dir: str | Path, metrics: Metrics | None = None,
                 peers: ParentLink | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.peers = peers
        self._reload_lock = threading.Lock()  # one load at a time; requests go on with the current model
        self.openapi_doc: dict[str, Any] | None = None  # the document of the served model, built on demand
        self.model: ServedModel
        self.path: Path
        self.root = settings.allowed_root(model_dir)  # where reloads may load from; fixed at start
        from deepfm.serve.batcher import Batcher

        self.batcher = Batcher(settings.max_batch_rows, settings.max_batch_delay_ms / 1000,
                               settings.fast_path_max_rows, self.metrics)
        self._install(ServedModel.load(model_dir, settings.device, settings.quantize, settings.precision),
                      Path(model_dir))

    def _install(self, served: ServedModel, path: Path) -> None:
        self.model, self.path = served, path  # one reference swap: requests keep the model they took
        self.metrics.serving(served.version)
        self.openapi_doc = None  # it lists the served model's fields: rebuilt on the next request

    def prepare(self, path: Path) -> ServedModel:
        """Load ``path`` completely (nothing swapped yet); a failure is counted and raised."""
        try:
            return ServedModel.load(path, self.settings.device, self.settings.quantize,
                                     self.settings.precision)
        except BaseException:
            self.metrics.reloaded(False)
            raise

    def install(self, served: ServedModel, path: Path) -> None:
        """Swap in a model ``prepare`` loaded."""
        self._install(served, path)
        self.metrics.reloaded(True)

    def reload(self, path: Path | None = None) -> ServedModel:
        """Load ``path`` (default: the current directory) completely, then swap it in, in this process only;
        a failure leaves the current model serving and is counted."""
        with self._reload_lock:
            target = self.path if path is None else path
            served = self.prepare(target)
            self.install(served, target)
            return served

    async def reload_everywhere(self, path: Path | None = None) -> ServedModel:
        """``reload`` for the whole server: in a forked worker, this worker loads ``path`` (so it is checked
        once here), then every other worker loads it through the parent, and all swap only once all have
        loaded it (``deepfm.serve.peers``); a failure anywhere leaves every worker on the current model."""
        from fastapi.concurrency import run_in_threadpool

        if self.peers is None:
            return await run_in_threadpool(self.reload, path)
        target = self.path if path is None else path
        served = await run_in_threadpool(self.prepare, target)
        await self.peers.everywhere(self, served, target)
        return served

    def info(self) -> dict[str, Any]:
        return self.model.info(self.settings.max_rows)
