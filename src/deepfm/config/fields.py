"""The ``fields`` section: one entry per input field, a union discriminated by ``kind``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from deepfm.config.base import Frozen


class _FieldBase(Frozen):
    """What every field has: a column name (``names`` expands into one field per name, same settings)."""

    name: str | None = None
    names: list[str] | None = None

    @model_validator(mode="after")
    def _one_name(self) -> _FieldBase:
        if (self.name is None) == (self.names is None):
            raise ValueError("each field needs exactly one of 'name' or 'names'")
        return self

    def expand(self) -> list[FieldConfig]:
        names = [self.name] if self.name is not None else list(self.names or [])
        return [self.model_copy(update={"name": n, "names": None}) for n in names]  # type: ignore[misc]


class _VocabMixin(Frozen):
    # fields naming the same vocab share one vocabulary and one block of embedding rows
    vocab: str | None = None
    min_count: int = Field(1, ge=1)
    hash_buckets: int | None = Field(None, gt=0)
    # at most this many tokens (ids 1..max_size); when a model is trained further on new data
    # (--init-from), the least recently seen tokens are evicted (they map to the OOV id)
    max_size: int | None = Field(None, gt=0)

    @property
    def vocab_name(self) -> str:
        return self.vocab or str(getattr(self, "name", ""))

    @property
    def uses_vocab(self) -> bool:
        """Whether the field's values become ids through a vocabulary (a block of embedding rows)."""
        return True


class CategoricalField(_FieldBase, _VocabMixin):
    """One value per row, mapped to an id by a vocabulary."""

    kind: Literal["categorical"] = "categorical"


class NumericField(_FieldBase, _VocabMixin):
    """One number per row. ``numeric`` picks the transform (deepfm.data.codecs has one codec each):
    ``log_bucket`` (floor(ln(x)^2) for x > 2, else int(x): a categorical token with a vocabulary),
    ``scale`` (the paper: embedding times value), ``standardize`` ((x-mean)/std fitted on train, then scaled),
    ``minmax`` ((x-min)/(max-min) fitted on train, clipped to [0, 1], then scaled). ``log1p`` applies
    ln(1 + max(x, 0)) first. ``vocab`` / ``min_count`` / ``hash_buckets`` apply to ``log_bucket`` only."""

    kind: Literal["numeric"]
    numeric: Literal["log_bucket", "scale", "standardize", "minmax"] = "log_bucket"
    log1p: bool = False

    @property
    def uses_vocab(self) -> bool:
        return self.numeric == "log_bucket"

    @model_validator(mode="after")
    def _vocab_only_for_buckets(self) -> NumericField:
        if not self.uses_vocab and self.vocab is not None:
            raise ValueError(f"field '{self.name}': a '{self.numeric}' numeric field has no vocabulary to share")
        return self


class MultiField(_FieldBase, _VocabMixin):
    """Several tags per cell (``a:1.0^b:0.5``, or a Parquet list column), pooled by ``combiner``."""

    kind: Literal["multi"]
    combiner: Literal["sum", "mean", "sqrtn"] = "mean"
    max_len: int | None = Field(None, gt=0)


def _field_kind(obj: Any) -> str:
    return obj.get("kind", "categorical") if isinstance(obj, dict) else getattr(obj, "kind", "categorical")


# one entry of ``fields``: a union discriminated by ``kind`` (default categorical), so each kind accepts its
# own keys only (``combiner`` on a categorical field is an unknown key)
FieldConfig = Annotated[
    Annotated[CategoricalField, Tag("categorical")] | Annotated[NumericField, Tag("numeric")]
    | Annotated[MultiField, Tag("multi")],
    Discriminator(_field_kind, custom_error_type="field_kind",
                  custom_error_message="kind must be one of categorical, numeric, multi"),
]
_FIELD_ADAPTER: TypeAdapter[Any] = TypeAdapter(FieldConfig)
FIELD_KINDS = ("categorical", "numeric", "multi")


def parse_field(obj: dict[str, Any] | Any) -> Any:
    """One ``fields`` entry (a mapping) -> its typed config (before ``names`` expansion)."""
    return _FIELD_ADAPTER.validate_python(obj)
