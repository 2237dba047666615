"""``deepfm serve --workers N``: one parent process that has imported everything forks the N workers.

Why fork and not spawn: a spawned worker (uvicorn's supervisor) imports Python, torch, polars and FastAPI
again, about 255 MiB of private memory each, and the supervisor holds about 190 MiB more. Forked from a
parent that has imported them (and frozen its objects out of the collector's scans, ``gc.freeze``, so that
the children's collections do not write to those pages), the workers share those pages copy-on-write, as
they share the memory-mapped table; each worker then loads the model itself (bench/SERVING.md has the PSS).

The parent runs no inference and starts no torch or OpenMP threads (a thread pool does not survive a fork);
it binds the listening socket, accepts the connections and hands each to the next ready worker in turn
(``deepfm.serve.handoff``: a worker accepting for itself takes every connection that arrives at once). It
restarts a worker that dies (giving up after ``MAX_QUICK_FAILURES`` in a row that lived less than
``QUICK_S``), and on SIGTERM/SIGINT stops the workers (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``) and
exits 0. A worker that fails to load the model at start makes the command fail with that worker's error.

Reloads reach every worker or none: each worker has a link to the parent (a Unix socket pair made at fork:
nothing else can reach it), a ``POST /v1/reload`` that passed the admin checks in one worker goes through
the parent to all of them, and SIGHUP to the parent reloads the current directory the same way
(``deepfm.serve.rounds``). The parent keeps the directory being served: a worker it starts later (after a
crash) loads that one, not the one given at start.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from deepfm.errors import DeepFMError
from deepfm.serve.handoff import send_connection
from deepfm.serve.rounds import Reloads

QUICK_S = 30.0  # a worker that dies sooner than this after its start counts as a failure to start
MAX_QUICK_FAILURES = 5  # in a row: the parent gives up and exits non-zero (a worker that cannot live)
STOP_TIMEOUT_S = 20.0  # a worker's graceful stop (uvicorn's own is 10 s) before SIGKILL
READY = b"ready"
ACCEPTS_PER_WAKE = 64  # connections the parent accepts before it looks at its workers again


def serve_forked(settings, sock: socket.socket, opts: dict[str, Any]) -> int:
    """Fork ``settings.workers`` workers serving on ``sock``; returns when they are stopped (0), or raises
    ``DeepFMError`` when a worker cannot start. ``PROMETHEUS_MULTIPROC_DIR`` must be set before this
    imports the app (prometheus_client picks its mode at import)."""
    import deepfm.serve.app  # noqa: F401  (torch, polars, FastAPI, prometheus_client: once, shared by all)

    gc.collect()
    gc.freeze()  # the imported objects stay out of the children's collections: their pages stay shared
    # the root stays the one of the directory given at start, whichever directory later workers load
    settings = settings.model_copy(update={"model_root": str(settings.allowed_root(settings.model_dir))})
    return Parent(settings, sock, opts).run()


def _worker(settings, channel: socket.socket, opts: dict[str, Any], report: int, link: socket.socket) -> int:
    """A forked worker: load the model, tell the parent (``READY`` or the error), serve the connections the
    parent hands over on ``channel`` until stopped."""
    import uvicorn

    from deepfm.serve.cli import _one_worker_app
    from deepfm.serve.handoff import HandedServer
    from deepfm.serve.peers import ParentLink

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # the parent's handlers are not this process's (uvicorn sets its own)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's lifespan takes it (a reload): never fatal
    try:
        peers = ParentLink(link, settings.reload_timeout_s)
        config = uvicorn.Config(_one_worker_app(settings, peers), **opts)
        config.deepfm_header_timeout = settings.header_timeout_s  # read by HeaderTimeoutProtocol
        server = HandedServer(config, channel)
    except BaseException as err:  # noqa: BLE001  (the parent reports it: this process only exits)
        said = str(err) if isinstance(err, DeepFMError) else f"{type(err).__name__}: {err}"
        os.write(report, said.encode()[:4000])
        return 1
    os.write(report, READY)
    os.close(report)
    server.run()
    return 0


class Parent:
    """The workers' parent: starts, watches, restarts and stops them."""

    def __init__(self, settings, sock: socket.socket, opts: dict[str, Any]) -> None:
        self.settings, self.sock, self.opts = settings, sock, opts
        self.workers: dict[int, float] = {}  # pid -> start time
        self.pending: dict[int, tuple[int, bytes]] = {}  # report fd -> (pid, what it said so far)
        self.ready: set[int] = set()
        self.started = False  # every first worker reported ready
        self.quick_failures = 0
        self.signal: int | None = None
        self.links: dict[int, socket.socket] = {}  # pid -> the parent's end of the worker's link
        self.channels: dict[int, socket.socket] = {}  # pid -> the parent's end of the worker's connection channel
        self.turn = 0  # the next connection goes to the ready worker at this position (in pid order)
        self.accept_after = 0.0  # after a failed accept (too many open files): a pause, not a busy loop
        self.unread: dict[int, bytes] = {}  # pid -> the start of a line not yet whole
        self.hup = False  # a SIGHUP waits for the reload in progress
        self.reloads = Reloads(self._tell, lambda: list(self.workers), self._adopt, self._kill,
                               settings.reload_timeout_s)

    def run(self) -> int:
        self.sock.listen(self.opts.get("backlog", 2048))  # uvicorn's default backlog
        self.sock.setblocking(False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            for _ in range(self.settings.workers):
                self._fork()
            while True:
                if self.signal == signal.SIGHUP:
                    self.signal, self.hup = None, True
                if self.hup and self.reloads.begin(str(self.settings.model_dir)):
                    self.hup = False  # (the current directory: every worker reloads it, or none does)
                if self.signal is not None:
                    return self.stop()
                self._read_reports()
                self.reloads.tick()
                self._reap()
        except BaseException:
            self.stop()
            raise

    def _on_signal(self, sig: int, _frame) -> None:
        if self.signal is None or sig != signal.SIGHUP:
            self.signal = sig

    def _fork(self) -> None:
        read, write = os.pipe()
        ours, theirs = socket.socketpair()
        hand, take = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code (nor runs its atexit handlers)
            code = 1
            try:
                os.close(read)
                ours.close()
                hand.close()
                self.sock.close()  # the parent accepts: a worker that outlived it must not hold the port
                for fd in self.pending:
                    os.close(fd)
                for own in (*self.links.values(), *self.channels.values()):  # the other workers' are the parent's
                    own.close()
                code = _worker(self.settings, take, self.opts, write, theirs)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write)
        theirs.close()
        take.close()
        ours.settimeout(5.0)  # a write to a worker that reads nothing fails rather than blocks the parent
        hand.setblocking(False)  # a worker that takes no connections is skipped, not waited for
        self.workers[pid] = time.monotonic()
        self.pending[read] = (pid, b"")
        self.links[pid] = ours
        self.channels[pid] = hand
        self.reloads.joined(pid)  # a reload in progress: this worker loads its directory too

    def _tell(self, pid: int, message: dict[str, Any]) -> bool:
        link = self.links.get(pid)
        if link is None:
            return False
        try:
            link.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            return False
        return True

    def _adopt(self, directory: str) -> None:
        """A reload every worker loaded: the directory that workers started from now on load."""
        self.settings = self.settings.model_copy(update={"model_dir": directory})

    def _kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _takers(self) -> list[int]:
        return sorted(pid for pid in self.ready if pid in self.channels)

    def _accept(self) -> None:
        """Hand the waiting connections to the ready workers in turn; a connection no worker can take now
        is closed (the client sees the connection end and may retry)."""
        takers = self._takers()  # the ready workers do not change while the parent is in here
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. too many open files: the connection stays queued; said once a second
                print(f"deepfm serve: cannot accept a connection: {err}", file=sys.stderr, flush=True)
                self.accept_after = time.monotonic() + 1.0
                return
            with conn:
                for k in range(len(takers)):
                    pid = takers[(self.turn + k) % len(takers)]
                    if send_connection(self.channels[pid], conn):
                        self.turn = (self.turn + k + 1) % len(takers)
                        break
                else:
                    print("deepfm serve: no worker could take a connection; it was closed", file=sys.stderr,
                          flush=True)

    def _read_links(self, readable: list) -> None:
        """Whole lines from the workers' links, each handed to the reloads."""
        for pid, link in list(self.links.items()):
            if link not in readable:
                continue
            try:
                chunk = link.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:  # the worker is gone (reaped soon)
                link.close()
                del self.links[pid]
                self.unread.pop(pid, None)
                continue
            *lines, rest = (self.unread.get(pid, b"") + chunk).split(b"\n")
            self.unread[pid] = rest
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self.reloads.message(pid, message)

    def _read_reports(self) -> None:
        """New connections (while a worker is ready to take them), what starting workers said (``READY`` or
        their error) and the workers' links; waits a little when there is nothing."""
        # no ready worker (or a pause after a failed accept): connections wait in the kernel's queue
        listening = [self.sock] if self._takers() and time.monotonic() >= self.accept_after else []
        readable, _, _ = select.select([*listening, *self.pending, *self.links.values()], [], [], 0.2)
        if self.sock in readable:
            self._accept()
        self._read_links(readable)
        for fd in readable:
            if fd not in self.pending:
                continue
            pid, said = self.pending[fd]
            chunk = os.read(fd, 4096)
            if chunk:
                self.pending[fd] = (pid, said + chunk)
                continue
            del self.pending[fd]
            os.close(fd)
            if said == READY:
                self.ready.add(pid)
                self.started = self.started or (not self.pending and len(self.ready) == self.settings.workers)
            elif not self.started:  # a first worker that cannot load the model: the command fails with its error
                raise DeepFMError(f"a worker failed to start: {said.decode(errors='replace') or 'no message'}")
            elif said:
                print(f"deepfm serve: worker {pid} failed to start: {said.decode(errors='replace')}",
                      file=sys.stderr, flush=True)

    def _reap(self) -> None:
        while self.workers:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            started = self.workers.pop(pid, None)
            if started is None:
                continue
            self.ready.discard(pid)
            _forget_metrics(pid)
            self._unlink(pid)
            lived = time.monotonic() - started
            self.quick_failures = self.quick_failures + 1 if lived < QUICK_S else 0
            print(f"deepfm serve: worker {pid} died ({_describe(status)}) after {lived:.1f} s; starting another",
                  file=sys.stderr, flush=True)
            if self.quick_failures >= MAX_QUICK_FAILURES:
                raise DeepFMError(f"{self.quick_failures} workers in a row died within {QUICK_S:g} s of their start "
                                  f"(the last: {_describe(status)}); giving up. See the log above for why")
            if not self.started:
                self._drain(pid)
            self._fork()

    def _unlink(self, pid: int) -> None:
        for own in (self.links.pop(pid, None), self.channels.pop(pid, None)):
            if own is not None:
                own.close()
        self.unread.pop(pid, None)
        self.reloads.gone(pid)

    def _drain(self, pid: int) -> None:
        """A first worker died before reporting: its error (if it wrote one) ends the command."""
        for fd, (owner, said) in list(self.pending.items()):
            if owner == pid:
                said += _read_all(fd)
                del self.pending[fd]
                os.close(fd)
                raise DeepFMError(f"a worker failed to start: {said.decode(errors='replace') or 'no message'}")

    def _send(self, sig: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> int:
        """SIGTERM to every worker, SIGKILL to those still there after ``STOP_TIMEOUT_S``; all reaped."""
        self.sock.close()  # new connections are refused from now on; the open ones finish in their workers
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.workers:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                self.workers.pop(pid, None)
                _forget_metrics(pid)
                self._unlink(pid)
                continue
            if time.monotonic() > deadline:
                self._send(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
        for fd in self.pending:
            os.close(fd)
        self.pending.clear()
        return 0


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _forget_metrics(pid: int) -> None:
    """A worker gone (killed or not): its live gauges leave the shared metrics folder."""
    from deepfm.serve.metrics import multiprocess_dir

    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
