"""The fast preparation path gives exactly the general path's vocabularies and arrays, and steps aside for
anything it cannot do exactly (bad values keep their file/line/field errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepfm.config import config_from_dict
from deepfm.data import fastpath
from deepfm.data.encoder import Encoder
from deepfm.data.store import prepare
from deepfm.errors import DataError

from conftest import criteo_config_dict

QUIET = {"progress": False, "log": lambda _m: None}


def _both(raw: dict, tmp_path, monkeypatch):
    """Prepare ``raw`` by the fast path (which must apply) and by the general path."""
    cfg = config_from_dict(raw)
    assert fastpath.why_not(cfg) is None
    calls = []
    real = fastpath.prepare_splits

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fastpath, "prepare_splits", spy)
    fast = prepare(cfg, **QUIET)
    assert calls and fast.manifest.get("fast_path"), "the fast path did not run"
    monkeypatch.setattr(fastpath, "why_not", lambda _cfg: "off")
    general = prepare(config_from_dict({**raw, "data": {**raw["data"], "cache_dir": str(tmp_path / "general")}}),
                      **QUIET)
    return fast, general


def _stream(monkeypatch) -> list:
    """Make every file 'large': parsed in 64 KB blocks, grouped into chunks of ~1,000 rows."""
    chunks: list = []
    real = fastpath._fit_streamed
    monkeypatch.setattr(fastpath, "_fit_streamed", lambda cfg, enc, it, w: real(cfg, enc, (chunks.append(t) or t
                                                                                          for t in it), w))
    monkeypatch.setattr(fastpath, "WHOLE_FILE_BYTES", 0)
    monkeypatch.setattr(fastpath, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(fastpath, "CHUNK_ROWS", 1000)
    return chunks


def _assert_same(fast, general, num_atol: float = 0.0) -> None:
    assert json.dumps(fast.encoder.to_json(), sort_keys=True) == json.dumps(general.encoder.to_json(), sort_keys=True) \
        or num_atol > 0
    for name, v in general.encoder.vocabularies_.items():
        assert fast.encoder.vocabularies_[name].tokens == v.tokens, name
    assert fast.manifest["layout"] == general.manifest["layout"]
    assert fast.splits.keys() == general.splits.keys()
    for name, g in general.splits.items():
        f = fast.splits[name]
        np.testing.assert_array_equal(f.labels, g.labels)
        np.testing.assert_array_equal(f.cat_ids, g.cat_ids)
        np.testing.assert_allclose(f.num_values, g.num_values, atol=num_atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("streamed", [False, True])
def test_fast_path_equals_the_general_path_on_the_criteo_sample(tmp_path, monkeypatch, streamed):
    chunks = _stream(monkeypatch) if streamed else []
    fast, general = _both(criteo_config_dict(tmp_path), tmp_path, monkeypatch)
    _assert_same(fast, general)
    assert len(chunks) == (7 if streamed else 0)  # 7,200 training rows in chunks of ~1,000
    assert len(fast.splits["test"]) == 391


@pytest.mark.parametrize("streamed", [False, True])
def test_fast_path_equals_the_general_path_on_every_field_kind(tmp_path, monkeypatch, streamed):
    rng = np.random.default_rng(0)
    cells = ["", "1", "2", "2.5", "3", "7", "1e3", "-3.5", "-0.5", "1e30", "0", "+4", ".5", "123456"]

    def write(path, n):
        lines = ['label,id,city,home,away,tag,count,price,score']
        for i in range(n):
            city = rng.choice(["paris", "oslo", "", "a,b", "x y", "Zürich", "0042", "42"])
            quoted = f'"{city}"' if "," in city else city
            lines.append(",".join([
                str(int(rng.integers(0, 2))), f"u{i}", quoted,
                rng.choice(["t1", "t2", "t3", "t9"]), rng.choice(["t1", "t2", "t4", ""]),
                f"tag{int(rng.zipf(1.5)) % 50}", rng.choice(cells), rng.choice(cells[:10]), rng.choice(cells[:9]),
            ]))
        path.write_text("\n".join(lines) + "\n")

    if streamed:
        _stream(monkeypatch)
    for name, n in (("train.csv", 3000), ("valid.csv", 500), ("test.csv", 400)):
        write(tmp_path / name, n)
    raw = {
        "data": {"format": "csv", "train": str(tmp_path / "train.csv"), "valid": str(tmp_path / "valid.csv"),
                 "test": str(tmp_path / "test.csv"), "id_columns": ["id"], "cache_dir": str(tmp_path / "fast")},
        "fields": [
            {"name": "city", "min_count": 3},
            {"names": ["home", "away"], "vocab": "team"},  # one shared vocabulary
            {"name": "tag", "hash_buckets": 17},
            {"name": "count", "kind": "numeric", "numeric": "log_bucket", "min_count": 2},
            # standardize needs its statistics before encoding: the streamed path hands it to the general path
            {"name": "price", "kind": "numeric", "numeric": "scale" if streamed else "standardize", "log1p": True},
            {"name": "score", "kind": "numeric", "numeric": "scale"},
        ],
        "model": {"embed_dim": 4, "hidden_units": [8]},
    }
    fast, general = _both(raw, tmp_path, monkeypatch)
    _assert_same(fast, general, num_atol=1e-6)


@pytest.mark.parametrize(("cell", "message"), [("abc", "is not a finite number"), ("inf", "is not a finite number"),
                                               ("1e39", "is not a finite number")])
def test_a_bad_value_still_names_file_line_and_field(tmp_path, cell, message):
    train = tmp_path / "train.csv"
    train.write_text("label,a,n\n1,x,1\n0,y,2\n1,x," + cell + "\n0,y,4\n")
    raw = {"data": {"format": "csv", "train": str(train), "cache_dir": str(tmp_path / "c")},
           "fields": [{"name": "a"}, {"name": "n", "kind": "numeric", "numeric": "scale"}]}
    with pytest.raises(DataError) as err:
        prepare(config_from_dict(raw), **QUIET)
    text = str(err.value)
    assert str(train) in text and "line 4" in text and "'n'" in text and message in text, text
    assert not any((tmp_path / "c").glob("*/manifest.json"))


def test_fast_path_steps_aside_for_malformed_rows_and_bad_labels(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("label,a\n1,x\n0,y,extra\n")
    raw = {"data": {"format": "csv", "train": str(train), "cache_dir": str(tmp_path / "c")},
           "fields": [{"name": "a"}]}
    cfg = config_from_dict(raw)
    with pytest.raises(fastpath.Unsupported):
        fastpath.prepare_splits(cfg, Encoder(cfg.fields, cfg.data), lambda _name: None)
    with pytest.raises(DataError, match=r"train\.csv, line 3"):
        prepare(config_from_dict(raw), **QUIET)
    train.write_text("label,a\n1,x\n2,y\n")
    with pytest.raises(DataError, match="label must be 0 or 1"):
        prepare(config_from_dict(raw), **QUIET)
