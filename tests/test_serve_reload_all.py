"""``POST /v1/reload`` with ``--workers 2`` reaches every worker or none (``deepfm.serve.rounds``/``peers``).

A real server (``deepfm serve --workers 2`` on 127.0.0.1, stopped by PID): after one 200 reload every request,
on fresh connections that land on both workers, reports the new version; a worker killed afterwards comes back
serving the new directory; SIGHUP reloads that directory in every worker; a failing reload leaves every worker
on the old version; the token and root refusals are those of one worker. The rounds' decisions (a worker that
fails, dies, changes version or hangs) are checked on the parent's logic itself, with fake workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfm.serve.rounds import Reloads

TOKEN = "workers-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
ROW = {"rows": [{"id": 1, "features": {"I1": 3, "C1": "68fd1e64"}}]}


# --- the parent's rounds, with fake workers -------------------------------------------------------------

class Fake:
    """The parent's callbacks, recording what each worker was told."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.told, self.adopted, self.killed = list(pids), {p: [] for p in pids}, [], []
        self.reloads = Reloads(self.send, lambda: list(self.pids), self.adopted.append, self.killed.append, 60.0)

    def send(self, pid: int, message: dict) -> bool:
        if pid not in self.pids:
            return False
        self.told[pid].append(message)
        return True

    def ops(self, pid: int) -> list[str]:
        return [m["op"] for m in self.told[pid]]

    def answer_all(self, op: str, round_id: int, *pids: int, **extra) -> None:
        for pid in pids:
            self.reloads.message(pid, {"op": op, "round": round_id, **extra})


def test_a_round_commits_only_once_every_worker_loaded_and_swapped():
    f = Fake([1, 2, 3])
    f.reloads.message(1, {"op": "reload", "dir": "/m/v2", "version": "v2"})
    assert f.ops(2) == f.ops(3) == ["prepare"] and f.ops(1) == []  # the asker loaded it already
    rid = f.told[2][0]["round"]
    f.answer_all("prepared", rid, 2, ok=True, version="v2")
    assert f.ops(2) == ["prepare"] and not f.adopted  # worker 3 has not loaded it yet: nobody swaps
    f.answer_all("prepared", rid, 3, ok=True, version="v2")
    assert f.adopted == ["/m/v2"] and f.ops(2) == f.ops(3) == ["prepare", "commit"] and f.ops(1) == []
    f.answer_all("committed", rid, 2, 3)
    assert f.told[1] == [{"op": "done", "ok": True, "error": None}] and f.reloads.round is None


@pytest.mark.parametrize("how", ["fails", "dies", "other-version"])
def test_one_worker_that_cannot_load_aborts_the_round_everywhere(how):
    f = Fake([1, 2, 3])
    f.reloads.message(1, {"op": "reload", "dir": "/m/v2", "version": "v2"})
    rid = f.told[2][0]["round"]
    f.answer_all("prepared", rid, 2, ok=True, version="v2")
    if how == "fails":
        f.answer_all("prepared", rid, 3, ok=False, error="/m/v2/model.safetensors: truncated")
        reason = "worker 3 could not load it: /m/v2/model.safetensors: truncated"
    elif how == "dies":
        f.pids.remove(3)
        f.reloads.gone(3)
        reason = "worker 3 died while loading it"
    else:
        f.answer_all("prepared", rid, 3, ok=True, version="v3")
        reason = "worker 3 loaded version v3, not v2: the directory changed during the reload"
    assert f.told[1] == [{"op": "done", "ok": False, "error": reason}]
    assert f.ops(2) == ["prepare", "abort"] and not f.adopted  # what worker 2 loaded is dropped
    f.answer_all("prepared", rid, 3, ok=True, version="v2")  # a late answer to the ended round changes nothing
    assert f.reloads.round is None and not f.adopted


def test_timeouts_a_second_request_and_workers_started_during_a_round():
    f = Fake([1, 2])
    f.reloads.timeout_s = 0.05
    f.reloads.message(1, {"op": "reload", "dir": "/m/v2", "version": "v2"})
    f.reloads.message(2, {"op": "reload", "dir": "/m/v3", "version": "v3"})  # one round at a time
    assert f.told[2][-1]["op"] == "done" and "another reload is in progress" in f.told[2][-1]["error"]
    f.pids.append(4)  # a worker started during the prepare phase loads the new directory too
    f.told[4] = []
    f.reloads.joined(4)
    assert f.ops(4) == ["prepare"]
    time.sleep(0.06)
    f.reloads.tick()  # nobody answered in time: refused, nothing adopted
    assert f.told[1][-1]["ok"] is False and "did not load it within" in f.told[1][-1]["error"]
    assert not f.adopted and f.ops(4) == ["prepare", "abort"]
    # SIGHUP: every worker is a member; one that does not confirm its swap in time is killed (its
    # replacement starts on the adopted directory)
    assert f.reloads.begin("/m/v1")
    rid = f.reloads.round.id
    f.answer_all("prepared", rid, 1, 2, 4, ok=True, version="v1")
    assert f.adopted == ["/m/v1"]
    f.pids.append(5)
    f.told[5] = []
    f.reloads.joined(5)  # started after the adoption: it loads /m/v1 at start, no prepare needed
    assert f.ops(5) == []
    f.answer_all("committed", rid, 1, 2)
    time.sleep(0.06)
    f.reloads.tick()
    assert f.killed == [4] and f.reloads.round is None


# --- a real server with two workers -------------------------------------------------------------------

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
import _serve_models as models  # noqa: E402


def _other_weights(src: Path, dst: Path) -> None:
    """``dst``: the model of ``src`` with one bias moved, so it is a valid model of another version."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state["dnn.net.0.bias"] = state["dnn.net.0.bias"] + 0.05
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "deepfm-model"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``deepfm serve root/served --workers 2`` with an admin token: (process, base URL, root, log path)."""
    root = tmp_path_factory.mktemp("reload-all") / "root"
    root.mkdir()
    shutil.copytree(models.criteo_model(), root / "served")
    _other_weights(root / "served", root / "other")
    shutil.copytree(root / "served", root / "broken")
    weights = root / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    shutil.copytree(root / "served", root.parent / "outside")
    port = models.free_port()
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"), DEEPFM_SERVE_ADMIN_TOKEN=TOKEN)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = root.parent / "server.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", str(root / "served"), "--workers", "2",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        models.wait_until(healthy)
        models.wait_until(lambda: len(models.children(proc.pid)) == 2)
        yield proc, base, root, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        log.close()


def _versions(base: str, n: int = 40) -> tuple[set[str], set[str]]:
    """The model versions of ``n`` predictions, each on a new connection (the kernel spreads them over the
    workers), and the pids of the workers that have answered predictions so far."""
    seen = set()
    for _ in range(n):
        resp = httpx.post(base + "/v1/predict", json=ROW, headers={"connection": "close"}, timeout=10)
        assert resp.status_code == 200, resp.text
        seen.add(resp.json()["model_version"])
    text = httpx.get(base + "/metrics", headers={"connection": "close"}, timeout=10).text
    return seen, {s["pid"] for s, v in models.metric_samples(text, "deepfm_worker_requests") if v > 0}


def _both_answer(base: str, proc) -> set[str]:
    """The versions every worker serves, once predictions have reached both (fails if they differ)."""
    workers = {str(p) for p in models.children(proc.pid)}
    seen: set[str] = set()
    for _ in range(20):
        versions, answered = _versions(base)
        seen |= versions
        if workers <= answered:
            return seen
    pytest.fail(f"not every worker answered: {answered} of {workers}")


class _Burst:
    """Four clients sending predictions (a new connection each) until the block ends: (start time, version)
    of each answer, and any answer that is not a 200."""

    def __init__(self, base: str) -> None:
        import threading

        self.base, self.stop = base, threading.Event()
        self.results: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client) for _ in range(4)]

    def _client(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                resp = httpx.post(self.base + "/v1/predict", json=ROW, headers={"connection": "close"}, timeout=60)
            except httpx.HTTPError as err:
                self.failures.append(repr(err))
                continue
            if resp.status_code != 200:
                self.failures.append(resp.text)
            else:
                self.results.append((started, resp.json()["model_version"]))

    def __enter__(self) -> _Burst:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_refusals_are_those_of_one_worker(server):
    proc, base, root, _ = server
    before = _both_answer(base, proc)
    assert httpx.post(base + "/v1/reload", json={}, timeout=30).status_code == 401
    assert httpx.post(base + "/v1/reload", json={}, headers={"authorization": "Bearer nope"},
                      timeout=30).status_code == 403
    for path in (str(root.parent / "outside"), "../outside", str(root / ".." / "outside")):
        resp = httpx.post(base + "/v1/reload", json={"model_dir": path}, headers=ADMIN, timeout=30)
        assert resp.status_code == 403 and "outside" not in resp.text, resp.text
    assert _both_answer(base, proc) == before


def test_a_failing_reload_leaves_every_worker_on_the_old_version(server):
    proc, base, root, _ = server
    (old,) = _both_answer(base, proc)
    for _ in range(4):  # whichever worker answers it
        resp = httpx.post(base + "/v1/reload", json={"model_dir": "broken"}, headers=ADMIN, timeout=300)
        assert resp.status_code == 409, resp.text
        detail = resp.json()["detail"]
        assert f"still serving version {old}" in detail and "model.safetensors: truncated" in detail, detail
    assert _both_answer(base, proc) == {old}


def test_a_reload_reaches_every_worker_and_the_ones_started_later(server):
    proc, base, root, log_path = server
    (old,) = _both_answer(base, proc)
    with _Burst(base) as burst:  # clients keep predicting through the reload, on both workers
        time.sleep(0.5)
        resp = httpx.post(base + "/v1/reload", json={"model_dir": "other"}, headers=ADMIN, timeout=300)
        answered = time.monotonic()
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    new = resp.json()["version"]
    assert new != old and resp.json()["path"] == str((root / "other").resolve())
    assert burst.failures == [] and len(burst.results) > 20  # none dropped
    assert {v for _, v in burst.results} <= {old, new}
    assert {v for started, v in burst.results if started > answered} == {new}  # after the 200: only the new
    assert _both_answer(base, proc) == {new}  # on fresh connections to both workers too
    text = httpx.get(base + "/metrics", headers={"connection": "close"}, timeout=10).text
    assert models.metric(text, "deepfm_model_reloads_total", result="ok") == 2  # one swap in each worker

    workers = models.children(proc.pid)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    now = models.wait_until(lambda: (c := models.children(proc.pid)) and len(c) == 2 and victim not in c and c)
    replacement = (now - workers).pop()
    models.wait_until(lambda: str(replacement) in _versions(base, 10)[1])  # it answers...
    assert _both_answer(base, proc) == {new}  # ...with the directory reloaded, not the one given at start
    info = httpx.get(base + "/v1/model", headers={"connection": "close"}, timeout=10).json()
    assert info["path"] == str((root / "other").resolve())

    proc.send_signal(signal.SIGHUP)  # the current directory, in every worker: still the new model
    models.wait_until(lambda: "reloaded" in log_path.read_text() and "in every worker" in log_path.read_text())
    assert _both_answer(base, proc) == {new}
    assert httpx.post(base + "/v1/reload", json={"model_dir": "served"}, headers=ADMIN,
                      timeout=300).json()["version"] == old  # and back
    assert _both_answer(base, proc) == {old}
