"""Is a difference in test AUC resolved by the test rows?  A paired bootstrap over the test rows.

The suite reports each contender's mean test AUC over its runs (seeds; on the ``-cv`` sets folds x seeds).
Seeds vary only the training: on a ~400-row test split the rows themselves are the larger source of
uncertainty (AUC standard error ~0.02).  ``paired_bootstrap`` resamples the test rows (within each fold),
recomputes every run's AUC on the same resample for both contenders and returns the distribution of the
difference of their mean AUCs: paired, so what the contenders share (hard rows, easy rows) cancels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


def save_predictions(labels, scores) -> None:
    """A runner's test labels and scores, in file order, to ``$QUALITY_PREDICTIONS`` (an .npz, written
    atomically) when run.py asks for them."""
    dest = os.environ.get("QUALITY_PREDICTIONS")
    if not dest:
        return
    tmp = f"{dest}.{os.getpid()}.tmp.npz"
    np.savez(tmp, y=np.asarray(labels).ravel().astype(np.int8), p=np.asarray(scores, dtype=np.float64).ravel())
    os.replace(tmp, dest)


def auc_under_weights(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Exact ROC AUC of ``scores`` for each row of ``weights`` ``[B, n]`` (row multiplicities, e.g. bootstrap
    counts): ``P(score_pos > score_neg) + P(tie) / 2`` over weighted pairs.  Equals the AUC of the data with
    each row repeated ``weights[b, i]`` times.  ``[B]``; NaN where a resample holds one class only."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of equal scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


@dataclass(frozen=True)
class PairedDiff:
    diff: float          # mean AUC of a minus mean AUC of b, on the test rows as they are
    low: float           # 2.5% quantile of the resampled difference
    high: float          # 97.5% quantile
    a_ahead: float       # share of resamples where a's mean AUC >= b's
    rows: int
    resamples: int


def paired_bootstrap(blocks: list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]],
                     resamples: int = 2000, seed: int = 0) -> PairedDiff:
    """``blocks``: one per test set (a fold), ``(labels, runs of a, runs of b)``, each run the scores of that
    block's rows in the same order as ``labels``.  Rows are resampled with replacement within each block; the
    statistic is (mean AUC over all of a's runs) - (mean over all of b's runs), as the suite's table has it."""
    rng = np.random.default_rng(seed)
    a_sum = np.zeros(resamples)
    b_sum = np.zeros(resamples)
    a_obs: list[float] = []
    b_obs: list[float] = []
    n_a = n_b = rows = 0
    for labels, runs_a, runs_b in blocks:
        n = len(labels)
        rows += n
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
        for runs, acc, obs in ((runs_a, a_sum, a_obs), (runs_b, b_sum, b_obs)):
            for p in runs:
                if len(p) != n:
                    raise ValueError(f"a run has {len(p)} scores for {n} test rows")
                acc += auc_under_weights(labels, p, w)
                obs.append(float(auc_under_weights(labels, p, np.ones((1, n)))[0]))
        n_a += len(runs_a)
        n_b += len(runs_b)
    d = a_sum / n_a - b_sum / n_b
    d = d[np.isfinite(d)]
    return PairedDiff(diff=float(np.mean(a_obs) - np.mean(b_obs)), low=float(np.quantile(d, 0.025)),
                      high=float(np.quantile(d, 0.975)), a_ahead=float(np.mean(d >= 0)), rows=rows,
                      resamples=len(d))
