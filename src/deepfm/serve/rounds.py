"""The parent's side of a reload with ``--workers N``: every worker loads the new directory, and they all swap
only once every one of them has loaded it (the worker side and the messages: ``deepfm.serve.peers``).

A reload is a round with two phases. *Prepare*: every worker (those starting too, and any started during the
round) loads the directory completely, swapping nothing; the worker that answered ``POST /v1/reload`` has
loaded it already. If any worker fails to load it, dies, loads a different version (the directory changed
meanwhile) or does not answer within the timeout, the round is aborted: every worker drops what it loaded
and keeps serving its current model, and the asking worker answers 409 with the reason. *Commit*: all have
loaded it, so the parent makes it the current directory (a worker started from now on loads it), every
worker swaps (one reference each), and once all confirm, the asking worker swaps and answers 200. A worker
that does not confirm in time is killed, and its replacement starts on the new directory: after a 200 no
worker serves the old model. One round at a time; a request during a round is refused (409), a SIGHUP during
one waits for it to end.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Round:
    id: int
    dir: str
    asker: int | None  # the worker whose POST /v1/reload started it (None: SIGHUP)
    version: str | None  # the version the asker loaded (the first worker's, for SIGHUP)
    deadline: float
    members: set[int] = field(default_factory=set)  # every worker that must load it
    waiting: set[int] = field(default_factory=set)  # those yet to answer this phase
    committing: bool = False


class Reloads:
    """The rounds. ``send(pid, message)`` writes to a worker's link (False if it cannot), ``workers()`` lists
    the live workers, ``adopt(dir)`` makes ``dir`` the directory new workers load, ``kill(pid)`` ends a
    worker that does not confirm its swap."""

    def __init__(self, send: Callable[[int, dict[str, Any]], bool], workers: Callable[[], Iterable[int]],
                 adopt: Callable[[str], None], kill: Callable[[int], None], timeout_s: float) -> None:
        self.send, self.workers, self.adopt, self.kill, self.timeout_s = send, workers, adopt, kill, timeout_s
        self.round: Round | None = None
        self.ids = itertools.count(1)

    def begin(self, directory: str, asker: int | None = None, version: str | None = None) -> bool:
        """Start a round (False, and nothing started, while one is on)."""
        if self.round is not None:
            return False
        self.round = Round(next(self.ids), directory, asker, version, time.monotonic() + self.timeout_s)
        for pid in list(self.workers()):
            if pid != asker:
                self.joined(pid)
        self._advance()
        return True

    def joined(self, pid: int) -> None:
        """A worker started (or is there at the start of a round): it loads the round's directory too."""
        r = self.round
        if r is None or r.committing:  # committing: the directory is current already, the worker loads it
            return
        r.members.add(pid)
        r.waiting.add(pid)
        if not self.send(pid, {"op": "prepare", "round": r.id, "dir": r.dir}):
            self._abort(f"worker {pid} could not be reached")

    def message(self, pid: int, msg: dict[str, Any]) -> None:
        """A message from worker ``pid``."""
        op, r = msg.get("op"), self.round
        if op == "reload":
            if not self.begin(str(msg.get("dir")), pid, msg.get("version")):
                self.send(pid, {"op": "done", "ok": False,
                                "error": "another reload is in progress; try again when it has finished"})
            return
        if r is None or msg.get("round") != r.id or pid not in r.waiting:
            return  # an answer to a round already ended
        if op == "prepared" and not r.committing:
            if not msg.get("ok"):
                return self._abort(f"worker {pid} could not load it: {msg.get('error')}")
            if r.version is None:
                r.version = msg.get("version")
            elif msg.get("version") != r.version:
                return self._abort(f"worker {pid} loaded version {msg.get('version')}, not {r.version}: the "
                                   "directory changed during the reload")
            r.waiting.discard(pid)
        elif op == "committed" and r.committing:
            r.waiting.discard(pid)
        self._advance()

    def gone(self, pid: int) -> None:
        """Worker ``pid`` died."""
        r = self.round
        if r is None:
            return
        if pid == r.asker:
            r.asker = None
        if pid in r.waiting and not r.committing:
            return self._abort(f"worker {pid} died while loading it")
        r.waiting.discard(pid)
        r.members.discard(pid)
        self._advance()

    def tick(self) -> None:
        """Called often: a round past its deadline ends."""
        r = self.round
        if r is None or time.monotonic() < r.deadline:
            return
        late = ", ".join(map(str, sorted(r.waiting)))
        if not r.committing:
            return self._abort(f"worker(s) {late} did not load it within {self.timeout_s:g} s (--reload-timeout)")
        for pid in sorted(r.waiting):  # it has not swapped: its replacement starts on the new directory
            _log(f"worker {pid} did not confirm the swap to {r.dir} within {self.timeout_s:g} s; stopping it")
            self.kill(pid)
        r.waiting.clear()
        self._advance()

    def _advance(self) -> None:
        r = self.round
        if r is None or r.waiting:
            return
        if not r.committing:
            r.committing, r.waiting = True, set(r.members)
            r.deadline = time.monotonic() + self.timeout_s
            self.adopt(r.dir)
            for pid in sorted(r.members):
                if not self.send(pid, {"op": "commit", "round": r.id}):
                    r.waiting.discard(pid)  # gone: its replacement starts on the new directory
            if r.waiting:
                return
        self._end(True, None)

    def _abort(self, error: str) -> None:
        r = self.round
        assert r is not None
        for pid in sorted(r.members):
            self.send(pid, {"op": "abort", "round": r.id})
        self._end(False, error)

    def _end(self, ok: bool, error: str | None) -> None:
        r, self.round = self.round, None
        assert r is not None
        if r.asker is not None:
            self.send(r.asker, {"op": "done", "ok": ok, "error": error})
        elif ok:
            _log(f"reloaded {r.dir} in every worker (version {r.version})")
        else:
            _log(f"reload of {r.dir} failed, every worker keeps its current model: {error}")


def _log(text: str) -> None:
    print(f"deepfm serve: {text}", file=sys.stderr, flush=True)
