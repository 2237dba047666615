"""The model directory under faults: a SIGKILL at any step of the swap leaves a loadable model at the output path,
leftovers of killed writes are removed by the next successful one, modes follow the umask, a damaged JSON file
is a clean error in every command, and re-training keeps what deepfm does not write itself (an export)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import _serve_models as models
from deepfm.artifact import load_model
from deepfm.cli import main
from deepfm.config import load_config
from deepfm.io import exchange_paths, leftover_siblings
from deepfm.pipeline import train

TEST_TSV = models.CRITEO / "data" / "test.tsv"


def _weights(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two different small models of the Criteo sample (different seeds)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (1, 2):
        cfg = load_config(models.CRITEO / "config.yaml", [
            "train.epochs=1", "model.hidden_units=[8]", "model.embed_dim=4", "train.progress=false",
            f"train.seed={seed}", f"data.cache_dir={root / 'cache'}"])
        train(cfg, root / f"m{seed}", log=lambda _m: None)
        out.append(root / f"m{seed}")
    assert _weights(out[0]) != _weights(out[1])
    return out[0], out[1]


# A child process saves model 2 over model 1 with one step of the swap replaced by "do it (or not), then
# SIGKILL", as the fault drill did by patching the rename.
KILLER = r"""
import os, signal, sys, shutil
import deepfm.io as io
from deepfm.artifact import load_model, save_model
target, new, where = sys.argv[1], sys.argv[2], sys.argv[3]
real_exchange, real_rename, real_rmtree = io.exchange_paths, os.rename, shutil.rmtree
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "before-exchange":
    io.exchange_paths = lambda a, b: die()
elif where == "after-exchange":
    io.exchange_paths = lambda a, b: (real_exchange(a, b), die())
elif where == "during-cleanup":
    def rmtree(p, *a, **k):
        real_rmtree(p, *a, **k) if "tmp-" not in str(p) else (shutil.copytree(p, str(p) + "-partial"), die())
    io.shutil.rmtree = rmtree
elif where == "first-rename":  # the first write of a directory: one rename
    io.os.rename = lambda a, b: die()
elif where == "between-two-renames":  # the fallback without renameat2: old aside, then (killed) new in
    io.exchange_paths = lambda a, b: False
    io.os.rename = lambda a, b: (real_rename(a, b), die()) if ".old-" in str(b) else real_rename(a, b)
m = load_model(new)
save_model(target, config=m.config, layout=m.layout, encoder=m.encoder, model=m.model, metrics=m.metrics,
           history=[])
"""


@pytest.mark.parametrize("where", ["before-exchange", "after-exchange", "during-cleanup"])
def test_sigkill_at_each_step_of_the_swap_leaves_a_loadable_model(two_models, tmp_path, where):
    assert exchange_paths(tmp_path, tmp_path) in (True, False)  # the platform call exists (Linux: True)
    old, new = two_models
    target = tmp_path / "model"
    shutil.copytree(old, target)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(target), str(new), where], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    loaded = load_model(target)  # never "model directory not found"
    expect = {"before-exchange": old, "after-exchange": new, "during-cleanup": new}[where]
    assert _weights(target) == _weights(expect)
    assert loaded.layout.num_rows > 0
    left = leftover_siblings(target)
    assert left, "the kill left the temporary folder behind"
    # the next successful write removes every leftover of killed writes
    m = load_model(new)
    from deepfm.artifact import save_model

    save_model(target, config=m.config, layout=m.layout, encoder=m.encoder, model=m.model, metrics={}, history=[])
    assert leftover_siblings(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killer.py", "model"]
    assert _weights(target) == _weights(new)


def test_sigkill_during_a_first_write_leaves_nothing_half_written(two_models, tmp_path):
    _, new = two_models
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(new), "first-rename"])
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model").exists()
    assert [p.name.startswith(".model.tmp-") for p in tmp_path.iterdir() if p.name != "killer.py"] == [True]


def test_resume_after_a_killed_save_removes_leftovers(tmp_path):
    cfg = load_config(models.CRITEO / "config.yaml", [
        "train.epochs=1", "model.hidden_units=[8]", "model.embed_dim=4", "train.progress=false",
        f"data.cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "model"
    (tmp_path / ".model.tmp-abc123").mkdir()  # what a kill during the save leaves
    (tmp_path / ".model.old-def456").mkdir()
    (tmp_path / ".model.tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    train(cfg, out, resume=True, log=lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model"]
    load_model(out)


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_modes_follow_the_umask(two_models, tmp_path, umask, dir_mode, file_mode):
    from deepfm.artifact import save_model
    from deepfm.predict import Predictor

    m = load_model(two_models[0])
    previous = os.umask(umask)
    try:
        save_model(tmp_path / "model", config=m.config, layout=m.layout, encoder=m.encoder, model=m.model,
                   metrics={}, history=[])
        Predictor(m).predict_file(str(TEST_TSV), str(tmp_path / "p.csv"), progress=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode
    for name in ("model.safetensors", "encoder.json", "layout.json", "deepfm.json"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == file_mode


@pytest.mark.parametrize("damage", ["truncated-encoder", "empty-layout", "truncated-layout", "layout-list",
                                    "truncated-metrics", "bad-config"])
def test_a_damaged_model_file_is_a_clean_error_in_every_command(two_models, tmp_path, capsys, damage):
    broken = tmp_path / "model"
    shutil.copytree(two_models[0], broken)
    name = {"truncated-encoder": "encoder.json", "empty-layout": "layout.json", "truncated-layout": "layout.json",
            "layout-list": "layout.json", "truncated-metrics": "metrics.json", "bad-config": "config.yaml"}[damage]
    path = broken / name
    text = path.read_text()
    replacement = {"empty-layout": "{}", "layout-list": "[1, 2]", "bad-config": "data: [\n"}
    path.write_text(replacement.get(damage, text[:len(text) // 2]))
    for argv in (["predict", str(broken), str(TEST_TSV), "--output", str(tmp_path / "p.csv")],
                 ["evaluate", str(broken), str(TEST_TSV)], ["inspect", str(broken)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err, err
        assert "damaged" in err or "does not validate" in err
    assert not (tmp_path / "p.csv").exists()
    if damage in ("truncated-encoder", "empty-layout"):  # the server too (a subprocess: it would block if it served)
        env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
        proc = subprocess.run([sys.executable, "-m", "deepfm", "serve", str(broken), "--port", str(models.free_port())],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr
        assert str(path) in proc.stderr and "Traceback" not in proc.stderr and "Serving" not in proc.stderr


def test_retraining_keeps_an_export_inside_the_model_dir(tmp_path):
    pytest.importorskip("torch")
    cfg = load_config(models.CRITEO / "config.yaml", [
        "train.epochs=1", "model.hidden_units=[8]", "model.embed_dim=4", "train.progress=false",
        f"data.cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "model"
    train(cfg, out, log=lambda _m: None)
    assert main(["export", str(out), "--format", "torchscript"]) == 0
    exported = {p.relative_to(out): p.read_bytes() for p in (out / "export").rglob("*") if p.is_file()}
    assert Path("export/model.torchscript.pt") in exported
    (out / "NOTES.txt").write_text("a user's file")
    messages: list[str] = []
    train(cfg, out, log=messages.append)
    assert {p.relative_to(out): p.read_bytes() for p in (out / "export").rglob("*") if p.is_file()} == exported
    assert (out / "NOTES.txt").read_text() == "a user's file"
    kept = [m for m in messages if m.startswith("Kept ")]
    assert kept == [f"Kept NOTES.txt, export from the previous {out} (not written by training; an export there was "
                    f"made from the previous weights: run `deepfm export {out}` again)"]
    json.loads((out / "deepfm.json").read_text())
    load_model(out)


def test_the_fallback_swap_killed_between_its_renames_says_where_the_model_is(two_models, tmp_path, capsys):
    """Without renameat2 (other platforms, some filesystems) the swap is two renames; a kill between them
    leaves the previous model beside the path, and every command says so and how to put it back."""
    old, new = two_models
    target = tmp_path / "model"
    shutil.copytree(old, target)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(target), str(new), "between-two-renames"])
    assert proc.returncode == -signal.SIGKILL
    aside = [p for p in leftover_siblings(target) if ".old-" in p.name]
    assert not target.exists() and len(aside) == 1 and _weights(aside[0]) == _weights(old)
    assert main(["inspect", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"the previous model {aside[0]} is beside it: rename it to model" in err
    aside[0].rename(target)
    assert _weights(target) == _weights(old)
    load_model(target)


def test_a_shared_table_is_the_file_mapped_and_scores_as_a_copy(two_models):
    """``load_model(shared_table=True)`` (the server's workers): the table is a read-only map of model.safetensors,
    put in through the one table accessor; scores equal those of an ordinary load. A table of the wrong shape is
    refused naming both shapes."""
    import torch

    from deepfm.model.embedding import embedding_table, replace_embedding_table
    from deepfm.predict import Predictor

    path = two_models[0]
    copy, shared = load_model(path), load_model(path, shared_table=True)
    own, mapped = embedding_table(copy.model), embedding_table(shared.model)
    assert own is not None and mapped is not None and not mapped.requires_grad
    assert torch.equal(mapped, own) and mapped.data_ptr() != own.data_ptr()
    want = Predictor(copy).evaluate_file(str(TEST_TSV), progress=False)
    got = Predictor(shared).evaluate_file(str(TEST_TSV), progress=False)
    assert got["auc"] == want["auc"] and got["logloss"] == want["logloss"] and 0.5 < got["auc"] < 1
    with pytest.raises(ValueError, match=rf"its table is \(3, 5\), the layout says \({own.shape[0]}, 5\)"):
        replace_embedding_table(shared.model, torch.zeros(3, 5))
    assert torch.equal(embedding_table(shared.model), own)  # a refused table leaves the model as it was


def _damage_weights(path: Path, damage: str) -> None:
    """``path``/model.safetensors made into one kind of bad file."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "random-bytes":
        weights.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "huge-header-length":
        weights.write_bytes((1 << 62).to_bytes(8, "little") + data[8:])
    elif damage == "header-longer-than-file":
        weights.write_bytes((len(data) + 10).to_bytes(8, "little") + data[8:])
    elif damage == "header-not-json":
        weights.write_bytes((4).to_bytes(8, "little") + b"{]\xff\xfe" + data[8:])
    else:
        state = load_file(str(weights))
        if damage == "missing-tensor":
            del state["dnn.net.0.bias"]
        else:  # a wrong shape
            state["dnn.net.0.bias"] = state["dnn.net.0.bias"][:-1].clone()
        save_file(state, str(weights))


DAMAGED_WEIGHTS = {"random-bytes": "not a safetensors file", "truncated": "truncated",
                   "huge-header-length": "header length field says 4,611,686,018,427,387,904 bytes",
                   "header-longer-than-file": "truncated (its header needs",
                   "header-not-json": "not a safetensors file (its header is not JSON)",
                   "missing-tensor": "missing dnn.net.0.bias",
                   "wrong-shape": "shapes: dnn.net.0.bias is (7,), needs (8,)"}


@pytest.mark.parametrize("damage", sorted(DAMAGED_WEIGHTS))
def test_damaged_weights_are_one_line_naming_the_file(two_models, tmp_path, capsys, damage):
    """A bad model.safetensors (random bytes, cut short, a huge or too-long header length, a header that is not
    JSON, a tensor missing or of the wrong shape) is one ArtifactError line naming the file and what is wrong,
    in ``load_model`` (both ways of loading the table) and in the commands; never a MemoryError."""
    from deepfm.errors import ArtifactError

    broken = tmp_path / "model"
    shutil.copytree(two_models[0], broken)
    _damage_weights(broken, damage)
    weights = broken / "model.safetensors"
    for shared in (False, True):
        with pytest.raises(ArtifactError) as err:
            load_model(broken, shared_table=shared)
        text = str(err.value)
        assert text.startswith(f"{weights}: ") and "\n" not in text, text
        assert DAMAGED_WEIGHTS[damage] in text, text
    for argv in (["predict", str(broken), str(TEST_TSV), "--output", str(tmp_path / "p.csv")],
                 ["inspect", str(broken)]):
        assert main(argv) == 2, argv
        err_text = capsys.readouterr().err
        assert str(weights) in err_text and DAMAGED_WEIGHTS[damage] in err_text, err_text
        assert "Traceback" not in err_text and "MemoryError" not in err_text
    assert not (tmp_path / "p.csv").exists()
