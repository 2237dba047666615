"""Derived columns (``data.derive``): Avazu's YYMMDDHH ``hour`` -> hour of day, weekday, weekend, as BARS."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from deepfm.config import config_from_dict
from deepfm.data.store import prepare
from deepfm.errors import DataError

QUIET = {"progress": False, "log": lambda _m: None}
# 2014-10-21 is a Tuesday, 2014-10-25 a Saturday, 2014-10-26 a Sunday
ROWS = [("1", "14102100", "a"), ("0", "14102623", "b"), ("0", "14102515", "a"), ("1", "", "b"),
        ("0", "14102109", "a")]
EXPECTED = {"hour": ["0", "23", "15", "", "9"], "weekday": ["2", "0", "6", "", "2"],
            "weekend": ["0", "1", "1", "", "0"]}


def _raw(tmp_path, rows, **train):
    path = tmp_path / "train.csv"
    path.write_text("click,hour,site\n" + "".join(",".join(r) + "\n" for r in rows))
    return {
        "data": {"format": "csv", "label": "click", "train": str(path), "cache_dir": str(tmp_path / "cache"),
                 "derive": [{"name": "weekday", "source": "hour", "fn": "weekday"},
                            {"name": "weekend", "source": "hour", "fn": "weekend"},
                            {"name": "hour", "source": "hour", "fn": "hour_of_day"}]},
        "fields": [{"names": ["hour", "weekday", "weekend", "site"]}],
        "model": {"embed_dim": 4, "hidden_units": [8]},
        "train": {"epochs": 1, "batch_size": 4, "progress": False, **train},
    }


def test_hour_of_day_weekday_and_weekend_from_a_yymmddhh_column(tmp_path):
    data = prepare(config_from_dict(_raw(tmp_path, ROWS)), **QUIET)
    vocabs = data.encoder.vocabularies_
    cat = np.asarray(data.splits["train"].cat_ids)
    for j, name in enumerate(data.layout.cat_fields):
        if name in EXPECTED:
            tokens = vocabs[name].tokens
            assert [tokens[i - 1] for i in cat[:, j]] == EXPECTED[name], name


def test_a_malformed_timestamp_names_file_line_and_column(tmp_path):
    rows = ROWS[:2] + [("1", "14132100", "a")]  # month 13
    with pytest.raises(DataError, match=r"line 4.*'hour'.*YYMMDDHH"):
        prepare(config_from_dict(_raw(tmp_path, rows)), **QUIET)


def test_serving_takes_the_source_column_and_matches_predict(tmp_path):
    from deepfm.pipeline import train
    from deepfm.predict import Predictor
    from deepfm.serve.app import ServedModel
    from deepfm.serve.encode import RequestError, frame_probs

    res = train(config_from_dict(_raw(tmp_path, ROWS * 4)), tmp_path / "m", log=lambda _m: None)
    served = ServedModel.load(res.model_dir)
    assert not served.fast.enabled and set(served.fields) == {"hour", "site"}
    rows = served.validate([{"hour": "14102623", "site": "a"}, {"hour": 14102100}])
    expected = Predictor(res.model_dir).predict_proba(pl.DataFrame({"hour": ["14102623", "14102100"],
                                                                    "site": ["a", None]}))
    np.testing.assert_allclose(frame_probs(served.predictor, rows), expected, rtol=0, atol=1e-12)
    with pytest.raises(RequestError):
        served.validate([{"weekday": "2"}])
