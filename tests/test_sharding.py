"""Row sharding of the embedding table (train.embedding_sharding: row) on gloo ranks over loopback.

One small data set with every field kind (categorical, two fields sharing one vocabulary, a scaled numeric
field with missing values, a log-bucketed numeric field, a multi-valued field) trained the same way by one
process, by 2 and 4 row-sharded ranks and by 2 replicated ranks; the runs are shared by the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, logged_epochs
from safetensors.torch import load_file

from deepfm.config import config_from_dict
from deepfm.errors import ConfigError
from deepfm.pipeline import train
from deepfm.train.distributed import DistContext
from deepfm.train.sharding import checkpoint_part

WORKER = Path(__file__).with_name("dist_worker.py")
CLIP = {"grad_clip_norm": 0.05}  # small enough to bind at every step of this data


def _write_data(folder: Path) -> None:
    rng = np.random.default_rng(7)
    rows = ["label,user,src,dst,x,n,tags"]
    for i in range(1600):
        user, src, dst = rng.integers(0, 300), rng.integers(0, 40), rng.integers(0, 40)
        tags = rng.choice(60, size=rng.integers(0, 5), replace=False)
        x = "" if i % 11 == 0 else f"{rng.normal():.3f}"
        logit = float(user % 3 == 0) - float(src == dst) + 0.5 * (0 if x == "" else float(x)) + 0.3 * sum(t < 20 for t in tags)
        y = int(rng.random() < 1 / (1 + np.exp(-(logit - 0.5))))
        rows.append(f"{y},u{user},c{src},c{dst},{x},{rng.integers(0, 50)},{'^'.join(f't{t}:{1 + t % 3}' for t in tags)}")
    (folder / "train.csv").write_text("\n".join(rows[:1281]) + "\n")
    (folder / "valid.csv").write_text("\n".join([rows[0]] + rows[1281:]) + "\n")


def _config(folder: Path, sharding: str, **train_over) -> dict:
    return {
        "data": {"format": "csv", "train": str(folder / "train.csv"), "valid": str(folder / "valid.csv"),
                 "cache_dir": str(folder / "cache")},
        "fields": [{"name": "user"}, {"names": ["src", "dst"], "vocab": "city"},
                   {"name": "x", "kind": "numeric", "numeric": "scale"}, {"name": "n", "kind": "numeric"},
                   {"name": "tags", "kind": "multi", "combiner": "sqrtn"}],
        "model": {"embed_dim": 4, "hidden_units": [16, 8], "dropout": 0.0},
        "train": {"batch_size": 128, "epochs": 1, "lr": 0.01, "precision": "fp32", "progress": False,
                  "checkpoint_every_steps": 4, "patience": 5, "dist_timeout_s": 60, "embedding_sharding": sharding,
                  **train_over},
    }


def _torchrun(spec: dict, nproc: int, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), json.dumps(spec)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (model directory, stdout, per-rank table state bytes) of each run, made once for the module."""
    folder = tmp_path_factory.mktemp("sharding")
    _write_data(folder)
    out: dict[str, tuple[Path, str, list[int]]] = {}
    one = train(config_from_dict(_config(folder, "replicated")), folder / "one", log=lambda _m: None)
    out["one"] = (one.model_dir, "", [_table_bytes(one.trainer)])
    clipped = train(config_from_dict(_config(folder, "replicated", **CLIP)), folder / "one_clip", log=lambda _m: None)
    out["one_clip"] = (clipped.model_dir, "", [])
    # row4 clips the global gradient norm (summed over the shards), row2 overlaps the gradient exchange
    for name, sharding, nproc, extra in (("row2", "row", 2, {}), ("replicated2", "replicated", 2, {}),
                                         ("row4", "row", 4, CLIP)):
        bytes_file = folder / f"{name}.bytes"
        proc = _torchrun({"config": _config(folder, sharding, **extra), "output": str(folder / name),
                          "table_bytes": str(bytes_file)}, nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        sizes = [int((folder / f"{name}.bytes.{r}").read_text()) for r in range(nproc)]
        out[name] = (folder / name, proc.stdout, sizes)
    out["folder"] = (folder, "", [])
    return out


def _table_bytes(trainer) -> int:
    from deepfm.train.memory import table_state_bytes

    return table_state_bytes(trainer.model, trainer.optimizers)


@pytest.mark.parametrize("name, reference", [("row2", "one"), ("row4", "one_clip"), ("replicated2", "one")])
def test_sharded_ranks_give_the_weights_of_one_process(runs, name, reference):
    one = load_file(str(runs[reference][0] / "model.safetensors"))
    got = load_file(str(runs[name][0] / "model.safetensors"))
    assert got.keys() == one.keys() and got["embedding.weight"].shape == one["embedding.weight"].shape
    for key in one:  # same global batch, seed and initial values: only float summation order differs
        torch.testing.assert_close(got[key], one[key], rtol=1e-4, atol=2e-6, msg=key)
    m1 = json.loads((runs[reference][0] / "metrics.json").read_text())
    m2 = json.loads((runs[name][0] / "metrics.json").read_text())
    assert m2["valid"]["auc"] == pytest.approx(m1["valid"]["auc"], abs=1e-4)
    assert m2["valid"]["rows"] == m1["valid"]["rows"] == 320
    assert m2["train"]["steps"] == m1["train"]["steps"] == 10


def test_row_sharded_model_directory_matches_and_predicts(runs):
    from deepfm.predict import Predictor

    one, row = runs["one_clip"][0], runs["row4"][0]
    assert sorted(p.name for p in row.iterdir()) == sorted(p.name for p in one.iterdir())
    valid = str(runs["folder"][0] / "valid.csv")
    m_row = Predictor(row).evaluate_file(valid, progress=False)
    assert m_row["auc"] == pytest.approx(json.loads((row / "metrics.json").read_text())["valid"]["auc"], abs=1e-9)
    assert m_row["auc"] == pytest.approx(Predictor(one).evaluate_file(valid, progress=False)["auc"], abs=1e-4)
    # the optimiser state, gathered from the shards like the table: the one-process state, whole
    want, got = (load_file(str(d / "optimizer.safetensors")) for d in (one, row))
    assert want.keys() == got.keys() and got["s.optimizers.0.state.0.exp_avg"].shape == want[
        "s.optimizers.0.state.0.exp_avg"].shape
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-6, msg=key)
    clip, no_clip = (load_file(str(runs[k][0] / "model.safetensors"))["embedding.weight"] for k in ("one_clip", "one"))
    assert (clip - no_clip).abs().max() > 1e-3  # clipping changed the result: row4's match above is not vacuous


def test_a_row_sharded_model_is_explained_like_its_one_process_twin(runs):
    """Per-row attributions of the model the row-sharded ranks wrote sum to its logit and equal (to the training
    tolerance) those of the one-process model; deepfm explain reads it like any model directory."""
    import polars as pl

    from deepfm.artifact import load_model
    from deepfm.explain import explain_data, explain_rows
    from deepfm.predict import Predictor

    pytest.importorskip("captum")
    valid = runs["folder"][0] / "valid.csv"
    frame = pl.read_csv(valid)
    got = {}
    for name in ("row4", "one_clip"):
        attr = explain_rows(load_model(runs[name][0]), frame)
        p = Predictor(runs[name][0]).predict_proba(frame)
        np.testing.assert_allclose(attr.to_numpy().sum(axis=1), np.log(p) - np.log1p(-p), rtol=0, atol=1e-4)
        got[name] = attr.to_numpy()
    np.testing.assert_allclose(got["row4"], got["one_clip"], rtol=0, atol=1e-3)
    report = explain_data(load_model(runs["row4"][0]), str(valid), seeds=2)
    assert report["rows"] == 320 and len(report["importance"]) == len(report["fields"])


def test_each_rank_holds_a_1_over_n_share_of_the_table_and_its_adam_state(runs):
    (whole,) = runs["one"][2]
    rows = load_file(str(runs["one"][0] / "model.safetensors"))["embedding.weight"].shape[0]
    row_bytes = whole // rows  # weight + exp_avg + exp_avg_sq per row
    assert row_bytes == 3 * 5 * 4
    for name, n in (("row2", 2), ("row4", 4)):
        sizes = runs[name][2]
        assert sum(sizes) == whole, (name, sizes, whole)
        assert max(sizes) <= -(-rows // n) * row_bytes  # each rank: its ceil(rows / n) rows and their state
        assert max(sizes) - min(sizes) <= n * row_bytes
    assert runs["replicated2"][2] == [whole, whole]


def test_bytes_sent_per_step_are_printed_per_rank(runs):
    for name, n in (("row2", 2), ("row4", 4), ("replicated2", 2)):
        history = [json.loads(line) for line in (runs[name][0] / "metrics.jsonl").read_text().splitlines()]
        sent = history[0]["table_sent_bytes_per_step"]
        assert len(sent) == n and all(b > 0 for b in sent), sent
        assert history[0]["dense_allreduce_bytes_per_step"] > 0
        assert "sent per step and rank: table" in runs[name][1]
    # row: ids out, rows back, gradients back (~2 rows per unique id); replicated: every rank's gradient rows
    # to every other rank: with 2 ranks of similar batches the row exchange sends less
    row2 = json.loads((runs["row2"][0] / "metrics.jsonl").read_text().splitlines()[0])
    rep2 = json.loads((runs["replicated2"][0] / "metrics.jsonl").read_text().splitlines()[0])
    assert max(row2["table_sent_bytes_per_step"]) < 2 * max(rep2["table_sent_bytes_per_step"])


def test_resume_of_a_row_sharded_run_gives_the_same_model(runs):
    folder = runs["folder"][0]
    raw = _config(folder, "row")
    out = folder / "resumed"
    stopped = _torchrun({"config": raw, "output": str(out), "stop_step": 6}, 2)  # checkpoint at step 4
    assert stopped.returncode != 0 and not out.exists()
    last = folder / ".resumed.run" / "last"
    assert sorted(p.name for p in last.iterdir()) == ["rank-0", "rank-1", "state.json"]
    for world in (1, 3, 4):
        for rank in range(world):
            with pytest.raises(ConfigError, match=f"not a checkpoint of {world} row-sharded ranks"):
                checkpoint_part(last, DistContext(rank, world))
    with pytest.raises(ConfigError, match="checkpoint of row-sharded ranks; resume with train.embedding_sharding"):
        checkpoint_part(last, DistContext(0, 2), sharded=False)
    resumed = _torchrun({"config": raw, "output": str(out), "resume": True}, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    a, b = load_file(str(runs["row2"][0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # each rank's share of the resumed epoch's running loss came back from its own part of the checkpoint
    assert logged_epochs(out) == logged_epochs(runs["row2"][0]) and len(logged_epochs(out)) == 1


def test_a_replicated_table_over_the_memory_cap_fails_naming_the_cap(tmp_path):
    """The small half of bench/memory_cap.py (where 2 row-sharded ranks train the same table under the same
    cap to the uncapped AUC): 10.4M rows x 17 floats with Adam's moments (2.1 GB) under a 3,500 MiB cap."""
    from conftest import criteo_config_dict

    raw = criteo_config_dict(tmp_path, epochs=1, max_steps=2)
    raw["fields"][1].pop("min_count", None)
    raw["fields"][1]["hash_buckets"] = 400_000
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rank.py"), "--cap-mib", "3500", "--report",
                           str(tmp_path / "rep"), "--", "train", str(cfg), "--output", str(tmp_path / "m")],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "address-space limit (RLIMIT_AS) of 3,500 MiB" in error and "10,400,605 rows x 17" in error
    assert "2,023 MiB on each rank with embedding_sharding: replicated" in error and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
    assert json.loads((tmp_path / "rep" / "rank-0.json").read_text())["exit"] == 2


def test_row_sharding_needs_sparse_updates(tmp_path):
    raw = _config(tmp_path, "row", sparse=False)
    with pytest.raises(ConfigError, match="embedding_sharding: row .* set train.sparse: true"):
        config_from_dict(raw)


def test_a_streamed_table_is_written_block_by_block_as_a_safetensors_file(tmp_path):
    from deepfm.io import StreamedTensor, atomic_save_tensors

    table = torch.randn(1001, 5)
    small = {"bias": torch.tensor([0.5]), "offsets": torch.arange(3)}
    atomic_save_tensors(small, tmp_path / "m.safetensors", {"format": "x"},
                        StreamedTensor("embedding.weight", (1001, 5), torch.float32, iter(table.split(300))))
    got = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(got["embedding.weight"], table) and torch.equal(got["offsets"], small["offsets"])
    assert torch.equal(got["bias"], small["bias"])
    with pytest.raises(ValueError, match="blocks hold 12000 bytes, the shape"):
        atomic_save_tensors(small, tmp_path / "short.safetensors",
                            streamed=StreamedTensor("t", (1001, 5), torch.float32, iter(table[:600].split(300))))
    assert not (tmp_path / "short.safetensors").exists()


def test_training_further_under_row_sharding_is_refused_before_joining_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = config_from_dict(_config(tmp_path, "row"))
    with pytest.raises(ConfigError, match="--init-from .*parent: training further with train.embedding_sharding: row"):
        train(cfg, tmp_path / "m", init_from=tmp_path / "parent", log=lambda _m: None)


def test_replicated_ranks_with_dense_table_updates_give_the_weights_of_one_process(tmp_path):
    """train.sparse: false over 2 ranks: the table's dense gradient is averaged over the ranks by its placement
    (the table is outside the module DDP wraps), then every rank steps dense Adam with whole-table L2 and the
    global gradient norm clipped. The model, its optimiser state and its metrics: those of one process."""
    _write_data(tmp_path)
    raw = _config(tmp_path, "replicated", sparse=False, embedding_l2=1e-3, embedding_l2_scope="table", **CLIP)
    one = train(config_from_dict(raw), tmp_path / "one", log=lambda _m: None).model_dir
    proc = _torchrun({"config": raw, "output": str(tmp_path / "two")}, 2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = tmp_path / "two"
    for name in ("model.safetensors", "optimizer.safetensors"):
        want, got = (load_file(str(d / name)) for d in (one, two))
        assert got.keys() == want.keys(), name
        for key in want:  # same global batch, seed and initial values: only float summation order differs
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["valid"]["auc"] == pytest.approx(m1["valid"]["auc"], abs=1e-4)
    assert m2["valid"]["rows"] == m1["valid"]["rows"] == 320 and m2["train"]["ranks"] == 2
    assert m2["train"]["steps"] == m1["train"]["steps"] == 10
    history = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    table = load_file(str(one / "model.safetensors"))["embedding.weight"]
    ring = round(2 * (2 - 1) / 2 * table.numel() * 4)  # the table's gradient all-reduced (as a ring) every step
    assert history[0]["table_sent_bytes_per_step"] == [ring, ring]
    dense = sum(t.numel() * 4 for k, t in load_file(str(one / "model.safetensors")).items()
                if t.is_floating_point() and k != "embedding.weight")
    assert history[0]["dense_allreduce_bytes_per_step"] == round(2 * (2 - 1) / 2 * dense)  # without the table
