"""Exact evaluation metrics over the whole set (never an average of per-batch values)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores sharing their average rank). NaN if one class only."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = float(labels.sum())
    n_neg = float(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # average 1-based rank of each tie group
    boundaries = np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1]))
    group = np.cumsum(boundaries) - 1
    first = np.nonzero(boundaries)[0]
    counts = np.diff(np.append(first, len(scores)))
    avg_rank = first + (counts + 1) / 2.0
    ranks = avg_rank[group]
    pos_rank_sum = float(ranks[labels[order] == 1].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


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


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean prediction divided by the observed positive rate (1.0 is calibrated on average)."""
    rate = float(np.mean(labels))
    return float(np.mean(probs)) / rate if rate > 0 else float("nan")


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


def summarize(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    out = {"auc": auc(labels, probs), "logloss": log_loss(labels, probs),
           "calibration": calibration(labels, probs), "rows": int(len(labels))}
    if groups is not None:
        out["gauc"] = group_auc(labels, probs, groups)
    return out
