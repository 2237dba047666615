"""Connections handed from the parent to the workers (``deepfm serve --workers N``).

Why not let every worker accept on the shared listening socket: a worker's event loop accepts every
connection waiting when it wakes, so clients that connect at about the same time (a load balancer's pool,
a benchmark's clients) all land on the worker that woke first, and keep-alive keeps them there. Two
clients of 1,000-row ranking requests then share one worker's interpreter lock while the other worker idles
(bench/SERVING.md has the figures). The parent instead accepts each connection and passes its descriptor
(``SCM_RIGHTS`` over a Unix socket pair made at fork, one per worker) to the next ready worker in turn, and
the worker serves it as if it had accepted it. A worker's channel carries one byte per descriptor, so each
``recvmsg`` of one byte brings exactly its own descriptor. A channel that closes means the parent is gone
(killed: otherwise it stops its workers itself); the worker then finishes what is open and exits.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

_MARK = b"c"


def send_connection(channel: socket.socket, conn: socket.socket) -> bool:
    """Pass ``conn`` to the worker at the other end of ``channel`` (non-blocking); False if it cannot take
    it now (its channel is full or closed). The caller closes its own copy of ``conn`` either way."""
    try:
        return socket.send_fds(channel, [_MARK], [conn.fileno()]) == 1
    except OSError:  # BlockingIOError (a full channel: a worker that does not read), or the worker is gone
        return False


def receive_connections(channel: socket.socket) -> tuple[list[socket.socket], bool]:
    """Every connection waiting on ``channel`` (non-blocking), as non-blocking sockets with Nagle's delay off,
    and whether the parent closed the channel (it is gone: no more will come)."""
    out: list[socket.socket] = []
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, 1, 1)
        except BlockingIOError:
            return out, False
        except OSError:
            return out, True
        if not data:
            return out, True
        for fd in fds:
            conn = socket.socket(fileno=fd)
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out.append(conn)


class HandedServer(uvicorn.Server):
    """A uvicorn server with no listening socket of its own: it serves the connections its parent hands
    over on ``channel`` with uvicorn's protocol for this config (the same class, limits and state as for a
    connection it accepted itself)."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
        super().__init__(config)
        self.channel = channel
        self.channel.setblocking(False)
        self._opening: set[asyncio.Task] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's lifespan; no listener
        if self.should_exit:
            return
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._take)

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                               app_state=self.lifespan.state)

    def _take(self) -> None:
        loop = asyncio.get_running_loop()
        conns, closed = receive_connections(self.channel)
        for conn in conns:
            task = loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        if closed:  # the parent died (killed: it stops its workers otherwise): finish what is open and exit
            loop.remove_reader(self.channel.fileno())
            self.should_exit = True

    async def _open(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, conn)
        except OSError:  # the client left before the worker took its connection
            conn.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.channel.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())  # no new connections
            self.channel.close()
        await super().shutdown(sockets)  # those open finish as uvicorn's do
