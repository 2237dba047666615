"""Preparation on every rank (data.prepare_on: every_rank): each rank reads a disjoint share of the files, the
vocabularies and statistics are merged with collectives, each rank keeps its rows and trains on them.

Checked against one process: the same encoder bit for bit, the same encoded rows as a set (2 and 4 ranks), a
2-rank training run within 0.005 validation AUC; the per-rank plan of steps agrees across ranks and resumes."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CRITEO, ROOT, criteo_config_dict, logged_epochs
from deepfm.config import TrainConfig, config_from_dict
from deepfm.data.ranked import assign_files
from deepfm.data.store import prepare
from deepfm.errors import ConfigError
from deepfm.train.folders import check_parts, choose_part
from deepfm.train.rowshare import LocalRows

WORKER = Path(__file__).with_name("ranked_worker.py")
DIST_WORKER = Path(__file__).with_name("dist_worker.py")
LINES = (CRITEO / "data" / "train.tsv").read_bytes().splitlines(keepends=True)


def test_files_are_shared_out_balanced_by_size_and_the_same_on_every_rank():
    sizes = [100, 5, 70, 30, 30, 60, 1, 40]
    shares = assign_files(sizes, 3)
    assert sorted(k for s in shares for k in s) == list(range(len(sizes)))
    loads = [sum(sizes[k] for k in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes) and loads == [100, 111, 110] or max(loads) <= 1.2 * sum(sizes) / 3
    assert shares == assign_files(sizes, 3)
    assert assign_files(sizes, 1) == [list(range(len(sizes)))]


def test_local_rows_plan_agrees_on_steps_wraps_around_and_resumes():
    cfg = TrainConfig(batch_size=64, seed=3)
    counts = [500, 120]  # uneven: rank 1 wraps around within an epoch
    plans = [LocalRows(r, 2, counts).plan(counts[r], 64, cfg, epoch=0) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == -(-620 // 64)
    for r, plan in enumerate(plans):
        rows = np.concatenate(plan)
        assert rows.min() >= 0 and rows.max() < counts[r] and all(len(b) == 32 for b in plan)
    # rank 1 takes all its rows once before any twice (the 4th batch straddles its passes)
    seen = np.concatenate(plans[1])
    assert len(np.unique(seen[:96])) == 96 and len(np.unique(seen[:128])) == 120
    # epochs continue the stream; a plan is a function of the epoch alone (resume mid-epoch takes the rest)
    again = LocalRows(0, 2, counts).plan(500, 64, cfg, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, plans[0], strict=True))
    second = np.concatenate(LocalRows(0, 2, counts).plan(500, 64, cfg, epoch=1))
    first = np.concatenate(plans[0])
    assert len(np.unique(np.concatenate([first, second])[:480])) == 480  # epoch 2 goes on through rank 0's rows


def _parts(folder: Path, n: int = 7) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(LINES), n + 1).astype(int)
    cuts[1:-1] += np.arange(1, n) * 91  # uneven sizes
    for k in range(n):
        (folder / f"part-{k:05d}.tsv.gz").write_bytes(gzip.compress(b"".join(LINES[cuts[k]:cuts[k + 1]])))
    return str(folder)


def _raw(tmp_path: Path, train: str, **extra) -> dict:
    raw = criteo_config_dict(tmp_path, epochs=2, batch_size=512, dist_timeout_s=60, patience=5)
    raw["model"].update({"hidden_units": [64, 32], "dropout": 0.0})
    raw["data"].update({"train": train, "cache_dir": str(tmp_path / "cache"), **extra})
    if "valid" not in extra:
        raw["data"].pop("valid"), raw["data"].pop("test")
    raw["fields"][0] = {**raw["fields"][0], "numeric": "standardize"}  # fitted statistics: summed per chunk
    return raw


def _torchrun(worker: Path, spec: dict, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(worker), json.dumps(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})


def _row_set(cat: np.ndarray, num: np.ndarray, labels: np.ndarray) -> list[bytes]:
    return sorted(np.concatenate([cat.astype(np.float64), np.nan_to_num(num, nan=-9e9).astype(np.float64),
                                  labels[:, None].astype(np.float64)], axis=1).tobytes(order="C")[i * 8 * (
                                      cat.shape[1] + num.shape[1] + 1):(i + 1) * 8 * (cat.shape[1] + num.shape[1] + 1)]
                  for i in range(len(labels)))


@pytest.mark.parametrize("nproc", [2, 4])
def test_ranks_prepare_the_vocabularies_and_rows_of_one_process(tmp_path, nproc):
    train = _parts(tmp_path / "logs")
    extra = {"split": {"valid": 0.1, "test": 0.1, "seed": 5}, "negative_sampling_rate": 0.6, "chunk_rows": 700}
    one = prepare(config_from_dict(_raw(tmp_path / "one", train, **extra)), progress=False, log=lambda _m: None)
    raw = _raw(tmp_path / "many", train, prepare_on="every_rank", **extra)
    proc = _torchrun(WORKER, {"config": raw, "dump": str(tmp_path / "dump")}, nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_encoder = json.dumps(one.encoder.to_json(), sort_keys=True)
    dumps = [np.load(tmp_path / f"dump.{r}.npz") for r in range(nproc)]
    for r in range(nproc):
        got = json.loads((tmp_path / f"dump.{r}.json").read_text())
        assert json.dumps(got["encoder"], sort_keys=True) == want_encoder, f"rank {r}"
        assert got["manifest"]["layout"] == one.manifest["layout"]
        assert got["manifest"]["ranks"]["world_size"] == nproc
    files_read = [set(json.loads((tmp_path / f"dump.{r}.json").read_text())["manifest"]["ranks"]["train_files"])
                  for r in range(nproc)]
    assert sum(len(f) for f in files_read) == 7 and len(set.union(*files_read)) == 7  # disjoint shares
    for name, split in one.splits.items():
        cat = np.concatenate([d[f"{name}_cat_ids"] for d in dumps]) if name == "train" else dumps[0][f"{name}_cat_ids"]
        num = np.concatenate([d[f"{name}_num_values"] for d in dumps]) if name == "train" else \
            dumps[0][f"{name}_num_values"]
        lab = np.concatenate([d[f"{name}_labels"] for d in dumps]) if name == "train" else dumps[0][f"{name}_labels"]
        assert len(lab) == len(split), name
        assert _row_set(cat, num, lab) == _row_set(np.asarray(split.cat_ids), np.asarray(split.num_values),
                                                   np.asarray(split.labels)), name
        if name != "train":  # every rank holds the same held-out rows
            for d in dumps[1:]:
                np.testing.assert_array_equal(d[f"{name}_cat_ids"], dumps[0][f"{name}_cat_ids"])


def test_held_out_files_that_only_one_rank_reads_reach_every_rank(tmp_path):
    train = _parts(tmp_path / "logs", 3)
    held = {"valid": str(CRITEO / "data" / "dev.tsv"), "test": str(CRITEO / "data" / "test.tsv")}
    one = prepare(config_from_dict(_raw(tmp_path / "one", train, **held)), progress=False, log=lambda _m: None)
    raw = _raw(tmp_path / "many", train, prepare_on="every_rank", **held)
    proc = _torchrun(WORKER, {"config": raw, "dump": str(tmp_path / "dump")}, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        got = np.load(tmp_path / f"dump.{r}.npz")
        for name in ("valid", "test"):
            np.testing.assert_array_equal(got[f"{name}_cat_ids"], np.asarray(one.splits[name].cat_ids))
            np.testing.assert_array_equal(got[f"{name}_labels"], np.asarray(one.splits[name].labels))


def test_two_ranks_train_on_their_own_rows_within_0005_auc_of_one_process_and_resume(tmp_path):
    from deepfm.pipeline import train as train_job

    train = _parts(tmp_path / "logs")
    extra = {"split": {"valid": 0.15, "test": 0.0, "seed": 5}}
    single = train_job(config_from_dict(_raw(tmp_path / "one", train, **extra)), tmp_path / "one-model",
                       log=lambda _m: None)
    raw = _raw(tmp_path / "two", train, prepare_on="every_rank", **extra)
    raw["train"]["checkpoint_every_steps"] = 4
    out = tmp_path / "two-model"
    stopped = _torchrun(DIST_WORKER, {"config": raw, "output": str(out), "stop_step": 6}, 2)
    assert stopped.returncode != 0
    resumed = _torchrun(DIST_WORKER, {"config": raw, "output": str(out), "resume": True}, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    two = json.loads((out / "metrics.json").read_text())
    one = single.metrics
    assert two["train"]["ranks"] == 2 and two["valid"]["rows"] == one["valid"]["rows"]
    assert two["train"]["steps"] == one["train"]["steps"]  # steps per epoch from the global row count
    assert abs(two["valid"]["auc"] - one["valid"]["auc"]) <= 0.005, (two["valid"], one["valid"])
    # training further on a new day's files: the ranks grow the vocabularies as one process does
    from deepfm.artifact import load_model

    day2 = _parts(tmp_path / "day2", 5)
    raw_next = _raw(tmp_path / "next", day2, prepare_on="every_rank", **extra)
    grown = _torchrun(WORKER, {"config": raw_next, "dump": str(tmp_path / "grown"), "parent": str(out)}, 2)
    assert grown.returncode == 0, grown.stderr[-3000:]
    want = prepare(config_from_dict(_raw(tmp_path / "next1", day2, **extra)), progress=False, log=lambda _m: None,
                   parent=load_model(out).encoder)
    for r in range(2):
        got = json.loads((tmp_path / f"grown.{r}.json").read_text())["encoder"]
        assert json.dumps(got, sort_keys=True) == json.dumps(want.encoder.to_json(), sort_keys=True)
    further = _torchrun(DIST_WORKER, {"config": raw_next, "output": str(tmp_path / "next-model"),
                                      "init_from": str(out)}, 2)
    assert further.returncode == 0, further.stderr[-3000:]
    # row sharding works on local rows too
    raw_row = {**raw, "train": {**raw["train"], "embedding_sharding": "row", "epochs": 1}}
    row = _torchrun(DIST_WORKER, {"config": raw_row, "output": str(tmp_path / "row-model")}, 2)
    assert row.returncode == 0, row.stderr[-3000:]
    assert json.loads((tmp_path / "row-model" / "metrics.json").read_text())["valid"]["auc"] > 0.65


def test_two_hosts_read_their_files_from_the_store_and_share_no_folder(tmp_path):
    """bench/ingest_two_hosts.sh: two network namespaces, the S3 server on their link's address only, one rank
    in each preparing its share of the parts from the store into its own folders; the job is stopped after its
    first checkpoint and resumed with --resume (each node reusing its own prepared rows)."""
    probe = subprocess.run(["ip", "netns", "add", "deepfm-iprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "deepfm-iprobe"], check=False)
    out = tmp_path / "job"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "ingest_two_hosts.sh"), str(out), "--set", "train.epochs=1"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, "TAG": f"t{os.getpid() % 10000}",
                               "PYTHONPATH": str(ROOT / "src"), "INTERRUPT_AT_STEP": "10"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "stopped after the checkpoint of step 10; resuming" in proc.stdout
    log0 = (out / "node0.log").read_text()
    assert "Resuming from" in log0 and "batch 10, step 10" in log0, log0[-2000:]
    assert "Reusing prepared data" in log0  # rank 0 reuses its rows only when every rank still has its own
    metrics = json.loads((out / "node0" / "model" / "metrics.json").read_text())
    assert metrics["train"]["ranks"] == 2 and metrics["valid"]["auc"] > 0.6
    assert metrics["train"]["steps"] == 113  # 7,200 rows in batches of 64: the resumed run took the rest
    assert not (out / "node1" / ".model.run").exists()  # each node removed its own checkpoints
    for node in (0, 1):  # each rank prepared into its own folder, from its own half of the parts
        manifests = list((out / f"node{node}" / "cache").glob(f"*-r{node}of2/manifest.json"))
        assert len(manifests) == 1, node
        ranks = json.loads(manifests[0].read_text())["ranks"]
        assert len(ranks["train_files"]) == 2 and all(f.startswith("s3://logs/criteo/") for f in ranks["train_files"])
    assert not list((out / "node1" / "cache").glob("*-r0of2"))
    assert "127.0.0.1" not in (out / "s3.out").read_text() and "10.232.0.1" in (out / "s3.out").read_text()


def _machines(tmp_path: Path, name: str, hosts: tuple[int, ...] = (0, 1)) -> dict:
    """Each rank's output and cache folders on its machine (``hosts[rank]``); machines share no filesystem."""
    return {str(r): {"output": str(tmp_path / f"host{h}" / name), "cache_dir": str(tmp_path / f"host{h}" / "cache")}
            for r, h in enumerate(hosts)}


@pytest.mark.parametrize("sharding", ["replicated", "row"])
def test_ranks_that_share_no_folder_resume_mid_epoch_to_the_uninterrupted_model(tmp_path, sharding):
    """Each rank with its own output, checkpoint and cache folders: stopped mid-epoch and resumed with --resume,
    the job ends with the model of an uninterrupted run, bit for bit. Replicated: only rank 0's machine holds the
    checkpoint (one left on rank 1's is ignored), and rank 1 prepares its rows again (its cache is gone).
    Row-sharded: each machine holds its shard's part (and the one before); stopped between the machines' swaps
    of a checkpoint, the job resumes from the step both hold; a part of another run stops it naming the rank
    and both steps."""
    raw = _raw(tmp_path, _parts(tmp_path / "logs"), prepare_on="every_rank", split={"valid": 0.15, "test": 0.0,
                                                                                     "seed": 5})
    raw["train"].update({"checkpoint_every_steps": 4, "embedding_sharding": sharding})
    raw["model"]["dropout"] = 0.3  # each rank resumes its own dropout masks and running loss
    full = _torchrun(DIST_WORKER, {"config": raw, "output": "-", "per_rank": _machines(tmp_path, "full")}, 2)
    assert full.returncode == 0, full.stderr[-3000:]
    job = {"config": raw, "output": "-", "per_rank": _machines(tmp_path, "model")}
    stopped = _torchrun(DIST_WORKER, {**job, "stop_step": 6}, 2)  # mid epoch 1 (12 steps); checkpoint at step 4
    assert stopped.returncode != 0
    last0, last1 = (tmp_path / f"host{r}" / ".model.run" / "last" for r in range(2))
    assert json.loads((last0 / "state.json").read_text())["step"] == 4
    if sharding == "replicated":  # rank 0's machine alone holds it; rank 1 gets it from there
        assert not last1.exists()
        shutil.rmtree(tmp_path / "host1" / "cache")
        last1.mkdir(parents=True)  # a stale checkpoint on rank 1's machine is never read (rank 0's wins)
        (last1 / "state.json").write_text(json.dumps({"epoch": 1, "batch": 3, "step": 15}))
    else:
        assert sorted(p.name for p in last0.iterdir()) == ["rank-0", "state.json"]
        assert sorted(p.name for p in last1.iterdir()) == ["rank-1"]
        stamp = json.loads((last1 / "rank-1" / "part.json").read_text())
        assert (stamp["step"], stamp["rank"], stamp["world_size"]) == (4, 1, 2)
        further = _torchrun(DIST_WORKER, {**job, "resume": True, "stop_step": 10}, 2)  # checkpoint at step 8
        assert further.returncode != 0 and "Resuming from" in further.stdout
        previous1 = last1.parent / "previous"
        assert json.loads((previous1 / "rank-1" / "part.json").read_text())["step"] == 4  # the one before, kept
        shutil.rmtree(last1)  # as if stopped before rank 1's machine swapped in step 8: it holds step 4 only
        os.rename(previous1, last1)
        part = last1 / "rank-1" / "part.json"
        stamp = json.loads(part.read_text())
        part.write_text(json.dumps({**stamp, "run": "another"}))  # a part from another run: refused
        refused = _torchrun(DIST_WORKER, {**job, "resume": True}, 2)
        assert refused.returncode != 0
        assert (f"rank 1's part of the checkpoint in {last1 / 'rank-1'} is at step 4 (run another), rank 0's at "
                f"step 8 (run {stamp['run']})") in refused.stderr, refused.stderr[-3000:]
        part.write_text(json.dumps(stamp))  # this run's: both machines hold step 4, so the job resumes from there
    resumed = _torchrun(DIST_WORKER, {**job, "resume": True}, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and "batch 4, step 4" in resumed.stdout
    assert ("Reusing prepared data" in resumed.stdout) == (sharding == "row")
    a = load_file(str(tmp_path / "host0" / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "host0" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(logged_epochs(tmp_path / "host0" / "full")) == 2
    assert logged_epochs(tmp_path / "host0" / "model") == logged_epochs(tmp_path / "host0" / "full")
    assert not (tmp_path / "host1" / "model").exists() and not (tmp_path / "host1" / ".model.run").exists()


def test_two_machines_of_two_ranks_each_resume_a_row_sharded_job_to_the_uninterrupted_model(tmp_path):
    """Ranks 0, 1 on one machine, 2, 3 on another: each machine's first rank swaps in its folder's checkpoint,
    rank 1 reads rank 0's state.json beside its own part, ranks 2 and 3 get it sent."""
    raw = _raw(tmp_path, _parts(tmp_path / "logs"), prepare_on="every_rank", split={"valid": 0.15, "test": 0.0,
                                                                                     "seed": 5})
    raw["train"].update({"checkpoint_every_steps": 4, "embedding_sharding": "row", "epochs": 1})
    hosts = (0, 0, 1, 1)
    full = _torchrun(DIST_WORKER, {"config": raw, "output": "-", "per_rank": _machines(tmp_path, "full", hosts)}, 4)
    assert full.returncode == 0, full.stderr[-3000:]
    job = {"config": raw, "output": "-", "per_rank": _machines(tmp_path, "model", hosts)}
    assert _torchrun(DIST_WORKER, {**job, "stop_step": 6}, 4).returncode != 0
    last0, last1 = (tmp_path / f"host{h}" / ".model.run" / "last" for h in range(2))
    assert sorted(p.name for p in last0.iterdir()) == ["rank-0", "rank-1", "state.json"]
    assert sorted(p.name for p in last1.iterdir()) == ["rank-2", "rank-3"]
    resumed = _torchrun(DIST_WORKER, {**job, "resume": True}, 4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and "batch 4, step 4" in resumed.stdout
    a = load_file(str(tmp_path / "host0" / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "host0" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parts_of_a_checkpoint_on_machines_apart_must_match_rank_0s():
    def part(step, rank=1, world=2, run="a"):
        return {"path": f"/h{rank}/last/rank-{rank}", "stamp": {"run": run, "step": step, "rank": rank,
                                                               "world_size": world}}

    assert check_parts("checkpoint", [part(8, 0), part(8)])["step"] == 8
    assert check_parts("checkpoint", [{"path": "/h0", "stamp": None}, part(4)]) is None  # rank 0's wins: afresh
    with pytest.raises(ConfigError, match=r"rank 1 has no part of the checkpoint in /h1/x on its machine, while "
                                          r"rank 0's is at step 8"):
        check_parts("checkpoint", [part(8, 0), {"path": "/h1/x", "stamp": None}])
    with pytest.raises(ConfigError, match=r"rank 1's part .* is at step 8 \(run b\), rank 0's at step 8 \(run a\)"):
        check_parts("checkpoint", [part(8, 0), part(8, run="b")])
    with pytest.raises(ConfigError, match=r"written by rank 1 of 3, not rank 1 of 2"):
        check_parts("checkpoint", [part(8, 0), part(8, world=3)])
    # last and previous: the newest step of rank 0's that every rank holds, and where each holds it
    none = {"path": "/h1/p", "stamp": None}
    assert choose_part("checkpoint", [[part(8, 0), part(4, 0)], [part(4), none]]) == (part(4, 0)["stamp"], [1, 0])
    assert choose_part("checkpoint", [[part(8, 0), part(4, 0)], [part(8), part(4)]]) == (part(8, 0)["stamp"], [0, 0])
    assert choose_part("checkpoint", [[{"path": "/h0", "stamp": None}, none], [part(4), none]]) is None
    with pytest.raises(ConfigError, match=r"rank 1's part .* is at step 4 \(run b\), rank 0's at step 8 \(run a\)"):
        choose_part("checkpoint", [[part(8, 0), part(4, 0)], [part(4, run="b"), none]])
