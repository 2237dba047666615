"""torch.distributed: 2 gloo processes on loopback match 1 process; failures end the job; resume works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, as_written_before_rank_parts, criteo_config_dict, logged_epochs
from deepfm.config import config_from_dict
from deepfm.errors import ConfigError
from deepfm.pipeline import train
from deepfm.predict import Predictor

WORKER = Path(__file__).with_name("dist_worker.py")


def _config(tmp_path: Path) -> dict:
    raw = criteo_config_dict(tmp_path, epochs=2, batch_size=512, checkpoint_every_steps=4, patience=5,
                             dist_timeout_s=60)
    raw["model"].update({"hidden_units": [64, 32], "dropout": 0.0})
    return raw


def _torchrun(spec: dict, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), json.dumps(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_match_one_process_and_write_the_same_model_format(tmp_path):
    raw = _config(tmp_path)
    single = train(config_from_dict(raw), tmp_path / "one", log=lambda _m: None)
    out = tmp_path / "two"
    proc = _torchrun({"config": raw, "output": str(out)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout
    two = json.loads((out / "metrics.json").read_text())
    one = single.metrics
    # same global batch and seed, no dropout: only float summation order differs
    assert abs(two["valid"]["auc"] - one["valid"]["auc"]) <= 0.005, (two["valid"], one["valid"])
    assert two["train"]["ranks"] == 2 and two["valid"]["rows"] == one["valid"]["rows"] == 409
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.model_dir.iterdir())
    pred = Predictor(out)
    m = pred.evaluate_file(str(ROOT / "examples/criteo/data/test.tsv"), progress=False)
    assert m["auc"] == pytest.approx(two["test"]["auc"], abs=1e-3)


def test_a_failing_rank_ends_the_whole_job_with_its_error(tmp_path):
    raw = _config(tmp_path)
    proc = _torchrun({"config": raw, "output": str(tmp_path / "m"), "fail_rank": 1, "fail_step": 3},
                     timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
    assert not (tmp_path / "m").exists()


def test_resume_with_the_same_number_of_ranks_gives_the_same_model(tmp_path):
    """With dropout: each rank resumes its own RNG state (its dropout masks) and its own share of the epoch's
    running loss, so the resumed job ends with the uninterrupted job's model bit for bit and logs the same
    training log loss for the epoch it resumed."""
    raw = _config(tmp_path)
    raw["model"]["dropout"] = 0.3
    full = tmp_path / "full"
    uninterrupted = _torchrun({"config": raw, "output": str(full)})
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    out = tmp_path / "resumed"
    stopped = _torchrun({"config": raw, "output": str(out), "stop_step": 10})  # mid epoch 1; checkpoint at 8
    assert stopped.returncode != 0 and not out.exists()
    old = tmp_path / "old"  # the same checkpoint as written before checkpoints kept each rank's part
    shutil.copytree(tmp_path / ".resumed.run", tmp_path / ".old.run")
    as_written_before_rank_parts(tmp_path / ".old.run" / "last")
    with pytest.raises(ConfigError, match=r"a checkpoint of 2 rank\(s\), resumed on 1; resume with 2"):
        train(config_from_dict(raw), out, resume=True, log=lambda _m: None)
    resumed = _torchrun({"config": raw, "output": str(out), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout and "Warning" not in resumed.stdout
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(logged_epochs(full)) == 2 and logged_epochs(out) == logged_epochs(full)
    # every rank resumes rank 0's RNG state, as before: the job finishes, saying its model is not the same
    resumed_old = _torchrun({"config": raw, "output": str(old), "resume": True})
    assert resumed_old.returncode == 0, resumed_old.stderr[-3000:]
    assert "holds rank 0's RNG state and running loss only" in resumed_old.stdout
    c = load_file(str(old / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed")
def test_two_hosts_over_a_veth_pair(tmp_path):
    script = ROOT / "bench" / "distributed_two_hosts.sh"
    probe = subprocess.run(["ip", "netns", "add", "deepfm-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow network namespaces: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "deepfm-probe"], check=False)
    raw = _config(tmp_path)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(raw))
    aucs = {}
    for sharding in ("replicated", "row"):  # the second: the table split across the two hosts
        out = tmp_path / sharding
        proc = subprocess.run(["bash", str(script), str(cfg), str(out), "--set",
                               f"train.embedding_sharding={sharding}"], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "TAG": f"t{os.getpid()}"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["train"]["ranks"] == 2 and metrics["valid"]["auc"] > 0.6
        aucs[sharding] = metrics["valid"]["auc"]
    assert "row-sharded over 2 ranks" in (tmp_path / "row.node0.log").read_text()
    assert aucs["row"] == pytest.approx(aucs["replicated"], abs=1e-4)


def test_nproc_wrapper_launches_torchrun_with_the_same_arguments(tmp_path, monkeypatch):
    import subprocess as sp

    from deepfm.cli import main

    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "cfg.yaml", "--nproc", "3", "--set", "train.epochs=1", "--output", "out"]) == 0
    (cmd,) = calls
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m"]
    assert cmd[6:] == ["deepfm", "train", "cfg.yaml", "--set", "train.epochs=1", "--output", "out"]
