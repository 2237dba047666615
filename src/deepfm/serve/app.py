"""The HTTP JSON API (FastAPI on uvicorn): ``create_app(model_dir, settings)``.

    POST /v1/predict   {"rows": [{"id": ..., "features": {column: value}}]} -> ids with probabilities, in order
    GET  /v1/model     fields, version, metrics of the model being served
    POST /v1/reload    {"model_dir": optional} load a model fully, then swap it in (SIGHUP: reload the current)
    GET  /healthz      liveness and the model version
    GET  /metrics      Prometheus text (every worker's counts)
    GET  /openapi.json the OpenAPI document of the served model (and /docs)

Every client mistake is a 4xx whose message names the row and the field; nothing a client sends yields a
5xx. The pieces: ``settings`` (every knob), ``state`` (the served model, swapped by a reload), ``routes``
(the endpoints), ``lane`` (the short way for well-formed predict requests), ``errors`` (the one error
shape), ``middleware`` (metrics, body limit), ``metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfm.serve.errors import RequestError, validation_error
from deepfm.serve.lane import PredictLane
from deepfm.serve.middleware import ServeMiddleware
from deepfm.serve.routes import router
from deepfm.serve.schemas import model_features_schema
from deepfm.serve.settings import ServeSettings
from deepfm.serve.state import ServedModel, ServingState

__all__ = ["create_app", "app_from_env", "ServeSettings", "Settings", "ServedModel", "ServingState"]
Settings = ServeSettings  # the name earlier releases exported
log = logging.getLogger("deepfm.serve")


def _sighup_reloads(state: ServingState):
    """The app's lifespan: SIGHUP reloads the current model directory (where a signal handler can be set:
    the main thread of a process with SIGHUP; a forked worker's parent reloads them all instead, through the
    link that runs here); a worker that stops leaves the shared metrics."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        async def reload_current() -> None:
            try:
                served = await run_in_threadpool(state.reload)
                log.warning("SIGHUP: reloaded %s (version %s)", state.path, served.version)
            except Exception as err:  # keep serving the current model
                log.error("SIGHUP: reload of %s failed, still serving %s: %s", state.path, state.model.version, err)

        hup = False
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_current()))
                hup = True
        if state.peers is not None:
            await state.peers.start(state)
        try:
            yield
        finally:
            if state.peers is not None:
                await state.peers.close()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await state.batcher.close()
            state.metrics.close()

    return lifespan


def _openapi(app: FastAPI, state: ServingState):
    def openapi() -> dict[str, Any]:
        """The OpenAPI document of the model being served: ``features`` lists exactly its columns, each with
        the JSON schema its codec takes (``Codec.request_schema``), so schema-driven clients (and fuzzers)
        agree with the server about which names and values exist."""
        if state.openapi_doc is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            served = state.model
            values = {name: codec.request_schema() for name, codec in served.fields.items()}
            doc["components"]["schemas"]["Row"]["properties"]["features"] = model_features_schema(values)
            doc["info"]["x-model-version"] = served.version
            state.openapi_doc = doc
        return state.openapi_doc

    return openapi


def _error_handlers(app: FastAPI) -> None:
    """Every error answer has the one shape of ``RequestError``."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        return validation_error(err).response()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return RequestError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)).response()


def create_app(model_dir: str | Path, settings: ServeSettings | None = None, peers=None) -> FastAPI:
    """The app serving ``model_dir``. ``peers``: in a worker forked by ``deepfm serve --workers N``, its link
    to the parent (``deepfm.serve.peers.ParentLink``), so that a reload reaches every worker."""
    settings = settings or ServeSettings()
    state = ServingState(settings, model_dir, peers=peers)
    app = FastAPI(title="deepfm", version="1", lifespan=_sighup_reloads(state), docs_url=None, redoc_url=None,
                  description="Click-through-rate predictions from a deepfm model directory. See docs/serving.md.")
    app.state.serving = state
    app.state.settings = settings
    app.state.metrics = state.metrics
    app.openapi = _openapi(app, state)  # type: ignore[method-assign]
    app.include_router(router)
    add_docs(app)
    app.add_middleware(PredictLane, state=state)  # inside ServeMiddleware: counted and size-limited as any request
    app.add_middleware(ServeMiddleware, metrics=state.metrics, max_body=settings.max_body_bytes,
                       body_timeout=settings.body_timeout_s)
    _error_handlers(app)
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
    """The app factory ``uvicorn --factory`` calls in each of ``--workers N`` processes: the settings come
    from the ``DEEPFM_SERVE_*`` variables ``deepfm serve`` set (``ServeSettings.environ``). A worker is a process
    of the ``deepfm`` command that did not start through ``deepfm.cli.main``: it applies the command's process
    tuning itself (``deepfm.process``; the OpenMP part already came with the environment). Such workers have
    no parent link (``deepfm.serve.peers``): a reload changes only the worker that answers it, which is why
    ``deepfm serve --workers N`` forks its own."""
    from deepfm.process import tune_process

    tune_process()
    settings = ServeSettings()
    if settings.model_dir is None:
        from deepfm.errors import DeepFMError

        raise DeepFMError("DEEPFM_SERVE_MODEL_DIR is not set: start workers with `deepfm serve MODEL_DIR`")
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return create_app(settings.model_dir, settings)
