"""Model-level explanations over a labelled data set: permutation field importance, field-pair FM strengths, and
the share of bias / linear / FM / DNN in the logit's variance.

Importance of a field is the drop in exact AUC (and the rise in log loss; the drop in gAUC when
``data.group_column`` is set) when its values are **shuffled across rows** (repeated with several seeds,
reported as the mean with a 95% t-interval over the seeds), and when it is **set to missing** (every row gets
what the encoder gives an empty cell: the missing token's id or the out-of-vocabulary id, NaN for a scaled
numeric field, an empty bag for a multi-valued one). Both act on the encoded ids, one field at a time: a field
sharing its vocabulary with others is shuffled alone (the others keep their values), and a multi-valued field
moves each row's whole bag of tags with their weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from deepfm.artifact import LoadedModel
from deepfm.data.batch import EncodedChunk, MultiValues, make_input
from deepfm.data.readers import RawChunk, check_readable, infer_data_config, read_chunks
from deepfm.errors import DataError
from deepfm.explain.attribution import field_terms
from deepfm.metrics import auc, group_auc, log_loss
from deepfm.runtime import Runtime, sigmoid

# two-sided 95% Student t quantiles by degrees of freedom (1..10); beyond, the normal's 1.96 is close enough
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass
class Rows:
    """Encoded, labelled rows of a data file (up to a row cap) and their groups (gAUC) when configured."""

    enc: EncodedChunk
    labels: np.ndarray
    groups: np.ndarray | None


def read_rows(loaded: LoadedModel, path: str, max_rows: int) -> Rows:
    """The first ``max_rows`` labelled rows of ``path``, encoded by the model's encoder."""
    check_readable(path, hint="the labelled data file to explain the model on")
    data, has_labels = infer_data_config(loaded.config.data, path)
    if not has_labels:
        raise DataError(f"has no label column '{data.label}': importance needs labelled rows", path=path)
    gcol = loaded.config.data.group_column
    parts, groups, n = [], [], 0
    for chunk in read_chunks(path, data, None):
        if n >= max_rows:
            break
        if len(chunk) > max_rows - n:
            chunk = RawChunk(chunk.path, chunk.frame.head(max_rows - n), chunk.lines[:max_rows - n], chunk.row_start)
        parts.append(loaded.encoder.transform(chunk, labels=True))
        if gcol is not None:
            if gcol not in chunk.frame.columns:
                raise DataError(f"group column '{gcol}' (for gAUC) is missing", path=path, field=gcol)
            groups.append(chunk.frame[gcol].cast(pl.Utf8).to_numpy())
        n += len(chunk)
    if not n:
        raise DataError("no rows to explain the model on", path=path)
    enc = concat_encoded(parts)
    assert enc.labels is not None
    return Rows(enc, enc.labels, np.concatenate(groups) if groups else None)


def concat_encoded(parts: list[EncodedChunk]) -> EncodedChunk:
    multi = [MultiValues(np.concatenate([p.multi[m].ids for p in parts]),
                         np.concatenate([p.multi[m].weights for p in parts]),
                         np.concatenate([p.multi[m].lengths for p in parts])) for m in range(len(parts[0].multi))]
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])  # type: ignore[misc]
    return EncodedChunk(labels, np.concatenate([p.cat_ids for p in parts]),
                        np.concatenate([p.num_values for p in parts]), multi,
                        np.concatenate([p.kept for p in parts]))


def missing_row(loaded: LoadedModel) -> EncodedChunk:
    """What the encoder makes of a row whose every cell is empty."""
    frame = pl.DataFrame({"__empty__": [None]}, schema={"__empty__": pl.Utf8})
    chunk = RawChunk("<missing>", frame, np.ones(1, dtype=np.int64), 0, absent_is_missing=True)
    return loaded.encoder.transform(chunk, labels=False)


def _take_bags(m: MultiValues, rows: np.ndarray) -> MultiValues:
    """The bags of ``rows`` in that order (each with its tags and weights)."""
    starts = np.concatenate(([0], np.cumsum(m.lengths)[:-1])).astype(np.int64)
    lengths = m.lengths[rows]
    total = int(lengths.sum())
    first = np.repeat(starts[rows] - (np.cumsum(lengths) - lengths), lengths)
    idx = first + np.arange(total, dtype=np.int64)
    return MultiValues(m.ids[idx], m.weights[idx], lengths)


def replace_field(enc: EncodedChunk, field: int, rows: np.ndarray | None, missing: EncodedChunk | None
                  ) -> EncodedChunk:
    """``enc`` with field ``field`` (index in ``field_order``) taken from rows ``rows`` of itself (a permutation),
    or, with ``rows`` None, from the one-row ``missing`` for every row."""
    n_cat, n_num = enc.cat_ids.shape[1], enc.num_values.shape[1]
    src = enc if rows is not None else missing
    assert src is not None
    pick = rows if rows is not None else np.zeros(len(enc), dtype=np.int64)
    cat, num, multi = enc.cat_ids, enc.num_values, list(enc.multi)
    if field < n_cat:
        cat = cat.copy()
        cat[:, field] = src.cat_ids[pick, field]
    elif field < n_cat + n_num:
        num = num.copy()
        num[:, field - n_cat] = src.num_values[pick, field - n_cat]
    else:
        m = field - n_cat - n_num
        multi[m] = _take_bags(src.multi[m], pick)
    return EncodedChunk(enc.labels, cat, num, multi, enc.kept)


def _logits(runtime: Runtime, enc: EncodedChunk) -> np.ndarray:
    return runtime.logits(make_input(enc.cat_ids, enc.num_values,
                                     [(m.ids, m.weights, m.lengths) for m in enc.multi]))


def _scores(rows: Rows, logits: np.ndarray) -> dict[str, float]:
    p = sigmoid(logits)
    out = {"auc": auc(rows.labels, p), "logloss": log_loss(rows.labels, p)}
    if rows.groups is not None:
        out["gauc"] = group_auc(rows.labels, p, rows.groups)
    return out


def interval(values: np.ndarray) -> tuple[float, float]:
    """A 95% t-interval for the mean of ``values`` (a point when there is one value)."""
    k = len(values)
    mean = float(np.mean(values))
    if k < 2:
        return mean, mean
    half = (_T95[k - 2] if k - 1 <= len(_T95) else 1.96) * float(np.std(values, ddof=1)) / np.sqrt(k)
    return mean - half, mean + half


def permutation_importance(loaded: LoadedModel, rows: Rows, runtime: Runtime, seeds: int = 5
                           ) -> tuple[dict[str, float], list[dict]]:
    """The model's scores on ``rows`` and, per field, the drop when it is shuffled (``seeds`` times) and when it
    is set to missing; most important (largest mean AUC drop) first."""
    base = _scores(rows, _logits(runtime, rows.enc))
    missing = missing_row(loaded)
    n = len(rows.enc)
    out = []
    for f, name in enumerate(loaded.layout.field_order):
        drops: dict[str, list[float]] = {k: [] for k in base}
        for seed in range(seeds):
            perm = np.random.default_rng([seed, f]).permutation(n)
            got = _scores(rows, _logits(runtime, replace_field(rows.enc, f, perm, None)))
            for k in base:
                drops[k].append(_drop(k, base[k], got[k]))
        gone = _scores(rows, _logits(runtime, replace_field(rows.enc, f, None, missing)))
        entry: dict = {"field": name}
        for k in base:
            key = _drop_name(k)
            lo, hi = interval(np.array(drops[k]))
            entry[key] = float(np.mean(drops[k]))
            entry[f"{key}_interval"] = [lo, hi]
            entry[f"{key}_missing"] = _drop(k, base[k], gone[k])
        out.append(entry)
    out.sort(key=lambda e: -e["auc_drop"])
    return base, out


def _drop(metric: str, base: float, got: float) -> float:
    """How much worse ``got`` is than ``base``: the fall of an AUC, the rise of a log loss."""
    return got - base if metric == "logloss" else base - got


def _drop_name(metric: str) -> str:
    return "logloss_increase" if metric == "logloss" else f"{metric}_drop"


def pair_strengths(loaded: LoadedModel, rows: Rows, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``[F, F]`` mean |FM term| and mean FM term of every pair of fields over ``rows`` (the diagonal: the pairs of
    tags within a multi-valued field)."""
    f = loaded.layout.num_fields_total
    abs_sum, signed_sum = np.zeros((f, f)), np.zeros((f, f))
    for lo in range(0, len(rows.enc), batch):
        inp = _input(rows.enc, lo, lo + batch).to(loaded.model.bias.device)
        pairs = field_terms(loaded.model, inp).pair_terms().double()
        abs_sum += pairs.abs().sum(0).cpu().numpy()
        signed_sum += pairs.sum(0).cpu().numpy()
    n = max(len(rows.enc), 1)
    return abs_sum / n, signed_sum / n


def _input(enc: EncodedChunk, lo: int, hi: int):
    return make_input(enc.cat_ids, enc.num_values, [(m.ids, m.weights, m.lengths) for m in enc.multi]).slice(
        lo, min(hi, len(enc)))


def ranked_pairs(fields: tuple[str, ...], strength: np.ndarray, mean: np.ndarray) -> list[dict]:
    """Every pair of distinct fields, strongest (mean |FM term|) first."""
    i, j = np.triu_indices(len(fields), k=1)
    order = np.argsort(-strength[i, j], kind="stable")
    return [{"fields": [fields[i[k]], fields[j[k]]], "strength": float(strength[i[k], j[k]]),
             "mean": float(mean[i[k], j[k]])} for k in order]


def decomposition(loaded: LoadedModel, rows: Rows, batch: int = 8192) -> dict[str, dict[str, float]]:
    """Each part's mean, variance and share of the logit's variance, ``cov(part, logit) / var(logit)`` (the shares
    sum to 1; the bias, a constant, has none)."""
    model = loaded.model
    parts: dict[str, list[np.ndarray]] = {"linear": [], "fm": [], "dnn": []}
    with torch.no_grad():
        for lo in range(0, len(rows.enc), batch):
            inp = _input(rows.enc, lo, lo + batch).to(model.bias.device)
            terms = field_terms(model, inp)
            parts["linear"].append(terms.linear.sum(1).double().cpu().numpy())
            parts["fm"].append(terms.fm.sum(1).double().cpu().numpy())
            dnn = (model.dnn.net(terms.fields.float().flatten(1)).squeeze(-1) if model.dnn is not None
                   else torch.zeros(len(inp), device=model.bias.device))
            parts["dnn"].append(dnn.double().cpu().numpy())
    values = {k: np.concatenate(v) for k, v in parts.items()}
    bias = float(model.bias.detach().float()[0]) + model.logit_shift
    logit = bias + sum(values.values())
    var = float(np.var(logit))
    out = {"bias": {"mean": bias, "variance": 0.0, "share": 0.0}}
    for k, v in values.items():
        cov = float(np.mean((v - v.mean()) * (logit - logit.mean())))
        out[k] = {"mean": float(v.mean()), "variance": float(np.var(v)), "share": cov / var if var > 0 else 0.0}
    return out
