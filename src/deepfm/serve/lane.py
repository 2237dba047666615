"""The short way for a well-formed predict request: the same answer as the ``/v1/predict`` route, without
FastAPI's routing, dependency solving and pydantic body model, which cost more than a coalesced one-row
forward pass (a cProfile of 20 clients x 1-row requests: bench/SERVING.md).

``PredictLane`` sits between ``ServeMiddleware`` (metrics, body size and time) and the app. For
``POST /v1/predict`` it reads the body and takes the request itself only when the body is exactly what the
route's model accepts in its plainest form: within the depth limit, a JSON object with ``rows`` (a list of
objects each with ``features``, an object, and optionally ``id``, a finite JSON value) and at most
``"explain": false``, and no more rows than the limit. Anything else (malformed JSON, unknown keys, a wrong
type, ``"explain": true``, too many rows) goes to the route with the same bytes, so every refusal keeps
its one message and status. From there both run ``routes.answer_predict``: the checks of each value, the
batcher, the response.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from deepfm.serve.errors import RequestError
from deepfm.serve.limits import scan_body
from deepfm.serve.routes import answer_predict
from deepfm.serve.schemas import has_non_finite

_ROW_KEYS = frozenset({"id", "features"})
LONG_NUMBER = 19  # digits: an integer outside int64 has at least 19


def parse_json(body: bytes, long_number: bool | None = None) -> Any:
    """``json.loads``, through orjson (about 2x faster on a 1,000-row request) when it reads ``body`` the
    same: orjson refuses what Python's reader takes beyond strict JSON (NaN, lone surrogates, a BOM: then
    Python's reader decides), and reads an integer beyond 64 bits as a float, so a body with a run of
    ``LONG_NUMBER`` or more digits anywhere (strings included) is read by Python's reader too.
    ``long_number``: whether it has one, if the caller scanned the body already (``scan_body``)."""
    if long_number is None:
        long_number = scan_body(body, LONG_NUMBER)[1]
    if not long_number:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)

_BODY_KEYS = frozenset({"rows", "explain"})


def plain_rows(body: bytes, max_depth: int, max_rows: int) -> tuple[list[Any], list[dict[str, Any]]] | None:
    """(ids, features) of a body the route would accept as it stands, else None (the route decides)."""
    depth, long_number = scan_body(body, LONG_NUMBER)
    if depth > max_depth:
        return None
    try:
        obj = parse_json(body, long_number)
    except ValueError:
        return None
    if type(obj) is not dict or not obj.keys() <= _BODY_KEYS or obj.get("explain", False) is not False:
        return None
    rows = obj.get("rows")
    if type(rows) is not list or len(rows) > max_rows:
        return None
    ids, features = [], []
    for row in rows:
        if type(row) is not dict or not row.keys() <= _ROW_KEYS:
            return None
        feats, rid = row.get("features"), row.get("id")
        if type(feats) is not dict or has_non_finite(rid):
            return None
        ids.append(rid)
        features.append(feats)
    return ids, features


class PredictLane:
    """ASGI: well-formed predict requests answered here, everything else passed on unchanged."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/v1/predict":
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        settings = self.state.settings
        plain = plain_rows(body, settings.max_json_depth, settings.max_rows) if body is not None else None
        if plain is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        try:
            response = await answer_predict(self.state, *plain, explain=False)
        except RequestError as err:
            response = err.response()
        await response(scope, receive, send)


async def _read_body(receive) -> tuple[list[dict], bytes | None]:
    """Every message up to the body's end (or a disconnect: then no body) and the body."""
    messages, chunks = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def _replay(messages: list[dict], receive):
    """A ``receive`` that gives ``messages`` again, then whatever the connection sends next."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
