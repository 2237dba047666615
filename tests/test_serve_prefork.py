"""``deepfm serve --workers 2`` as a real process: a parent forks the workers (``deepfm.serve.prefork``). Both
answer, a worker killed is replaced by a new one that answers, SIGHUP reloads each worker, SIGTERM to the parent stops every worker and
exits 0, and a worker that cannot load the model makes the command fail with its error. Connections opened at the
same moment go to different workers (the parent hands them over in turn, ``deepfm.serve.handoff``)."""

from __future__ import annotations

import os
import shutil
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import _serve_models as models  # noqa: E402

ROW = {"rows": [{"id": 1, "features": {"I1": 3, "C1": "68fd1e64"}}]}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _answering(base: str, tries: int = 200) -> set[str]:
    """The pids of the workers that answered predictions (a new connection each: the parent hands them over in turn)."""
    for _ in range(tries):
        resp = httpx.post(base + "/v1/predict", json=ROW, headers={"connection": "close"}, timeout=10)
        assert resp.status_code == 200, resp.text
        assert 0.0 < resp.json()["predictions"][0]["probability"] < 1.0
    text = httpx.get(base + "/metrics", headers={"connection": "close"}, timeout=10).text
    return {s["pid"] for s, v in models.metric_samples(text, "deepfm_worker_requests") if v > 0}


def _start(model: Path, tmp_path: Path):
    """``deepfm serve MODEL --workers 2`` on a free port, once it answers: (process, base URL, its log)."""
    port = models.free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", str(model), "--workers", "2",
                             "--port", str(port)], env=_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    models.wait_until(healthy)
    return proc, base, log


def test_forked_workers_are_replaced_and_stopped(tmp_path):
    proc, base, log = _start(models.criteo_model(), tmp_path)
    first: set[int] = set()
    try:
        first = models.wait_until(lambda: len(models.children(proc.pid)) == 2 and models.children(proc.pid))
        time.sleep(1)  # the second worker has reported ready, and listens
        models.wait_until(lambda: _answering(base, tries=20) == {str(p) for p in first})  # both answer, nothing else does

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        now = models.wait_until(lambda: (c := models.children(proc.pid)) and len(c) == 2 and victim not in c and c)
        new = (now - first).pop()
        assert now == {max(first), new}
        models.wait_until(lambda: str(new) in _answering(base, tries=20))  # the replacement answers
        assert str(victim) not in _answering(base, tries=1)  # and the dead one left the live gauges
        assert "worker %d died (signal SIGKILL)" % victim in (tmp_path / "server.log").read_text()

        proc.send_signal(signal.SIGHUP)  # passed on: each worker reloads its current directory
        models.wait_until(lambda: models.metric(httpx.get(base + "/metrics", timeout=10).text, "deepfm_model_reloads_total",
                                    result="ok") == 2)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(_alive(p) for p in now | first)  # no worker left behind
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in first:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_worker_that_cannot_load_the_model_fails_the_command(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models.criteo_model(), model)
    (model / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{]")  # a header that is not JSON
    run = subprocess.run([sys.executable, "-m", "deepfm", "serve", str(model), "--workers", "2",
                          "--port", str(models.free_port())], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "a worker failed to start" in run.stderr, run.stderr
    assert "safetensors" in run.stderr.split("a worker failed to start")[1].lower(), run.stderr  # its error


def test_workers_that_keep_dying_make_the_parent_give_up(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(models.criteo_model(), model)
    proc, base, log = _start(model, tmp_path)
    workers: set[int] = set()
    try:
        workers = models.wait_until(lambda: len(models.children(proc.pid)) == 2 and models.children(proc.pid))
        time.sleep(1)  # both workers have reported ready, and listen
        models.wait_until(lambda: len(_answering(base, tries=20)) == 2)
        bad = tmp_path / "bad.safetensors"  # a new file renamed over the table: the mapped one stays intact
        bad.write_bytes((2).to_bytes(8, "little") + b"{]")
        os.replace(bad, model / "model.safetensors")
        os.kill(min(workers), signal.SIGKILL)  # every replacement now fails to load the model
        assert proc.wait(timeout=120) != 0
        text = (tmp_path / "server.log").read_text()
        assert "5 workers in a row died within 30 s of their start" in text and "giving up" in text, text
        assert "failed to start" in text, text  # each replacement's own error was logged
        assert not any(_alive(p) for p in workers)  # the healthy worker was stopped too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _owner(server_port: int, client_port: int, pids: set[int]) -> int:
    """The pid among ``pids`` that holds the server's end of the TCP connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == server_port and int(f[2].rsplit(":", 1)[1], 16) == client_port:
                inodes.add(f[9])
    owners = {pid for pid in pids for fd in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(fd) in {f"socket:[{i}]" for i in inodes}}
    assert len(owners) == 1, (inodes, owners)
    return owners.pop()


def _post(conn: socket.socket, body: bytes) -> int:
    """One keep-alive HTTP/1.1 request on ``conn``: the response's status (its body read to the end)."""
    conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += conn.recv(65536)
    return int(head.split()[1])


def test_connections_opened_together_go_to_different_workers(tmp_path):
    """Two clients that connect at the same moment (before either sends a byte) are served by the two workers,
    and stay so for every request on their keep-alive connections; with workers that accept for themselves,
    the first to wake took both."""
    proc, base, log = _start(models.criteo_model(), tmp_path)
    port = int(base.rsplit(":", 1)[1])
    try:
        workers = models.wait_until(lambda: len(models.children(proc.pid)) == 2 and models.children(proc.pid))
        models.wait_until(lambda: len(_answering(base, tries=4)) == 2)  # both ready
        for _ in range(3):
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            try:
                for _ in range(5):
                    assert [_post(c, json.dumps(ROW).encode()) for c in conns] == [200, 200]
                owners = [_owner(port, c.getsockname()[1], workers) for c in conns]
                assert len(set(owners)) == 2, owners
            finally:
                for c in conns:
                    c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log.close()


def test_workers_of_a_killed_parent_finish_and_exit(tmp_path):
    """SIGKILL to the parent (nothing can stop the workers then): each worker sees its connection channel
    close, takes no more connections and exits, instead of living on as an orphan."""
    proc, base, log = _start(models.criteo_model(), tmp_path)
    workers: set[int] = set()
    try:
        workers = models.wait_until(lambda: len(models.children(proc.pid)) == 2 and models.children(proc.pid))
        models.wait_until(lambda: len(_answering(base, tries=4)) == 2)
        proc.kill()
        proc.wait(timeout=30)
        models.wait_until(lambda: not any(_alive(p) for p in workers), seconds=30)
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
