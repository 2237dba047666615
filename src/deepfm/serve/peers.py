"""A forked worker's end of its link to the parent (``deepfm serve --workers N``), through which a reload
reaches every worker.

The link is one end of a Unix socket pair the parent makes for each worker at fork time: it has no name and
no address, so nothing but the two processes can use it, and only a request that passed the admin token and
the root check (``deepfm.serve.admin``) ever sends anything on it. The messages are JSON lines:

    worker -> parent   {"op": "reload", "dir", "version"}        the worker answering POST /v1/reload loaded dir
    parent -> worker   {"op": "prepare", "round", "dir"}          load dir completely, swap nothing yet
    worker -> parent   {"op": "prepared", "round", "ok", "version" | "error"}
    parent -> worker   {"op": "commit", "round"} | {"op": "abort", "round"}
    worker -> parent   {"op": "committed", "round"}
    parent -> worker   {"op": "done", "ok", "error"}              to the worker that asked: swap (ok) or not

The parent's side, which decides commit or abort, is ``deepfm.serve.rounds``. Messages are handled one at a
time, in order, by one task of the worker's event loop; models load in a thread, so requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfm.errors import DeepFMError

if TYPE_CHECKING:
    from deepfm.serve.state import ServedModel, ServingState

PARENT_GRACE_S = 30.0  # beyond the parent's own reload timeout: past it, the parent is taken for gone


def one_line(err: BaseException) -> str:
    text = str(err) if isinstance(err, DeepFMError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:2000]


class ParentLink:
    """The worker's side: asks the parent to reload everywhere, and loads / swaps when the parent says."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock, self.timeout_s = sock, timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._answer: asyncio.Future | None = None  # the parent's "done" for this worker's own request
        self._mine: tuple[ServedModel, Path] | None = None  # what this worker swaps in on "done" ok
        self._prepared: tuple[int, ServedModel, Path] | None = None  # (round, model, dir) awaiting commit

    async def start(self, state: ServingState) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._task = asyncio.get_running_loop().create_task(self._serve(state, reader))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def _send(self, **message: Any) -> None:
        if self._writer is None:
            raise DeepFMError("this worker has no link to the server's parent process")
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()

    async def everywhere(self, state: ServingState, served: ServedModel, path: Path) -> None:
        """This worker loaded ``served`` from ``path``: have every other worker load it too, and return once
        all have swapped it in (this one last, when the parent says so); else raise ``DeepFMError`` with the
        reason, every worker still on its current model."""
        if self._answer is not None:
            state.metrics.reloaded(False)
            raise DeepFMError("another reload is in progress on this worker; try again when it has finished")
        self._answer, self._mine = asyncio.get_running_loop().create_future(), (served, path)
        try:
            await self._send(op="reload", dir=str(path), version=served.version)
            answer = await asyncio.wait_for(asyncio.shield(self._answer), self.timeout_s + PARENT_GRACE_S)
        except (OSError, asyncio.TimeoutError):
            answer = {"ok": False, "error": "the server's parent process did not answer"}
        finally:
            self._answer = None
        if not answer.get("ok"):
            state.metrics.reloaded(False)
            raise DeepFMError(answer.get("error") or "the other workers could not load it")

    async def _serve(self, state: ServingState, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                await self._handle(state, message)
            except (ValueError, KeyError, TypeError) as err:  # never from our parent; kept off the event loop's log
                print(f"deepfm serve: a bad message from the parent ({one_line(err)})", flush=True)

    async def _handle(self, state: ServingState, message: dict[str, Any]) -> None:
        from fastapi.concurrency import run_in_threadpool

        op = message["op"]
        if op == "prepare":
            self._prepared = None
            try:
                served = await run_in_threadpool(state.prepare, Path(message["dir"]))
            except Exception as err:  # noqa: BLE001  (the parent reports it to whoever asked)
                await self._send(op="prepared", round=message["round"], ok=False, error=one_line(err))
                return
            self._prepared = (message["round"], served, Path(message["dir"]))
            await self._send(op="prepared", round=message["round"], ok=True, version=served.version)
        elif op == "commit":
            if self._prepared is not None and self._prepared[0] == message["round"]:
                _, served, path = self._prepared
                state.install(served, path)
            self._prepared = None
            await self._send(op="committed", round=message["round"])
        elif op == "abort":
            self._prepared = None
        elif op == "done":
            mine, self._mine = self._mine, None
            if message.get("ok") and mine is not None:  # even after this worker's request gave up waiting:
                state.install(*mine)                   # the others serve it now, so this one must too
            if self._answer is not None and not self._answer.done():
                self._answer.set_result(message)
