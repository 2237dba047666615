"""What one client may take from the server, beyond rows and body size (``middleware``): JSON nesting depth,
and time (headers, body, idle keep-alive).

* Depth: Python's JSON reader and pydantic recurse once per level, and a value nested some hundreds deep
  ends in a RecursionError (a 500) somewhere between parsing and writing the id back. ``LimitedRoute`` counts
  the depth of the raw body (a running sum of the brackets outside strings: ``scan_body``) before
  anything parses it, and answers 400 past ``max_json_depth``.
* Headers: uvicorn times out idle keep-alive connections but not a connection that never finishes its
  headers. ``HeaderTimeoutProtocol`` closes a connection that has not completed a request's headers
  within ``header_timeout_s`` of opening (or of its previous response). A slow client holds a socket, never a
  worker thread (the server is asynchronous); ``limit_concurrency`` caps the sockets.
* Body: ``ServeMiddleware`` gives a request ``body_timeout_s`` to send its whole body (408).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from deepfm.serve.errors import RequestError

_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


_KEPT = b'"[]{}'
_DROPPED = bytes(b for b in range(256) if b not in _KEPT)


_STEPS = _STEP.tolist()  # Python ints: a running sum in int8 would wrap at depth 128
_SHORT = 512  # below this many quotes and brackets a Python loop beats numpy's fixed cost (a one-row request)


def _short_depth(marks: bytes) -> int:
    """``json_depth`` of the quotes and brackets of a text without backslashes."""
    depth = deepest = 0
    inside = False
    for b in marks:
        if b == 34:  # '"'
            inside = not inside
        elif not inside:
            depth += _STEPS[b]
            deepest = max(deepest, depth)
    return deepest


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text; brackets inside strings do not count. A
    quote opens or closes a string unless an odd run of backslashes precedes it."""
    return scan_body(body, 0)[0]


def scan_body(body: bytes, digits: int) -> tuple[int, bool]:
    """(``json_depth(body)``, whether a run of ``digits`` or more ASCII digits occurs anywhere in it), in one
    pass of the native kernel (``deepfm/native/json_scan.c``) where it is built, else in numpy: over only the
    quotes and brackets when the text has no backslash (the usual request), else over every byte. The two
    follow the same rule, and a test compares them."""
    from deepfm import native

    got = native.json_scan(body)
    if got is not None:
        return got[0], digits > 0 and got[1] >= digits
    return _numpy_depth(body), digits > 0 and b"0" * digits in body.translate(_DIGITS)


_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))  # digits -> "0", every other byte -> " "


def _numpy_depth(body: bytes) -> int:
    if b"\\" not in body:
        marks = body.translate(None, _DROPPED)
        if len(marks) <= _SHORT:
            return _short_depth(marks)
        kept = np.frombuffer(marks, np.uint8)
        quote = kept == ord('"')
    else:
        kept = np.frombuffer(body, np.uint8)
        positions = np.arange(kept.size)
        backslash = kept == ord("\\")
        last_plain = np.maximum.accumulate(np.where(backslash, -1, positions))  # the last byte not a backslash
        run_before = positions - 1 - np.concatenate(([-1], last_plain[:-1]))  # backslashes right before a byte
        quote = (kept == ord('"')) & (run_before % 2 == 0)
    if kept.size == 0:
        return 0
    outside = np.cumsum(quote, dtype=np.int64) % 2 == 0  # after an even number of quotes (a closing one too)
    steps = np.where(outside, _STEP[kept], 0)
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


class LimitedRoute(APIRoute):
    """A route whose JSON body is refused (400) past the server's nesting depth, before it is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if request.method == "POST":
                limit = request.app.state.serving.settings.max_json_depth
                body = await request.body()  # read once: the handler below gets the same bytes
                if json_depth(body) > limit:
                    raise RequestError(400, f"the JSON body is nested deeper than {limit} levels")
            return await handler(request)

        return route


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a deadline for request headers,
    ``config.deepfm_header_timeout`` seconds (set by ``deepfm serve``; none: no deadline)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        seconds = getattr(self.config, "deepfm_header_timeout", None)
        if seconds:
            self.loop.call_later(seconds, self._expire, self.cycle)

    def _expire(self, armed) -> None:
        # no request's headers completed since the timer was armed: the connection is slow or idle
        if self.cycle is armed and not self.transport.is_closing():
            self.transport.close()
