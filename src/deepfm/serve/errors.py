"""The server's one error shape: ``{"detail": text, "errors": [{"row", "field", "message"}]}``.

Every 4xx the server writes goes through ``RequestError.response`` (route errors, validation errors, the
body-size and depth limits in the middleware, Starlette's own HTTP errors), and every list of problems is
collected by ``Problems``, which owns the cap on how many a response lists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_ERRORS = 20  # a response lists at most this many problems (a 10,000-row request may have 10,000)


@dataclass
class ErrorItem:
    """One problem: the 0-based row of the request and the field it concerns, where there is one."""

    row: int | None
    field: str | None
    message: str

    def text(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class RequestError(Exception):
    """A client error: answered with ``status`` and a message naming the row(s) and field(s)."""

    def __init__(self, status: int, errors: list[ErrorItem] | str, headers: dict[str, str] | None = None,
                 truncated: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.errors = [ErrorItem(None, None, errors)] if isinstance(errors, str) else errors[:MAX_ERRORS]
        truncated = truncated or (not isinstance(errors, str) and len(errors) > MAX_ERRORS)
        more = f" (showing the first {MAX_ERRORS} problems)" if truncated else ""
        self.detail = "; ".join(e.text() for e in self.errors) + more
        super().__init__(self.detail)

    def to_json(self) -> dict[str, Any]:
        return {"detail": self.detail, "errors": [asdict(e) for e in self.errors]}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_json(), status_code=self.status, headers=self.headers)


class Problems:
    """Collects the problems of one request; raises ``RequestError`` once it holds ``MAX_ERRORS`` of them
    (there is no point checking the rest) or, on ``raise_any``, if it holds any."""

    def __init__(self, status: int = 422) -> None:
        self.status = status
        self.items: list[ErrorItem] = []

    def add(self, row: int | None, field: str | None, message: str) -> None:
        self.items.append(ErrorItem(row, field, message))
        if len(self.items) >= MAX_ERRORS:
            raise RequestError(self.status, self.items, truncated=True)

    def raise_any(self) -> None:
        if self.items:
            raise RequestError(self.status, self.items)


def _location(loc: tuple) -> tuple[int | None, str | None, str]:
    """A pydantic error location in the body -> (row, field, where-in-the-row text)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    row = fld = None
    rest: list[str] = []
    if len(parts) >= 2 and parts[0] == "rows" and isinstance(parts[1], int):
        row = parts[1]
        parts = parts[2:]
        if len(parts) >= 2 and parts[0] == "features":
            fld = str(parts[1])
            parts = parts[2:]
        elif parts:
            fld = str(parts[0])
            parts = parts[1:]
    elif parts:
        fld = str(parts[0])
        rest = [str(p) for p in parts[1:]]
        parts = []
    rest += [str(p) for p in parts]
    return row, fld, ".".join(rest)


def _one_problem(e: dict[str, Any], problems: Problems) -> None:
    """One pydantic error -> a problem (a body that is not JSON, or not an object, makes the answer a 400)."""
    if e.get("type") == "json_invalid":
        problems.status = 400
        ctx = e.get("ctx") or {}
        at = e["loc"][-1] if len(e["loc"]) > 1 else "?"
        problems.add(None, None, f"malformed JSON body: {ctx.get('error', e.get('msg'))} (at character {at})")
        return
    loc = tuple(e.get("loc", ()))
    if loc in (("body",), ()) and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
        problems.status = 400
        problems.add(None, None, 'the request body must be a JSON object {"rows": [...]} sent with '
                                 "Content-Type: application/json")
        return
    row, fld, rest = _location(loc)
    msg = e.get("msg", "invalid")
    if e.get("type") == "missing" and fld is not None:
        msg = "is required"
    elif e.get("type") == "extra_forbidden":
        msg = "unknown key"
    problems.add(row, fld, f"{rest}: {msg}" if rest else msg)


def validation_error(err: RequestValidationError) -> RequestError:
    """FastAPI's body validation errors -> our error (400 for a body that is not a JSON object, else 422)."""
    problems = Problems(422)
    try:
        for e in err.errors():
            _one_problem(e, problems)
    except RequestError as full:
        return full
    if not problems.items:
        problems.add(None, None, "invalid request body")
    return RequestError(problems.status, problems.items)
