"""The quality suite's paired bootstrap (bench/quality/stats.py): weighted AUC exact, the difference paired."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfm.metrics import auc

_spec = importlib.util.spec_from_file_location(
    "quality_stats", Path(__file__).resolve().parents[1] / "bench" / "quality" / "stats.py")
stats = importlib.util.module_from_spec(_spec)
sys.modules["quality_stats"] = stats  # dataclasses look their module up
_spec.loader.exec_module(stats)


def test_weighted_auc_equals_auc_of_repeated_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many tied scores
    w = rng.multinomial(300, np.full(300, 1 / 300), size=5)
    got = stats.auc_under_weights(y, s, w)
    for b in range(5):
        rep = np.repeat(np.arange(300), w[b])
        assert got[b] == pytest.approx(auc(y[rep], s[rep]), abs=1e-12)
    assert stats.auc_under_weights(y, s, np.ones((1, 300)))[0] == pytest.approx(auc(y, s), abs=1e-12)


def test_one_class_resample_is_nan():
    assert np.isnan(stats.auc_under_weights(np.array([1, 0]), np.array([0.2, 0.1]), np.array([[2, 0]]))[0])


def test_paired_bootstrap_separates_a_real_difference_and_not_an_identical_model():
    rng = np.random.default_rng(1)
    blocks = []
    for _ in range(2):  # two folds
        y = rng.integers(0, 2, 400)
        good = [y + rng.normal(scale=0.8, size=400) for _ in range(3)]
        poor = [y + rng.normal(scale=3.0, size=400) for _ in range(3)]
        blocks.append((y, good, poor))
    r = stats.paired_bootstrap(blocks, resamples=500)
    expected = np.mean([auc(y, p) for y, g, _ in blocks for p in g]) - np.mean([auc(y, p) for y, _, q in blocks for p in q])
    assert r.diff == pytest.approx(expected, abs=1e-12)
    assert 0 < r.low < r.diff < r.high and r.a_ahead == 1.0 and r.rows == 800 and r.resamples == 500
    same = stats.paired_bootstrap([(y, g, g) for y, g, _ in blocks], resamples=200)
    assert same.diff == 0 and same.low == 0 and same.high == 0


def test_paired_bootstrap_rejects_misaligned_runs():
    with pytest.raises(ValueError, match="3 scores for 4 test rows"):
        stats.paired_bootstrap([(np.array([0, 1, 0, 1]), [np.zeros(3)], [np.zeros(4)])], resamples=10)
