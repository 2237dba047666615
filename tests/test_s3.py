"""Inputs in an object store: a real S3-compatible server (SeaweedFS, ``tests/s3server.py``) on 127.0.0.1.

What is checked: a partitioned dataset in the store prepares exactly as the local file; the endpoint comes from
``AWS_ENDPOINT_URL`` or ``data.s3_endpoint_url``; the cache key follows what the store reports; credentials
reach no file the run writes; a server stopped mid-read fails the job naming the object, with nothing
half-written, and ``--resume`` finishes it once the server is back; wrong credentials and a missing bucket are
one-line messages."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepfm.cli import main
from deepfm.config import config_from_dict
from deepfm.data import inputs, sources
from deepfm.data.store import fingerprint, prepare

from conftest import CRITEO, ROOT, criteo_config_dict
from s3server import S3Server

QUIET = {"progress": False, "log": lambda _m: None}
LINES = (CRITEO / "data" / "train.tsv").read_bytes().splitlines(keepends=True)
PARTS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    local = root / "upload" / "criteo"
    cuts = np.linspace(0, len(LINES), PARTS + 1).astype(int)
    for k in range(PARTS):  # two days of gzip'ed parts
        day = local / f"dt=2026-12-0{1 + k * 2 // PARTS}"
        day.mkdir(parents=True, exist_ok=True)
        (day / f"part-{k:05d}.tsv.gz").write_bytes(gzip.compress(b"".join(LINES[cuts[k]:cuts[k + 1]])))
    with S3Server(root / "server") as s3:
        s3.upload(local, "logs", "criteo")
        yield s3


@pytest.fixture
def s3_env(server, monkeypatch):
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    return server


def _raw(tmp_path: Path, train, **data) -> dict:
    raw = criteo_config_dict(tmp_path, epochs=1, batch_size=512)
    raw["model"]["hidden_units"] = [32]
    raw["data"].update({"train": train, "cache_dir": str(tmp_path / "cache"), **data})
    return raw


def _same(a, b) -> None:
    assert json.dumps(a.encoder.to_json(), sort_keys=True) == json.dumps(b.encoder.to_json(), sort_keys=True)
    for name, x in a.splits.items():
        np.testing.assert_array_equal(x.cat_ids, b.splits[name].cat_ids)
        np.testing.assert_array_equal(x.num_values, b.splits[name].num_values)
        np.testing.assert_array_equal(x.labels, b.splits[name].labels)


def test_a_partitioned_dataset_in_the_store_prepares_as_the_local_file(s3_env, tmp_path):
    files = sources.resolve("s3://logs/criteo/")
    assert [str(f) for f in files] == [f"s3://logs/criteo/dt=2026-12-0{1 + k * 2 // PARTS}/part-{k:05d}.tsv.gz"
                                       for k in range(PARTS)]
    assert [f.partitions for f in files] == [{"dt": "2026-12-01"}] * 3 + [{"dt": "2026-12-02"}] * 3
    local = prepare(config_from_dict(_raw(tmp_path / "l", str(CRITEO / "data" / "train.tsv"))), **QUIET)
    remote = prepare(config_from_dict(_raw(tmp_path, "s3://logs/criteo/")), **QUIET)
    _same(remote, local)
    globbed = prepare(config_from_dict(_raw(tmp_path / "g", "s3://logs/criteo/dt=2026-12-0*/part-*.tsv.gz")),
                      **QUIET)
    _same(globbed, local)
    # a time split on the partition column: day 1 trains, day 2 validates
    split = {"by": "dt", "valid_from": "2026-12-02", "test_from": "2026-12-03"}
    raw = _raw(tmp_path / "t", "s3://logs/criteo/dt=*/", split=split)
    raw["data"].pop("valid"), raw["data"].pop("test")
    by_day = prepare(config_from_dict(raw), **QUIET)
    assert {k: len(v) for k, v in by_day.splits.items()} == {"train": 3600, "valid": 3600, "test": 0}


def test_endpoint_from_the_config_key_and_the_cache_key_from_the_store(server, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server.upload(server.root.parent / "upload" / "criteo" / "dt=2026-12-01", "scratch", "day")
    cfg = config_from_dict(_raw(tmp_path, "s3://scratch/day/", s3_endpoint_url=server.endpoint))
    first = prepare(cfg, **QUIET)
    assert not first.reused
    opened = []
    real = sources.open_native
    monkeypatch.setattr(sources, "open_native", lambda p: opened.append(p) or real(p))
    again = prepare(cfg, **QUIET)
    assert again.reused and again.path == first.path and not opened  # an unchanged object is not read again
    key = fingerprint(cfg)
    server.filesystem().delete_file("scratch/day/part-00001.tsv.gz")
    with server.filesystem().open_output_stream("scratch/day/part-00001.tsv.gz", compression=None) as out:
        out.write(gzip.compress(b"".join(LINES[:500])))
    assert fingerprint(cfg) != key
    changed = prepare(cfg, **QUIET)
    assert not changed.reused and len(changed.splits["train"]) != len(first.splits["train"])
    manifest = json.loads((changed.path / "manifest.json").read_text())
    assert manifest["fingerprint"] == fingerprint(cfg)


def _config_file(tmp_path: Path, train: str, **data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, train, **data)))
    return path


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    full["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run([sys.executable, "-m", "deepfm", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_wrong_credentials_and_a_missing_bucket_are_one_line_messages(server, tmp_path):
    cfg = _config_file(tmp_path, "s3://logs/criteo/")
    wrong = server.env() | {"AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    run = _cli(["train", str(cfg), "--output", str(tmp_path / "m")], wrong)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "s3://logs/criteo/" in run.stderr and "access denied" in run.stderr
    assert "not-the-secret" not in run.stderr + run.stdout
    missing = _config_file(tmp_path, "s3://no-such-bucket/criteo/")
    run = _cli(["train", str(missing), "--output", str(tmp_path / "m")], server.env())
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "s3://no-such-bucket/criteo/" in run.stderr and "bucket does not exist" in run.stderr
    assert not (tmp_path / "m").exists()


def test_credentials_reach_no_file_the_run_writes(s3_env, tmp_path, capsys):
    cfg = _config_file(tmp_path, "s3://logs/criteo/")
    assert main(["train", str(cfg), "--output", str(tmp_path / "model")]) == 0
    said = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written)
    for secret in (s3_env.secret_key, s3_env.access_key):
        assert secret not in said.out + said.err
        for p in written:
            assert secret.encode() not in p.read_bytes(), p


def test_a_server_stopped_mid_read_fails_naming_the_object_and_resume_finishes(s3_env, tmp_path, monkeypatch,
                                                                                 capsys):
    cfg = _config_file(tmp_path, "s3://logs/criteo/")
    real = inputs.read_chunks
    seen: list[str] = []

    def stop_during_the_third_object(src, *a, **k):
        seen.append(str(src))
        for i, chunk in enumerate(real(src, *a, **k)):
            yield chunk
        if len(seen) == 2:  # two objects read, the third is next: the store goes away
            s3_env.stop(grace_s=5)

    monkeypatch.setattr(inputs, "read_chunks", stop_during_the_third_object)
    out = tmp_path / "model"
    assert main(["train", str(cfg), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    third = "s3://logs/criteo/dt=2026-12-01/part-00002.tsv.gz"
    assert third in err and "store did not answer" in err, err
    assert err.strip().count("\n") == 0 or err.strip().splitlines()[-1].startswith("error:"), err
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir()), "a half-written cache folder was left"
    assert not (out / "model.safetensors").exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(inputs, "read_chunks", real)
    s3_env.start()
    assert main(["train", str(cfg), "--output", str(out), "--resume"]) == 0
    assert any(out.rglob("*.safetensors"))
