"""The HTTP JSON API (FastAPI on uvicorn): ``create_app(model_dir)``.

    POST /v1/predict   {"rows": [{"id": ..., "features": {column: value}}]} -> ids with probabilities, in order
    GET  /v1/model     fields, version, metrics of the model being served
    POST /v1/reload    {"model_dir": optional} load a model fully, then swap it in (SIGHUP: reload the current)
    GET  /healthz      liveness and the model version
    GET  /metrics      Prometheus text
    GET  /openapi.json the OpenAPI document (and /docs)

Every client mistake is a 4xx whose message names the row and the field; nothing a client sends yields a
5xx. A request takes one reference to the served model when it starts and keeps it to the end, so a reload
(which builds the new model completely before swapping one attribute) never disturbs requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfm.artifact import LoadedModel
from deepfm.errors import DeepFMError
from deepfm.predict import Predictor
from deepfm.serve.encode import (ErrorItem, FastEncoder, RequestError, frame_probs, request_codecs,
                                 validate_rows)
from deepfm.serve.metrics import Metrics
from deepfm.serve.schemas import (ErrorResponse, Health, ModelInfo, PredictRequest, PredictResponse,
                                  ReloadRequest, model_features_schema)

log = logging.getLogger("deepfm.serve")


@dataclass
class Settings:
    max_rows: int = 10_000
    max_body_bytes: int = 16 * 1024 * 1024
    fast_path_max_rows: int = 8  # 0 disables the pure-Python encoder
    reload_endpoint: bool = True
    device: str = "cpu"


@dataclass
class ServedModel:
    """A loaded model and everything a request needs from it; never mutated after construction."""

    predictor: Predictor
    fast: FastEncoder
    version: str
    loaded_at: float
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def loaded(self) -> LoadedModel:
        return self.predictor.loaded

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> ServedModel:
        path = Path(model_dir)
        predictor = Predictor(path, device=device, precision="fp32")
        digest = hashlib.sha256()
        for name in ("model.safetensors", "encoder.json"):
            with open(path / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        codecs = request_codecs(predictor.loaded.encoder.codecs, predictor.config.data)
        served = cls(predictor, FastEncoder(predictor), digest.hexdigest()[:16], time.time(),
                     {c.name: c for c in codecs})
        served.warm_up()
        return served

    def warm_up(self) -> None:
        """One prediction through each path, so the first request is not slower (and a broken model fails
        here, before it is swapped in)."""
        rows = self.validate([{}])
        p2 = frame_probs(self.predictor, rows)
        p1 = self.fast.probs(rows) if self.fast.enabled else p2
        if not np.array_equal(p1, p2):
            raise DeepFMError(f"{self.loaded.path}: the fast encoding path disagrees with the batch path "
                              f"({p1} vs {p2}); this is a deepfm bug")

    def validate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return validate_rows(rows, self.fields, self.predictor.config.data.label)

    def info(self, settings: Settings) -> dict[str, Any]:
        m = self.loaded
        fields = m.encoder.describe()
        return {"version": self.version, "path": str(m.path), "created": m.info.get("created"),
                "format_version": m.info.get("format_version"), "versions": m.info.get("versions"),
                "label": m.config.data.label, "fields": fields, "metrics": m.metrics,
                "loaded_at": self.loaded_at, "max_rows": settings.max_rows}


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit:,} bytes")


class ServeMiddleware:
    """Pure ASGI: request metrics (count, latency, errors) and the request body size limit."""

    def __init__(self, app, metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST":
            # every POST body is JSON whatever Content-Type says (curl -d sends a form type by default)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        start = time.perf_counter()
        status = {"code": 500}
        started = {"yes": False}
        metrics = self.metrics
        metrics.in_flight += 1

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        try:
            length = None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    length = v
                    break
            if length is not None:
                try:
                    too_big = int(length) > self.max_body
                except ValueError:
                    await self._reply(send_wrapper, 400, "invalid Content-Length header")
                    return
                if too_big:
                    await self._reply(send_wrapper, 413, f"request body exceeds the limit of "
                                                         f"{self.max_body:,} bytes")
                    return
            received = 0

            async def receive_wrapper():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BodyTooLarge as err:
                if not started["yes"]:
                    await self._reply(send_wrapper, 413, str(err.detail))
        finally:
            metrics.in_flight -= 1
            metrics.observe(scope.get("method", ""), scope.get("path", ""), status["code"],
                            time.perf_counter() - start)

    @staticmethod
    async def _reply(send, code: int, detail: str) -> None:
        resp = JSONResponse({"detail": detail, "errors": [{"row": None, "field": None, "message": detail}]},
                            status_code=code)
        await resp({"type": "http"}, None, send)


def _location(loc: tuple) -> tuple[int | None, str | None, str]:
    """A pydantic error location in the body -> (row, field, where-in-the-row text)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    row = fld = None
    rest = []
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


def validation_error(err: RequestValidationError) -> JSONResponse:
    items: list[ErrorItem] = []
    status = 422
    for e in err.errors()[:20]:
        if e.get("type") == "json_invalid":
            status = 400
            ctx = e.get("ctx") or {}
            items.append(ErrorItem(None, None, f"malformed JSON body: {ctx.get('error', e.get('msg'))} "
                                               f"(at character {e['loc'][-1] if len(e['loc']) > 1 else '?'})"))
            continue
        loc = tuple(e.get("loc", ()))
        if loc in (("body",), ()) and e.get("type") in ("model_attributes_type", "dict_type", "missing"):
            status = 400
            items.append(ErrorItem(None, None, 'the request body must be a JSON object {"rows": [...]} sent '
                                               "with Content-Type: application/json"))
            continue
        row, fld, rest = _location(loc)
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing" and fld is not None:
            msg = "is required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown key"
        if rest:
            msg = f"{rest}: {msg}"
        items.append(ErrorItem(row, fld, msg))
    if not items:
        items.append(ErrorItem(None, None, "invalid request body"))
    return JSONResponse(RequestError(status, items).to_json(), status_code=status)


def create_app(model_dir: str | Path, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state: dict[str, Any] = {"model": None, "path": Path(model_dir), "openapi": None}
    reload_lock = threading.Lock()

    def install(served: ServedModel, path: Path) -> None:
        state["model"], state["path"] = served, path  # one reference swap: requests keep the model they took
        metrics.model_version = served.version
        state["openapi"] = None  # the document lists the served model's fields: rebuilt on the next request

    install(ServedModel.load(model_dir, settings.device), Path(model_dir))

    def do_reload(path: Path) -> ServedModel:
        with reload_lock:  # one load at a time; requests go on meanwhile with the current model
            served = ServedModel.load(path, settings.device)
            install(served, path)
            return served

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            async def run() -> None:
                try:
                    served = await run_in_threadpool(do_reload, state["path"])
                    metrics.reloads["ok"] += 1
                    log.warning("SIGHUP: reloaded %s (version %s)", state["path"], served.version)
                except Exception as err:  # keep serving the current model
                    metrics.reloads["failed"] += 1
                    log.error("SIGHUP: reload of %s failed, still serving %s: %s", state["path"],
                              state["model"].version, err)
            loop.create_task(run())

        hup = False
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, on_hup)
                hup = True
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)

    app = FastAPI(title="deepfm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Click-through-rate predictions from a deepfm model directory. "
                              "See docs/serving.md.")

    def openapi() -> dict[str, Any]:
        """The OpenAPI document of the model being served: ``features`` lists exactly its columns, so
        schema-driven clients (and fuzzers) agree with the server about which names exist."""
        if state["openapi"] is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            served: ServedModel = state["model"]
            values = {name: codec.request_schema() for name, codec in served.fields.items()}
            doc["components"]["schemas"]["Row"]["properties"]["features"] = model_features_schema(values)
            doc["info"]["x-model-version"] = served.version
            state["openapi"] = doc
        return state["openapi"]

    app.openapi = openapi  # type: ignore[method-assign]
    add_docs(app)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.serving = state
    app.add_middleware(ServeMiddleware, metrics=metrics, max_body=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return validation_error(err)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return JSONResponse(err.to_json(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        detail = str(err.detail)
        return JSONResponse({"detail": detail, "errors": [{"row": None, "field": None, "message": detail}]},
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    errors = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors,
              summary="Probabilities for rows of raw feature values")
    async def predict(body: PredictRequest) -> JSONResponse:
        served: ServedModel = state["model"]  # this request's model, whatever a reload does meanwhile
        n = len(body.rows)
        if n > settings.max_rows:
            raise RequestError(413, f"{n:,} rows exceed the limit of {settings.max_rows:,} rows per request")
        rows = served.validate([r.features for r in body.rows])
        if n == 0:
            probs = np.zeros(0)
        elif n <= settings.fast_path_max_rows and served.fast.eligible(rows):
            probs = await run_in_threadpool(served.fast.probs, rows)  # the forward never blocks the loop
            metrics.predict_batches["fast"] += 1
        else:
            probs = await run_in_threadpool(frame_probs, served.predictor, rows)
            metrics.predict_batches["frame"] += 1
        finite = np.isfinite(probs)
        if not finite.all():
            bad = [ErrorItem(int(i), None, "the features give a non-finite score: a numeric value or weight "
                                           "is out of range") for i in np.nonzero(~finite)[0][:20]]
            raise RequestError(422, bad)
        metrics.rows += n
        return JSONResponse({"model_version": served.version,
                             "predictions": [{"id": r.id, "probability": p}
                                             for r, p in zip(body.rows, probs.tolist())]})

    @app.get("/v1/model", response_model=ModelInfo, summary="The model being served")
    async def model_info() -> JSONResponse:
        return JSONResponse(state["model"].info(settings))

    @app.post("/v1/reload", response_model=ModelInfo, responses=errors,
              summary="Load a model directory fully, then swap it in without dropping requests")
    async def reload(body: ReloadRequest | None = None) -> JSONResponse:
        if not settings.reload_endpoint:
            raise RequestError(403, "reload over HTTP is disabled on this server (send SIGHUP instead)")
        path = Path(body.model_dir) if body is not None and body.model_dir else state["path"]
        try:
            served = await run_in_threadpool(do_reload, path)
        except (DeepFMError, OSError, ValueError, KeyError, TypeError) as err:
            metrics.reloads["failed"] += 1
            raise RequestError(400, f"could not load model directory {str(path)!r}; still serving version "
                                    f"{state['model'].version}: {err}") from None
        metrics.reloads["ok"] += 1
        return JSONResponse(served.info(settings))

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "model_version": state["model"].version})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def swagger_assets() -> Path | None:
    """Swagger UI's files from the installed ``swagger-ui-bundle`` package (the ``serve`` extra), if present."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def add_docs(app: FastAPI) -> None:
    """``/docs`` with its assets served by this server (it works offline); without the package, the CDN's."""
    from fastapi.openapi.docs import get_swagger_ui_html

    assets = swagger_assets()
    urls: dict[str, str] = {}
    if assets is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
        urls = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    else:
        log.warning("swagger-ui-bundle is not installed: /docs loads its assets from a CDN "
                    "(pip install 'deepfm[serve]' to serve them locally)")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="deepfm API", **urls)


def app_from_env() -> FastAPI:
    """The app factory ``uvicorn --factory`` uses for ``--workers N`` (settings come from the environment)."""
    settings = Settings(max_rows=int(os.environ.get("DEEPFM_SERVE_MAX_ROWS", 10_000)),
                        max_body_bytes=int(os.environ.get("DEEPFM_SERVE_MAX_BODY", 16 * 1024 * 1024)),
                        fast_path_max_rows=int(os.environ.get("DEEPFM_SERVE_FAST_ROWS", 8)),
                        reload_endpoint=os.environ.get("DEEPFM_SERVE_RELOAD", "1") == "1")
    threads = os.environ.get("DEEPFM_SERVE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return create_app(os.environ["DEEPFM_SERVE_MODEL_DIR"], settings)
