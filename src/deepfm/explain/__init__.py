"""Why the model said that: field importance, field-pair interactions, the logit's parts, per-row attributions.

    report = explain_data(load_model(Path("runs/criteo")), "examples/criteo/data/test.tsv")   # deepfm explain
    frame = explain_rows(load_model(Path("runs/criteo")), df)   # attr_bias + attr_<field>: sum = the logit

``attribution`` splits a row's logit (exact for bias, linear and FM; DeepLIFT for the DNN); ``importance`` holds
the data-level measures; ``report`` the tables, PNGs and JSON of ``deepfm explain``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import polars as pl

from deepfm.artifact import LoadedModel
from deepfm.data.batch import ModelInput
from deepfm.explain.attribution import BASELINE, Attribution, attribute
from deepfm.explain.importance import (decomposition, pair_strengths, permutation_importance, ranked_pairs,
                                       read_rows)
from deepfm.runtime import Runtime

__all__ = ["BASELINE", "Attribution", "attribute", "attribute_input", "attribution_columns", "explain_data",
           "explain_rows"]

MAX_ROWS = 100_000  # rows of the data file that ``deepfm explain`` reads by default
SEEDS = 5  # shuffles per field
ATTRIBUTION_BATCH = 4096  # rows attributed per pass (DeepLIFT runs the DNN on rows and baselines together)


def attribute_input(loaded: LoadedModel, inp: ModelInput, batch: int = ATTRIBUTION_BATCH) -> Attribution:
    """``attribute`` over any number of rows, ``batch`` rows at a time."""
    names = loaded.layout.field_order
    parts = [attribute(loaded.model, inp.slice(lo, min(lo + batch, len(inp))), names)
             for lo in range(0, len(inp), batch)] or [attribute(loaded.model, inp, names)]
    return Attribution(names, parts[0].bias, *(np.concatenate([getattr(p, k) for p in parts])
                                               for k in ("linear", "fm", "dnn")))


def attribution_columns(attr: Attribution) -> dict[str, np.ndarray]:
    """``attr_bias`` and ``attr_<field>`` (float64 ``[B]`` each, in ``layout.field_order``): their sum is the logit."""
    if "bias" in attr.fields:
        raise ValueError("a field named 'bias' would share its column with attr_bias; rename the field")
    per_field = attr.per_field
    out = {"attr_bias": np.full(per_field.shape[0], attr.bias)}
    out.update({f"attr_{name}": per_field[:, i] for i, name in enumerate(attr.fields)})
    return out


def explain_rows(model: Any, frame: Any) -> Any:
    """Per-row attributions of a pandas or polars DataFrame's rows (the training columns) as a DataFrame of the
    same kind: ``attr_bias`` and ``attr_<field>`` per field, summing to each row's logit. ``model``: a
    ``LoadedModel`` or a ``deepfm.predict.Predictor``."""
    from deepfm.data.batch import input_from_chunk
    from deepfm.data.readers import RawChunk

    loaded = getattr(model, "loaded", model)
    df = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
    if loaded.config.data.label in df.columns:
        df = df.drop(loaded.config.data.label)
    chunk = RawChunk("<dataframe>", df, np.arange(1, df.height + 1, dtype=np.int64), 0)
    attr = attribute_input(loaded, input_from_chunk(loaded.encoder.transform(chunk, labels=False)))
    out = pl.DataFrame(attribution_columns(attr))
    return out if isinstance(frame, pl.DataFrame) else out.to_pandas()


def explain_data(loaded: LoadedModel, path: str, *, seeds: int = SEEDS, max_rows: int = MAX_ROWS,
                 device: str = "cpu") -> dict[str, Any]:
    """The report of ``deepfm explain`` on the labelled file ``path`` (its first ``max_rows`` rows): ``importance``
    (most important first), ``pairs`` (strongest first), ``decomposition``, ``pair_matrix``, ``base`` scores."""
    if seeds < 1:
        raise ValueError("seeds must be at least 1")
    started = time.perf_counter()
    rows = read_rows(loaded, path, max_rows)
    runtime = Runtime.place(loaded.model, device, "fp32")
    base, importance = permutation_importance(loaded, rows, runtime, seeds)
    importance_s = time.perf_counter() - started
    fields = loaded.layout.field_order
    strength, mean = pair_strengths(loaded, rows)
    return {"data": str(path), "rows": len(rows.enc), "seeds": seeds, "base": base, "fields": list(fields),
            "importance": importance, "pairs": ranked_pairs(fields, strength, mean),
            "decomposition": decomposition(loaded, rows), "pair_matrix": np.round(strength, 8).tolist(),
            "dnn_baseline": BASELINE, "seconds": {"importance": round(importance_s, 3),
                                                  "total": round(time.perf_counter() - started, 3)}}

