"""Exact evaluation metrics over the whole set (never an average of per-batch values)."""

from __future__ import annotations

import numpy as np


def _total(values: np.ndarray, weights: np.ndarray | None) -> float:
    """sum(w * values): the plain sum where every weight is 1 (no array of ones at 45M rows)."""
    return float(values.sum() if weights is None else np.dot(weights, values))


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} rows")
    return w


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact ROC AUC: the chance that a positive scores above a negative, a tie counting one half (Mann-Whitney
    U), over tie groups of equal scores. With ``weights`` every positive-negative pair counts ``w_pos * w_neg``
    (as scikit-learn's ``sample_weight``: integer weights equal repeating rows); without, every weight is 1.
    NaN if either class has no weight."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    w = _weights(weights, len(labels))
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    tie = np.cumsum(np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1]))) - 1
    pos = np.bincount(tie, (labels if w is None else labels * w)[order])  # positive weight per tie group
    neg = np.bincount(tie, None if w is None else w[order]) - pos
    pos_total, neg_total = float(pos.sum()), float(neg.sum())
    if pos_total <= 0 or neg_total <= 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negative weight scored below each tie group
    return float(np.dot(pos, neg_below + 0.5 * neg)) / (pos_total * neg_total)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7, weights: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy; with ``weights``, sum(w * loss) / sum(w) (NaN if the weights sum to 0)."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    w = _weights(weights, len(labels))
    total = float(len(labels)) if w is None else float(w.sum())
    loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    return _total(loss, w) / total if total > 0 else float("nan")


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """gAUC: per-group AUC weighted by group size, over groups that hold both classes. Vectorised."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    _, g = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    order = np.lexsort((scores, g))
    g_s, s_s, y_s = g[order], scores[order], labels[order]
    n = len(order)
    new_group = np.concatenate(([True], g_s[1:] != g_s[:-1]))
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    new_tie = new_group | np.concatenate(([True], s_s[1:] != s_s[:-1]))
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.nonzero(new_tie)[0]
    tie_count = np.diff(np.append(tie_first, n))
    rank = (tie_first - group_start[tie_first] + (tie_count + 1) / 2.0)[tie_id]
    size = np.bincount(g_s).astype(np.float64)
    n_pos = np.bincount(g_s, y_s, minlength=len(size))
    n_neg = size - n_pos
    pos_rank = np.bincount(g_s, rank * y_s, minlength=len(size))
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_group = (pos_rank[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(per_group * size[ok]) / np.sum(size[ok]))


def calibration(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Predicted clicks over observed clicks, sum(w * p) / sum(w * y) (1.0 is calibrated on average; every
    weight 1 without ``weights``): the mean prediction divided by the positive rate."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    w = _weights(weights, len(labels))
    observed = _total(labels, w)
    return _total(np.asarray(probs, dtype=np.float64).ravel(), w) / observed if observed > 0 else float("nan")


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray,
                                                                               np.ndarray]:
    """Per quantile bin of predictions: (mean prediction, observed rate, count)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    edges = np.unique(np.quantile(probs, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(which, minlength=len(edges) - 1).astype(np.float64)
    mean_p = np.bincount(which, probs, minlength=len(edges) - 1) / np.maximum(count, 1)
    rate = np.bincount(which, labels, minlength=len(edges) - 1) / np.maximum(count, 1)
    keep = count > 0
    return mean_p[keep], rate[keep], count[keep]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    y = np.asarray(labels, dtype=np.float64)[order]
    s = np.asarray(scores)[order]
    distinct = np.nonzero(np.diff(s))[0]
    idx = np.append(distinct, len(y) - 1)
    tps = np.cumsum(y)[idx]
    fps = (idx + 1) - tps
    tpr = np.concatenate(([0.0], tps / max(tps[-1], 1)))
    fpr = np.concatenate(([0.0], fps / max(fps[-1], 1)))
    return fpr, tpr


def summarize(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> dict[str, float]:
    """AUC, log loss and calibration (weighted by ``weights``, the split's ``data.weight_column``, when given),
    the row count, and gAUC with ``groups`` (per-group AUC weighted by group size; sample weights do not enter
    it)."""
    out = {"auc": auc(labels, probs, weights), "logloss": log_loss(labels, probs, weights=weights),
           "calibration": calibration(labels, probs, weights), "rows": int(len(labels))}
    if groups is not None:
        out["gauc"] = group_auc(labels, probs, groups)
    return out
