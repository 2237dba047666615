"""DeepFMClassifier is a scikit-learn estimator: params protocol, clone, Pipeline, GridSearchCV, the estimator
checks that apply to a binary classifier on DataFrames, and an opt-in progress output in fit."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402
from sklearn.utils import estimator_checks  # noqa: E402

from deepfm import DeepFMClassifier  # noqa: E402
from deepfm.errors import DataError  # noqa: E402

FAST = {"epochs": 1, "batch_size": 128}


def frame(n: int = 1200, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Two categorical columns and a count; clicks follow the category and the count."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 12, n)
    count = rng.poisson(3, n).astype(float)
    logit = np.where(site % 3 == 0, 1.5, -1.0) + 0.3 * (count - 3)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"site": site.astype(str), "app": rng.choice(["a", "b", "c"], n), "count": count}), y


def test_params_protocol_and_clone():
    clf = DeepFMClassifier(fields=[{"name": "site"}], model={"hidden_units": [8]}, train=FAST, verbose=True)
    params = clf.get_params()
    assert params == {"fields": [{"name": "site"}], "label": "label", "model": {"hidden_units": [8]},
                      "train": FAST, "data": None, "output_dir": None, "verbose": True}
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == params and twin.fields is not clf.fields
    assert clf.set_params(model={"hidden_units": [4]}, label="y") is clf
    assert clf.model == {"hidden_units": [4]} and clf.label == "y"
    with pytest.raises(ValueError, match="Invalid parameter"):
        clf.set_params(nope=1)
    assert "DeepFMClassifier(" in repr(clf) and "hidden_units" in repr(clf)


def test_fit_infers_fields_takes_two_classes_and_predicts_them():
    X, y = frame()
    labels = np.where(y == 1, "click", "none")
    clf = DeepFMClassifier(model={"hidden_units": [8]}, train={"epochs": 3, "batch_size": 128, "lr": 0.01})
    assert clf.fit(X, labels) is clf
    assert [(f["name"], f["kind"]) for f in clf.fields_] == [("site", "categorical"), ("app", "categorical"),
                                                            ("count", "numeric")]
    assert clf.fields is None  # fit never changes a parameter
    assert list(clf.classes_) == ["click", "none"] and clf.n_features_in_ == 3
    assert list(clf.feature_names_in_) == ["site", "app", "count"]
    proba = clf.predict_proba(X)
    assert proba.shape == (1200, 2) and np.allclose(proba.sum(1), 1)
    # classes_ sorted: "none" is the positive class (index 1); its probability falls where clicks are likely
    assert set(clf.predict(X)) <= {"click", "none"}
    assert clf.score(X, labels) > 0.7
    with pytest.raises(ValueError, match="3 class"):
        DeepFMClassifier(train=FAST).fit(X, np.arange(1200) % 3)
    with pytest.raises(DataError, match="requires y"):
        DeepFMClassifier(train=FAST).fit(X)


def test_pipeline_and_grid_search():
    X, y = frame()
    X = X.assign(extra=np.arange(len(X)))  # a column the pipeline drops
    pipe = Pipeline([("select", FunctionTransformer(lambda d: d[["site", "app", "count"]])),
                     ("clf", DeepFMClassifier(model={"hidden_units": [8]}, train=FAST))])
    pipe.fit(X, y)
    direct = DeepFMClassifier(model={"hidden_units": [8]}, train=FAST).fit(X[["site", "app", "count"]], y)
    np.testing.assert_array_equal(pipe.predict_proba(X), direct.predict_proba(X[["site", "app", "count"]]))

    search = GridSearchCV(DeepFMClassifier(model={"hidden_units": [8]}),
                          {"train": [{"epochs": 1, "batch_size": 128, "lr": 1e-4},
                                     {"epochs": 2, "batch_size": 128, "lr": 1e-2}]}, cv=2)
    search.fit(X[["site", "app", "count"]], y)
    scores = search.cv_results_["mean_test_score"]
    assert scores.shape == (2,) and np.all((scores > 0.5) & (scores < 1))
    assert search.best_params_["train"]["lr"] == 1e-2 and scores[1] > scores[0]  # 100x the lr, 2x the epochs
    assert search.best_estimator_.score(X[["site", "app", "count"]], y) > 0.7


# scikit-learn's own checks that apply to a binary classifier which treats NaN as a missing value. Left out:
# check_classifiers_train (wants accuracy > 0.83 on toy blobs after the estimator's few default steps) and
# check_estimators_nan_inf (run by check_estimator only for estimators that reject NaN; deepfm treats it as
# missing, and rejects inf, tested below).
CHECKS = ["check_no_attributes_set_in_init", "check_parameters_default_constructible", "check_get_params_invariance",
          "check_set_params", "check_estimator_repr", "check_estimator_cloneable", "check_estimators_unfitted",
          "check_dont_overwrite_parameters", "check_fit_idempotent", "check_n_features_in", "check_fit2d_predict1d",
          "check_fit_check_is_fitted", "check_classifiers_one_label", "check_classifiers_regression_target",
          "check_estimators_pickle", "check_fit_score_takes_y", "check_estimators_fit_returns_self",
          "check_pipeline_consistency", "check_supervised_y_2d", "check_requires_y_none",
          "check_n_features_in_after_fitting", "check_estimators_dtypes", "check_mixin_order",
          "check_do_not_raise_errors_in_init_or_set_params"]


@pytest.mark.parametrize("check", CHECKS)
def test_sklearn_estimator_checks(check):
    fn = getattr(estimator_checks, check, None)
    if fn is None:
        pytest.skip(f"{check} is not in scikit-learn {sklearn.__version__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn("DeepFMClassifier", DeepFMClassifier(model={"hidden_units": [8]}, train={"epochs": 1, "batch_size": 64}))


def test_infinite_input_is_a_value_error_and_nan_is_missing():
    X, y = frame(300)
    bad = X.assign(count=X["count"].where(X.index != 5, np.inf))
    with pytest.raises(ValueError, match=r"infinity in column\(s\) \['count'\]"):
        DeepFMClassifier(train=FAST).fit(bad, y)
    gaps = X.assign(count=X["count"].where(X.index % 7 != 0, np.nan))
    clf = DeepFMClassifier(train=FAST).fit(gaps, y)
    assert np.isfinite(clf.predict_proba(gaps)).all()


def test_progress_in_fit_is_opt_in(capsys):
    X, y = frame(400)
    DeepFMClassifier(train=FAST).fit(X, y)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    DeepFMClassifier(train={**FAST, "epochs": 2}, verbose=True).fit(X, y)
    loud = capsys.readouterr()
    assert loud.out == ""
    assert "epoch 1 | train logloss" in loud.err and "epoch 2 | train logloss" in loud.err
    assert "Data: train 400 rows" in loud.err


def test_fit_and_score_take_sample_weight():
    X, y = frame(600, seed=3)
    cfg = {"model": {"hidden_units": [8]}, "train": {"epochs": 1, "batch_size": 600, "seed": 5, "shuffle": False}}
    plain = DeepFMClassifier(**cfg).fit(X, y)
    twos = DeepFMClassifier(**cfg).fit(X, y, sample_weight=np.full(600, 2.0))
    # the loss is sum(w l) / sum(w): uniform weights train exactly as none
    assert np.array_equal(plain.predict_proba(X), twos.predict_proba(X))
    keep = np.arange(600) % 4 != 0
    zero = DeepFMClassifier(**cfg).fit(X, y, sample_weight=keep.astype(float))
    assert not np.allclose(zero.predict_proba(X), plain.predict_proba(X))  # the weights reach the loss
    w = np.random.default_rng(0).integers(0, 4, 600).astype(float)
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(y, plain.predict_proba(X)[:, 1], sample_weight=w)
    assert plain.score(X, y, sample_weight=w) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one weight per row"):
        DeepFMClassifier(**cfg).fit(X, y, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match="finite and >= 0"):
        DeepFMClassifier(**cfg).fit(X, y, sample_weight=np.r_[-1.0, np.ones(599)])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_fifty_fits_in_one_process_leave_no_descriptors_open(monkeypatch):
    """The descriptors a split's reads open (the pread path, forced here for a tiny split) die with the split:
    fifty fits in one process (a notebook, ``deepfm tune``) end with the descriptors they started with."""
    from deepfm.data import loader

    monkeypatch.setattr(loader, "MAP_BELOW_BYTES", 0)
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.integers(0, 5, 64).astype(str), "b": rng.normal(size=64)})
    y = rng.integers(0, 2, 64)
    DeepFMClassifier(train={"epochs": 1, "batch_size": 16}).fit(X, y)  # what the first fit loads stays loaded
    counts = []
    for _ in range(50):
        clf = DeepFMClassifier(train={"epochs": 1, "batch_size": 16}).fit(X, y)
        counts.append(len(os.listdir("/proc/self/fd")))
    assert clf.predict_proba(X).shape == (64, 2)
    assert max(counts) == counts[0], counts
