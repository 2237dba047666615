"""The pure-ASGI layer in front of the routes: request metrics, the JSON content type, the body-size limit."""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfm.serve.errors import RequestError
from deepfm.serve.metrics import Metrics


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit:,} bytes")


class BodyTooSlow(StarletteHTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} seconds")


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


class ServeMiddleware:
    """Counts every request (status, latency) and refuses bodies over ``max_body`` bytes, whether the
    Content-Length says so up front or the body grows past it while streaming, and bodies that take longer
    than ``body_timeout`` seconds to arrive."""

    def __init__(self, app, metrics: Metrics, max_body: int, body_timeout: float = 30.0) -> None:
        self.app, self.metrics, self.max_body, self.body_timeout = app, metrics, max_body, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST":
            # every POST body is JSON whatever Content-Type says (curl -d sends a form type by default)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        start = time.perf_counter()
        status = {"code": 500, "started": False}
        self.metrics.in_flight.inc()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            refusal = self._length_refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_wrapper)
                return
            try:
                await self.app(scope, self._counting(receive), send_wrapper)
            except (BodyTooLarge, BodyTooSlow) as err:
                if not status["started"]:
                    await RequestError(err.status_code, str(err.detail)).response()(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe(scope.get("method", ""), scope.get("path", ""), status["code"],
                                 time.perf_counter() - start)

    def _length_refusal(self, scope) -> RequestError | None:
        length = _header(scope, b"content-length")
        if length is None:
            return None
        try:
            too_big = int(length) > self.max_body
        except ValueError:
            return RequestError(400, "invalid Content-Length header")
        return RequestError(413, f"request body exceeds the limit of {self.max_body:,} bytes") if too_big else None

    def _counting(self, receive):
        received = 0
        deadline = time.monotonic() + self.body_timeout
        complete = False

        async def receive_wrapper():
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect is not the client's slowness
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return receive_wrapper
