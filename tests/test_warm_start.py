"""Training further on new data (``--init-from``): vocabularies grow (and evict under max_size), known ids keep
their rows and optimiser state bitwise, new ids get fresh rows, the grown model predicts old rows as its parent
did before any step, the model directory records its lineage, and the server reloads the new version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import _serve_models as models
from deepfm.artifact import load_model
from deepfm.cli import main as cli_main
from deepfm.config import config_from_dict, load_config
from deepfm.data.batch import input_from_chunk
from deepfm.data.readers import read_chunks
from deepfm.data.store import prepare
from deepfm.data.vocab import OOV_ID, VocabularyCounter, growth
from deepfm.errors import ConfigError
from deepfm.pipeline import build_model
from deepfm.train.trainer import Trainer
from deepfm.train.warm import carry_optimizer_state, check_compatible, table_source, warm_start

QUIET = {"progress": False, "log": lambda _m: None}


# ------------------------------------------------------------------------------------------ vocabularies
def _counter(values: list[str], min_count: int = 1, max_size: int | None = None) -> VocabularyCounter:
    c = VocabularyCounter("v", min_count, None, max_size)
    c.update(pl.Series(values))
    return c


def test_growth_keeps_ids_and_appends_new_tokens_passing_min_count_on_new_data():
    parent = _counter(["a", "a", "b", "c"]).build()
    assert parent.tokens == ["a", "b", "c"] and parent.generation == 0
    child = _counter(["z", "z", "y", "b", "x", "x", "x"], min_count=2).grow(parent)
    assert child.tokens == ["a", "b", "c", "x", "z"]  # 'y' seen once: below min_count on the new data
    assert child.generation == 1 and child.last_seen == [0, 1, 0, 1, 1] and child.counts == [2, 1, 1, 3, 2]
    g = growth(parent, child)
    assert g.source.tolist() == [0, 1, 2, 3, -1, -1] and (g.added, g.evicted) == (2, 0)


def test_max_size_evicts_least_recently_then_least_frequently_seen_and_they_map_to_oov():
    parent = _counter(["a"] * 5 + ["b"] * 3 + ["c"], max_size=3).build()
    assert parent.tokens == ["a", "b", "c"]
    child = _counter(["c", "n", "n"], max_size=3).grow(parent)
    # candidates a (gen 0, 5), b (gen 0, 3), c (gen 1), n (gen 1): b is the least recently and frequently seen
    assert child.tokens == ["a", "c", "n"]
    assert growth(parent, child).source.tolist() == [0, 1, 3, -1]
    ids = child.encode(pl.Series(["b", "a", "n"]))
    assert ids.tolist() == [OOV_ID, 1, 3]


def test_hashed_vocabulary_is_unchanged():
    parent = VocabularyCounter("h", 1, 16).build()
    c = VocabularyCounter("h", 1, 16)
    c.update(pl.Series(["new"]))
    assert c.grow(parent) is parent
    with pytest.raises(ValueError, match="hash_buckets changed"):
        VocabularyCounter("h", 1, 32).grow(parent)


# ------------------------------------------------------------------------------------------ the model
def _new_day(tmp_path: Path) -> Path:
    """The multi model's data shape, other rows, plus ids never seen (users, tags)."""
    rows = models.multi_rows(600, seed=9)
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r[1] = f"newuser{i % 40}"
            r[6] = f"newtag{i % 7}:1.5^" + r[6] if r[6] else f"newtag{i % 7}"
    return models.write_csv(tmp_path / "day2.csv", rows)


def _child(tmp_path: Path):
    parent = load_model(models.multi_model())
    raw = json.loads(json.dumps(parent.config.model_dump(mode="json", exclude={"fields": {"__all__": {"names"}}})))
    raw["data"].update(train=str(_new_day(tmp_path)), valid=None, cache_dir=str(tmp_path / "cache"))
    cfg = config_from_dict(raw)
    data = prepare(cfg, parent=parent.encoder, **QUIET)
    return parent, cfg, data


def test_known_rows_and_optimizer_state_move_bitwise_new_rows_start_fresh(tmp_path):
    parent, cfg, data = _child(tmp_path)
    vocabs = data.encoder.fitted_state()[0]
    assert len(vocabs["user"].tokens) > len(parent.encoder.fitted_state()[0]["user"].tokens)
    assert vocabs["site"].hash_buckets == 64 and data.layout.vocab_blocks["site"][1] == 64
    source = table_source(parent.layout, data.layout, parent.encoder.fitted_state()[0], vocabs)
    assert (source >= 0).sum() == parent.layout.num_rows  # no eviction: every parent row continues
    fresh = build_model(cfg, data)
    model = build_model(cfg, data)
    warm_start(model, parent.model.state_dict(), source)
    old_table, table = parent.model.embedding.weight.detach(), model.embedding.weight.detach()
    kept = np.flatnonzero(source >= 0)
    assert torch.equal(table[kept], old_table[source[kept]])
    new = np.flatnonzero(source < 0)
    assert len(new) > 0 and torch.equal(table[new], fresh.embedding.weight.detach()[new])
    for name, tensor in parent.model.state_dict().items():
        if not name.startswith("embedding."):  # the table moved above; its offsets describe the new layout
            assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model.embedding.cat_offsets, fresh.embedding.cat_offsets)
    # optimiser state: moved with the rows; new rows start at zero
    trainer = Trainer(model, cfg.train, tmp_path / "run", log=lambda _m: None)
    saved = parent.optimizer_state()
    assert saved is not None
    carry_optimizer_state(trainer.optimizers, saved, model.embedding.weight, source, parent.layout.num_rows)
    state = trainer.optimizers[0].state[model.embedding.weight]
    old_state = saved[0]["state"][0]
    assert state["step"] == old_state["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][kept], old_state[key][source[kept]])
        assert not state[key][new].any()
    dense_after = trainer.optimizers[1].state_dict()["state"]
    for k, v in saved[1]["state"].items():
        for key, t in v.items():
            assert torch.equal(torch.as_tensor(dense_after[int(k)][key]), torch.as_tensor(t)), (k, key)


def test_grown_model_predicts_old_rows_as_its_parent_before_any_step(tmp_path):
    parent, cfg, data = _child(tmp_path)
    model = build_model(cfg, data)
    warm_start(model, parent.model.state_dict(), table_source(parent.layout, data.layout,
                                                              parent.encoder.fitted_state()[0],
                                                              data.encoder.fitted_state()[0]))
    model.eval()
    old_csv = models.workdir() / "multi-data" / "valid.csv"  # rows whose ids the parent knew
    chunk = next(read_chunks(str(old_csv), cfg.data))
    with torch.no_grad():
        before = parent.model(*input_from_chunk(parent.encoder.transform(chunk)).tensors())
        after = model(*input_from_chunk(data.encoder.transform(chunk)).tensors())
    assert torch.equal(before, after)


def test_cli_init_from_records_lineage_grows_and_evicts(tmp_path, capsys):
    parent_dir = models.criteo_model()
    cfg = tmp_path / "day2.yaml"
    base = load_config(models.CRITEO / "config.yaml").model_dump(mode="json", exclude={"fields": {"__all__": {"names"}}})
    import yaml

    raw = json.loads(json.dumps(base))
    raw["data"].update(train=str(models.CRITEO / "data" / "test.tsv"), cache_dir=str(tmp_path / "cache"))
    raw["model"]["hidden_units"] = [32, 32]
    raw["train"].update(epochs=1, progress=False)
    for f in raw["fields"]:
        if f["name"] == "C3":
            f["max_size"] = 50
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "day2"
    assert cli_main(["train", str(cfg), "--output", str(out), "--init-from", str(parent_dir)]) == 0
    err = capsys.readouterr().err
    assert f"Training further from {parent_dir}" in err and "optimiser state carried over" in err
    info = json.loads((out / "deepfm.json").read_text())
    lineage = info["lineage"]
    assert lineage["generation"] == 1 and lineage["parent"]["path"] == str(parent_dir.resolve())
    parent_info = json.loads((parent_dir / "deepfm.json").read_text())
    assert lineage["parent"]["data_fingerprint"] == parent_info["data_fingerprint"]
    c3 = lineage["vocabularies"]["C3"]
    assert c3["rows"] == 51 and c3["evicted"] > 0
    assert any(v["added"] > 0 for v in lineage["vocabularies"].values())
    child = load_model(out)
    assert len(child.encoder.fitted_state()[0]["C3"].tokens) == 50
    # a second generation keeps the ancestry
    out3 = tmp_path / "day3"
    assert cli_main(["train", str(cfg), "--output", str(out3), "--init-from", str(out), "--reset-optimizer"]) == 0
    assert "optimiser state afresh" in capsys.readouterr().err
    lineage3 = json.loads((out3 / "deepfm.json").read_text())["lineage"]
    assert lineage3["generation"] == 2 and [a["path"] for a in lineage3["ancestry"]] == \
        [str(parent_dir.resolve()), str(out.resolve())]


def test_init_from_rejects_another_model_shape(tmp_path):
    parent = load_model(models.criteo_model())
    other = parent.config.model_copy(update={"model": parent.config.model.model_copy(update={"embed_dim": 4})})
    with pytest.raises(ConfigError, match="model settings differ from the parent's: embed_dim"):
        check_compatible(parent.config, other)
    fewer = parent.config.model_copy(update={"fields": parent.config.fields[1:]})
    with pytest.raises(ConfigError, match="fields differ"):
        check_compatible(parent.config, fewer)


def test_server_reload_serves_the_grown_model(tmp_path):
    from fastapi.testclient import TestClient

    from deepfm.predict import Predictor
    from deepfm.serve.app import ServeSettings, create_app

    parent_dir = models.multi_model()
    parent, cfg, _ = _child(tmp_path)
    from deepfm.pipeline import train

    out = tmp_path / "grown"
    train(cfg, out, log=lambda _m: None, init_from=parent_dir)
    settings = ServeSettings(admin_token="t0ken", model_root=str(tmp_path))  # the grown model is under tmp_path
    client = TestClient(create_app(parent_dir, settings))
    rows = [{"id": i, "features": {"user": f"newuser{i}", "tags": [["newtag1", 1.5], "t3"], "price": 12.5}}
            for i in range(3)]
    v1 = client.post("/v1/predict", json={"rows": rows}).json()
    ok = client.post("/v1/reload", json={"model_dir": str(out)}, headers={"authorization": "Bearer t0ken"})
    assert ok.status_code == 200
    v2 = client.post("/v1/predict", json={"rows": rows}).json()
    assert v2["model_version"] == ok.json()["version"] != v1["model_version"]
    frame = pl.DataFrame({"user": [f"newuser{i}" for i in range(3)], "tags": ["newtag1:1.5^t3"] * 3,
                          "price": ["12.5"] * 3, **{c: pl.Series([None] * 3, dtype=pl.Utf8)
                                                   for c in ("site", "age", "clicks", "cats", "query")}})
    expected = Predictor(out).predict_proba(frame)
    assert np.allclose([p["probability"] for p in v2["predictions"]], expected, rtol=0, atol=1e-12)
