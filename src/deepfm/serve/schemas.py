"""The JSON API's request and response bodies (they are also the OpenAPI document's schemas).

Feature values are typed per field by ``deepfm.serve.encode.validate_rows`` (the kind of a field is only
known from the loaded model), so the body model accepts any JSON value there and the OpenAPI document
describes what each kind takes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

FEATURE_VALUE_SCHEMA = {
    "description": (
        "A raw value, as in the training files. Categorical field: a string (or an integer / number, "
        "written as its integer text when integral). Numeric field: a number or a numeric string. "
        "Multi-valued field: a list of tags, a list of [tag, weight] pairs, or the text form of the "
        "training files ('a:1.0^b^c:0.5'). null (or leaving the field out) means missing, like an empty "
        "cell in training."),
    "anyOf": [
        {"type": "string"}, {"type": "number"}, {"type": "null"},
        {"type": "array", "items": {"anyOf": [
            {"type": "string"}, {"type": "integer"},
            {"type": "array", "prefixItems": [{"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                              {"type": "number"}], "minItems": 2, "maxItems": 2}]}},
    ],
}

Features = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "additionalProperties": FEATURE_VALUE_SCHEMA,
    "description": "column name (as in training) -> raw value; unknown names are rejected",
    "example": {"I1": 3, "C1": "68fd1e64"}})]


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Any = Field(None, description="any JSON value, returned unchanged next to the probability")
    features: Features


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "example": {"rows": [{"id": "r1", "features": {"I1": 3, "C1": "68fd1e64"}}]}})

    rows: list[Row] = Field(description="rows to score, at most the server's max rows per request")


class Prediction(BaseModel):
    id: Any = None
    probability: float


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="model directory to load (default: reload the current one)")


class ErrorItem(BaseModel):
    row: int | None = None
    field: str | None = None
    message: str


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
