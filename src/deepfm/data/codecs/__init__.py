"""Codecs: one per field kind, the only code that knows what a kind of field means.

A codec owns, for its kind: which raw values are valid (and the message when one is not), the rule that turns a
value into a vocabulary token or a number, the state fitted on the training split and its JSON form, and how
the field is described (``inspect``, ``/v1/model``, export). The engines drive the codecs and never ask a
field's kind:

- the columnar engine (``deepfm.data.encoder.Encoder``: train, evaluate, predict, and the fast CSV/TSV
  preparation in ``deepfm.data.fastpath``) asks each codec for polars expressions over a chunk's columns;
- the per-record engine (``deepfm.data.records.RecordEncoder``: the server at small batches) asks each codec
  for the same rule applied to one plain Python value.

Where the two engines must agree, both executions of a rule sit next to each other in the codec (e.g.
``LogBucketCodec.token_expr`` and ``LogBucketCodec.record_token``); the tests hold them equal on random values.

A codec feeds one *slot* of the model input: ``id`` (one vocabulary id per row: categorical fields and
log-bucketed numbers), ``value`` (one float per row, scaling the field's embedding: numeric ``scale``,
``standardize``, ``minmax``) or ``bag`` (weighted tags: multi-valued fields). The slot, not the kind, decides
where the engines put a codec's output.
"""

from __future__ import annotations

from deepfm.config import CategoricalField, FieldConfig, MultiField, NumericField
from deepfm.data.codecs.base import Check, Codec, IdCodec, ValueCodec
from deepfm.data.codecs.categorical import CategoricalCodec
from deepfm.data.codecs.multi import Multi, MultiCodec
from deepfm.data.codecs.numeric import LogBucketCodec, MinMaxCodec, ScaleCodec, StandardizeCodec
from deepfm.data.codecs.values import (BAD_WEIGHT, FLOAT32_MAX, MISSING, NUMBER_SCHEMA, NUMERIC_TEXT, bad_label_expr,
                                       bad_weight_expr, float_token, label_expr, number_problem, weight_expr)

__all__ = ["BAD_WEIGHT", "FLOAT32_MAX", "MISSING", "NUMBER_SCHEMA", "NUMERIC_TEXT", "NUMERIC_CODECS", "CategoricalCodec",
           "Check", "Codec", "IdCodec", "LogBucketCodec", "MinMaxCodec", "Multi", "MultiCodec", "ScaleCodec",
           "StandardizeCodec", "ValueCodec", "bad_label_expr", "bad_weight_expr", "codec_for", "float_token",
           "label_expr", "number_problem", "weight_expr"]

NUMERIC_CODECS: dict[str, type[Codec]] = {
    "log_bucket": LogBucketCodec, "scale": ScaleCodec, "standardize": StandardizeCodec, "minmax": MinMaxCodec}


def codec_for(spec: FieldConfig) -> Codec:
    """The codec of one (expanded) field config."""
    if isinstance(spec, NumericField):
        return NUMERIC_CODECS[spec.numeric](spec)
    if isinstance(spec, MultiField):
        return MultiCodec(spec)
    assert isinstance(spec, CategoricalField), spec
    return CategoricalCodec(spec)
