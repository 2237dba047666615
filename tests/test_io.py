"""deepfm.io.atomic_path: the one way deepfm writes a file or a folder (temporary name, fsync, rename)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from deepfm import io
from deepfm.io import atomic_path, atomic_write_text, leftover_siblings, remove_dead_temporaries


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_file_appears_whole_and_synced_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "out.csv"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")
                                                                  if os.path.exists("/proc/self/fd") else fd),
                                                     real_fsync(fd)))
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.csv.tmp-") and not target.exists()
        tmp.write_text("a,b\n")
    assert target.read_text() == "a,b\n" and os.listdir(target.parent) == ["out.csv"]
    if os.path.exists("/proc/self/fd"):  # the file's data, then the folder's entry
        assert synced[0].startswith(str(target.parent / ".out.csv.tmp-")) and synced[1] == str(target.parent)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "a,b\n" and os.listdir(target.parent) == ["out.csv"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_modes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_path(tmp_path / "d", directory=True) as tmp:
            (tmp / "g").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode | (0o111 & ~umask)


def test_a_folder_replaces_the_old_one_whole_and_keep_existing_keeps_it(tmp_path):
    final = tmp_path / "model"
    for version in ("1", "2"):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "weights").write_text(version)
            (tmp / "nested").mkdir()
            (tmp / "nested" / "part").write_text(version)
        assert (final / "weights").read_text() == version and (final / "nested" / "part").read_text() == version
    with atomic_path(final, directory=True, keep_existing=True) as tmp:  # another process finished first
        (tmp / "weights").write_text("3")
    assert (final / "weights").read_text() == "2"
    with pytest.raises(ValueError), atomic_path(final, directory=True) as tmp:
        (tmp / "weights").write_text("4")
        raise ValueError("fill failed")
    assert (final / "weights").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["model"]


def test_leftovers_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    names = {"dead": f".model.tmp-{dead}@{host}@abc123", "dead_aside": f".model.old-{dead}@{host}@def456",
             "unknown": ".model.tmp-k2j3h4", "alive": f".model.tmp-{os.getppid()}@{host}@ghi789",
             "other_host": f".model.tmp-{dead}@elsewhere@jkl012", "other_name": f".other.tmp-{dead}@{host}@mno345"}
    for name in names.values():
        (tmp_path / name).mkdir()
    assert len(leftover_siblings(tmp_path / "model")) == 5
    # a scan of the folder (the cache's, before preparing): only what a dead writer of this host left
    assert sorted(p.name for p in remove_dead_temporaries(tmp_path)) == sorted(
        [names["dead"], names["dead_aside"], names["other_name"]])
    # after a write of model succeeded: its leftovers whose writer is gone or cannot be told, not a live one's
    with atomic_path(tmp_path / "model", directory=True) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == sorted(["model", names["alive"], names["other_host"]])
