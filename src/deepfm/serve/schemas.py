"""The JSON API's request and response bodies (they are also the OpenAPI document's schemas).

Feature values are typed per field by ``deepfm.serve.encode.validate_rows`` (the kind of a field is only
known from the loaded model), so the body model accepts any JSON value there; the OpenAPI document of the
served model lists its columns with the schema each codec gives (``Codec.request_schema``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from deepfm.serve.errors import ErrorItem


def model_features_schema(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``features`` object of one loaded model: its request columns (name -> the JSON schema of the values
    its codec takes, ``Codec.request_schema``), nothing else."""
    return {"type": "object", "additionalProperties": False, "properties": dict(fields),
            "description": "column name (as in training) -> raw value; a left-out column is missing. "
                           "Columns of the model being served: " + ", ".join(fields)}


# the served model's own ``features`` schema replaces this one in its OpenAPI document (``create_app``)
Features = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "description": "column name (as in training) -> raw value; unknown names are rejected",
    "example": {"I1": 3, "C1": "68fd1e64"}})]


def has_non_finite(value: Any) -> bool:
    """Whether a parsed JSON value holds NaN or an infinity anywhere (Python's JSON parser reads ``NaN``,
    ``Infinity`` and overflowing numbers like ``1e400``, which strict JSON cannot write back)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Any = Field(None, description="any JSON value, returned unchanged next to the probability; numbers "
                                      "must be finite")
    features: Features

    @field_validator("id")
    @classmethod
    def _finite_id(cls, value: Any) -> Any:
        # the id is echoed in the response: a non-finite number there could not be written as JSON
        if has_non_finite(value):
            raise ValueError("holds a non-finite number (NaN, Infinity or out of range); an id is echoed in the "
                             "response, which must be valid JSON")
        return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"rows": [{"id": "r1", "features": {"I1": 3, "C1": "68fd1e64"}}]}})

    rows: list[Row] = Field(description="rows to score, at most the server's max rows per request")
    explain: bool = Field(False, description="also return each row's attributions: attr_bias and attr_<field> per "
                                             "field, summing to the row's logit (as deepfm predict --explain); at "
                                             "most the server's max explain rows per request")


class Prediction(BaseModel):
    id: Any = None
    probability: float
    attributions: dict[str, float] | None = Field(None, description="with \"explain\": true only")


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="model directory to load (default: reload the current one)")


class ErrorResponse(BaseModel):
    detail: str
    errors: list[ErrorItem] = []


class Health(BaseModel):
    status: str
    model_version: str


class ModelField(BaseModel):
    name: str
    kind: str
    numeric: str | None = None
    log1p: bool | None = None
    combiner: str | None = None
    max_len: int | None = None
    vocab: str | None = None
    vocab_size: int | None = None


class ModelInfo(BaseModel):
    version: str
    path: str
    created: str | None = None
    format_version: int | None = None
    versions: dict[str, str] | None = None
    label: str
    fields: list[ModelField]
    metrics: dict[str, Any]
    loaded_at: float
    max_rows: int
    quantize: str | None = None
    precision: str = "fp32"
