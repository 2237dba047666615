"""The endpoints. Each takes the app's ``ServingState`` (``state``) and, for predict, the model it holds at
the start of the request; client mistakes are ``RequestError`` (see ``deepfm.serve.errors``)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from deepfm.errors import DeepFMError
from deepfm.serve.admin import require_admin, under_root
from deepfm.serve.encode import frame_attributions
from deepfm.serve.errors import Problems, RequestError
from deepfm.serve.limits import LimitedRoute
from deepfm.serve.schemas import ErrorResponse, Health, ModelInfo, PredictRequest, PredictResponse, ReloadRequest
from deepfm.serve.state import ServingState


def serving(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(serving)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "malformed JSON, a body that is not a JSON object, or JSON nested too deep"),
        (408, "the body did not arrive in time"), (413, "too many rows or too large a body"),
        (422, "a value that is wrong for its field (the message names the row and the field)"))}
router = APIRouter(route_class=LimitedRoute)


def check_finite(probs: np.ndarray) -> None:
    finite = np.isfinite(probs)
    if not finite.all():
        problems = Problems(422)
        for i in np.nonzero(~finite)[0]:
            problems.add(int(i), None, "the features give a non-finite score: a numeric value or weight is out "
                                       "of range")
        problems.raise_any()


@router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS,
             summary="Probabilities for rows of raw feature values")
async def predict(body: PredictRequest, state: State) -> JSONResponse:
    # a plain well-formed body never gets here: deepfm.serve.lane answers it through answer_predict too
    return await answer_predict(state, [r.id for r in body.rows], [r.features for r in body.rows], body.explain)


async def answer_predict(state: ServingState, ids: list[Any], features: list[dict[str, Any]],
                         explain: bool) -> JSONResponse:
    """The answer to a predict request whose body has the route's shape: the limits, each value's checks, the
    (batched) scoring and the response."""
    served = state.model  # this request's model, whatever a reload does meanwhile
    n = len(ids)
    if n > state.settings.max_rows:
        raise RequestError(413, f"{n:,} rows exceed the limit of {state.settings.max_rows:,} rows per request")
    if explain and n > state.settings.max_explain_rows:
        raise RequestError(413, f"{n:,} rows exceed the limit of {state.settings.max_explain_rows:,} rows per "
                                "request with \"explain\": true")
    if explain and served.quantize:
        raise RequestError(422, "\"explain\": true needs the float32 table; this server scores an int8 one "
                                "(--quantize int8)")
    rows = served.validate(features)
    probs = await state.batcher.score(served, rows)
    check_finite(probs)
    predictions = [{"id": i, "probability": p} for i, p in zip(ids, probs.tolist())]
    if explain and n:
        columns = await run_in_threadpool(frame_attributions, served.predictor, rows)
        for i, pred in enumerate(predictions):
            pred["attributions"] = {name: values[i] for name, values in columns.items()}
    answer = {"model_version": served.version, "predictions": predictions}
    return JSONResponse(answer) if explain else FastJSONResponse(answer)


class FastJSONResponse(JSONResponse):
    """A JSON response written by orjson (20x faster than ``json.dumps`` on 1,000 predictions), for content
    whose numbers are all finite (orjson would write NaN as null where ``JSONResponse`` refuses it): the same
    values, numbers in their shortest round-trip form; what orjson cannot write (an integer beyond 64 bits)
    is written by ``JSONResponse``."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # orjson.JSONEncodeError included
            return super().render(content)


@router.get("/v1/model", response_model=ModelInfo, summary="The model being served")
async def model_info(state: State) -> JSONResponse:
    return JSONResponse(state.info())


@router.post("/v1/reload", response_model=ModelInfo, dependencies=[Depends(require_admin)],
             responses={**ERRORS, **{code: {"model": ErrorResponse, "description": text} for code, text in (
                 (401, "no admin token"), (403, "a wrong token, the endpoint off, or a path outside the root"),
                 (404, "no such directory under the root"), (409, "the directory holds no model this server "
                                                                  "can load (in some worker), or another reload "
                                                                  "is in progress; the current one keeps serving"))}},
             summary="Load a model directory (under the allowed root) fully in every worker, then swap it in "
                     "without dropping requests (every worker or none); needs the admin token")
async def reload(state: State, body: ReloadRequest | None = None) -> JSONResponse:
    path = under_root(body.model_dir, state.root) if body is not None and body.model_dir else None
    try:
        served = await state.reload_everywhere(path)  # with --workers N: every worker, or none
    except (DeepFMError, OSError, ValueError, KeyError, TypeError) as err:
        # the caller holds the admin token and the path is under the root: the reason is theirs to read
        status = 409 if (path or state.path).is_dir() else 404
        raise RequestError(status, f"could not load the model directory; still serving version "
                                   f"{state.model.version}: {err}") from None
    return JSONResponse(served.info(state.settings.max_rows))


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz(state: State) -> JSONResponse:
    return JSONResponse({"status": "ok", "model_version": state.model.version})


@router.get("/metrics", summary="Prometheus metrics (the whole server: every worker)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus(state: State) -> Response:
    return Response(state.metrics.render_bytes(), media_type=state.metrics.content_type)
