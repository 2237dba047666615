"""Typed, frozen configuration read from YAML.

Every section is a pydantic model that rejects unknown keys and wrong types, so a typo in a config is an
error with the key's path, never a silently ignored setting. Each component receives only its own section.

    data:    where the raw files are and how to read them
    fields:  one entry per input field (kind, vocabulary, combiner, numeric handling)
    model:   DeepFM shape
    train:   optimiser, schedule, early stopping, precision
"""

from __future__ import annotations

import codecs
import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from deepfm.data import sources
from deepfm.errors import ConfigError

CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
PRESETS = {"criteo": CRITEO_COLUMNS}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Frozen):
    """A seeded random split of one file into train / valid / test (fractions of rows)."""

    valid: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 2017

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid + self.test >= 1.0:
            raise ValueError("split.valid + split.test must leave rows for training (< 1.0)")
        return self


class TimeSplitConfig(_Frozen):
    """A split of one file by the value of a column, as production follows time: rows with ``by`` <
    ``valid_from`` train, [``valid_from``, ``test_from``) validate, >= ``test_from`` test.

    The thresholds decide how values compare: numbers (YAML numbers, or text that parses as one) compare the
    column's values as numbers (Avazu's YYMMDDHH ``hour``, a Unix time), any other text compares them as text,
    code point by code point (ISO dates such as ``2024-05-01T00``). A value that is missing, or not a number
    when the thresholds are numbers, is a bad row."""

    by: str
    valid_from: int | float | str
    test_from: int | float | str

    @property
    def numeric(self) -> bool:
        return _as_number(self.valid_from) is not None

    @model_validator(mode="after")
    def _ordered(self) -> TimeSplitConfig:
        lo, hi = _as_number(self.valid_from), _as_number(self.test_from)
        if (lo is None) != (hi is None):
            raise ValueError("split.valid_from and split.test_from must both be numbers or both be text "
                             f"(got {self.valid_from!r} and {self.test_from!r})")
        later = lo > hi if lo is not None and hi is not None else str(self.valid_from) > str(self.test_from)
        if later:
            raise ValueError(f"split.valid_from ({self.valid_from!r}) must not come after split.test_from "
                             f"({self.test_from!r})")
        return self


def _as_number(value: float | str) -> float | None:
    """``value`` as a float if it is a number or text that parses as one (not NaN), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


_TIME_KEYS = {"by", "valid_from", "test_from"}
_RANDOM_KEYS = {"valid", "test", "seed"}


def _split_kind(obj: Any) -> str:
    if isinstance(obj, dict):
        return "time" if _TIME_KEYS & set(obj) else "random"
    return "time" if isinstance(obj, TimeSplitConfig) else "random"


# ``data.split``: a random split (valid / test fractions + seed) or a time split (by / valid_from / test_from)
Split = Annotated[
    Annotated[SplitConfig, Tag("random")] | Annotated[TimeSplitConfig, Tag("time")],
    Discriminator(_split_kind),
]


class DeriveConfig(_Frozen):
    """A column computed from another one before encoding, as BARS's Avazu preprocessing: from a YYMMDDHH
    timestamp (Avazu's ``hour``), ``hour_of_day`` (0-23), ``weekday`` (0 = Sunday .. 6, as ``%w``) or
    ``weekend`` (1 on Saturday and Sunday, else 0). The result is text, for a categorical field of that name;
    ``name`` may equal ``source`` (the derived value then replaces the raw one)."""

    name: str
    source: str
    fn: Literal["hour_of_day", "weekday", "weekend"]


class DataConfig(_Frozen):
    format: Literal["tsv", "csv", "parquet", "libffm", "libsvm"] = "csv"
    # a path, glob, directory, URL (s3://, gs://, hdfs://, file://) or a list of these: deepfm.data.sources
    train: str | list[str]
    valid: str | list[str] | None = None
    test: str | list[str] | None = None
    # the endpoint of an S3-compatible store (else AWS_ENDPOINT_URL); credentials never go in the config
    s3_endpoint_url: str | None = None
    split: Split | None = None
    header: bool = True
    columns: list[str] | None = None
    preset: Literal["criteo"] | None = None
    label: str = "label"
    id_columns: list[str] = []
    group_column: str | None = None
    multi_value_separator: str = "^"
    weight_separator: str = ":"
    cache_dir: str = ".cache/deepfm"
    # the text encoding of CSV/TSV/libffm/libsvm files (any Python codec name, e.g. latin-1); cells are UTF-8 inside
    encoding: str = "utf-8"
    skip_bad_rows: bool = False
    chunk_rows: int = Field(262_144, gt=0)
    derive: list[DeriveConfig] = []
    # keep each negative training row with this probability (1 = keep all); probabilities leaving the model
    # are calibrated back (see ``logit_shift``)
    negative_sampling_rate: float = Field(1.0, gt=0.0, le=1.0)
    sampling_seed: int = 2017
    # a column of per-row sample weights (finite numbers >= 0) for training loss and evaluation metrics, e.g.
    # 1/w on the negatives a user kept with probability w; read only when preparing data (predict and serve
    # ignore it). With negative_sampling_rate the two multiply: the weights apply to the rows the sampling
    # keeps, and logit_shift corrects the sampling alone.
    weight_column: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_split_kind(cls, raw: Any) -> Any:
        split = raw.get("split") if isinstance(raw, dict) else None
        if isinstance(split, dict) and _TIME_KEYS & set(split) and _RANDOM_KEYS & set(split):
            raise ValueError("data.split is either a time split (by, valid_from, test_from) or a random one "
                             f"(valid, test, seed), not both: got {sorted(split)}")
        return raw

    @property
    def logit_shift(self) -> float:
        """What scoring adds to the logit of a model trained on negatives kept with probability w: log(w).

        The model learns p_s = p / (p + (1 - p) w) on the sample; adding log(w) to its logit gives back
        p = p_s / (p_s + (1 - p_s) / w). 0 without downsampling."""
        return math.log(self.negative_sampling_rate)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.preset and self.columns:
            raise ValueError("give either data.preset or data.columns, not both")
        if self.format in ("tsv", "csv") and not self.header and not (self.columns or self.preset):
            raise ValueError("a file without header needs data.columns (or data.preset: criteo)")
        if self.split is not None and (self.valid or self.test):
            raise ValueError("data.split splits data.train; do not also give data.valid / data.test")
        if len(self.multi_value_separator) != 1 or len(self.weight_separator) != 1:
            raise ValueError("separators must be single characters")
        if self.weight_column is not None:
            if self.format in ("libffm", "libsvm"):
                raise ValueError(f"data.weight_column needs named columns (csv, tsv or parquet), not {self.format}")
            if self.weight_column == self.label:
                raise ValueError(f"data.weight_column '{self.weight_column}' is the label column")
            if self.weight_column in self.id_columns:
                raise ValueError(f"data.weight_column '{self.weight_column}' is also in data.id_columns")
            if self.weight_column in [d.name for d in self.derive]:
                raise ValueError(f"data.derive computes the weight column '{self.weight_column}'")
        sources.check_no_credentials(self.train, self.valid, self.test, self.s3_endpoint_url)
        names = [d.name for d in self.derive]
        if len(set(names)) != len(names):
            raise ValueError(f"data.derive names a column twice: {names}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"data.encoding '{self.encoding}' is not a known text encoding "
                             "(e.g. utf-8, latin-1, cp1252)") from None
        return self

    @property
    def column_names(self) -> list[str] | None:
        return list(PRESETS[self.preset]) if self.preset else self.columns


class _FieldBase(_Frozen):
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


class _VocabMixin(_Frozen):
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
_FIELD_KINDS = ("categorical", "numeric", "multi")


def parse_field(obj: dict[str, Any] | Any) -> Any:
    """One ``fields`` entry (a mapping) -> its typed config (before ``names`` expansion)."""
    return _FIELD_ADAPTER.validate_python(obj)


class ModelConfig(_Frozen):
    embed_dim: int = Field(16, gt=0)
    hidden_units: list[Annotated[int, Field(gt=0)]] = [400, 400, 400]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    use_linear: bool = True
    use_fm: bool = True
    use_deep: bool = True
    # "sum": the paper, y = bias + sum(linear) + sum(bi-interaction) + dnn.
    # "project": the seed note, linear and FM vectors each go through a dense layer to one logit.
    head: Literal["sum", "project"] = "sum"
    init_std: float = Field(1e-4, gt=0.0)
    # DNN weights: "xavier_uniform" (default), "xavier_normal" as FuxiCTR/BARS, or "normal" N(0, dnn_init_std)
    # as DeepCTR (the DNN starts near 0: better on validation for ~8k-row sets, worse at 2M rows and in one
    # epoch; bench/quality/SWEEP.md)
    dnn_init: Literal["normal", "xavier_normal", "xavier_uniform"] = "xavier_uniform"
    dnn_init_std: float = Field(1e-4, gt=0.0)

    @model_validator(mode="after")
    def _some_part(self) -> ModelConfig:
        if not (self.use_linear or self.use_fm or self.use_deep):
            raise ValueError("at least one of use_linear, use_fm, use_deep must be true")
        return self


def auto_batch_size(train_rows: int) -> int:
    """``batch_size: auto``: 4096 from 409,600 training rows up; smaller data gets ~100+ steps per epoch (the
    largest power of two <= rows / 100, at least 256). bench/quality/SWEEP.md: on 7-8k-row sets batch 4096
    lost 0.06 validation AUC against 256."""
    return min(4096, max(256, 1 << max(0, (train_rows // 100).bit_length() - 1)))


class TrainConfig(_Frozen):
    # rows per step (the global batch under torchrun); "auto": see auto_batch_size
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    eval_batch_size: int = Field(16384, gt=0)
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optimizer: Literal["adam", "adagrad", "proximal_adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    # sparse embedding gradients: only the rows a batch touches are updated (SparseAdam / sparse Adagrad)
    sparse: bool = True
    embedding_l2: float = Field(0.0, ge=0.0)
    # "batch": embedding_l2 * sum of the squared rows a batch looked up / batch size (cheap with sparse
    # updates; a row is pulled towards 0 as often as it is seen). "table": embedding_l2 / 2 * ||W||^2 over the
    # whole table every step, as FuxiCTR/BARS (needs sparse: false; applied as Adam/Adagrad weight decay).
    embedding_l2_scope: Literal["batch", "table"] = "batch"
    weight_decay: float = Field(0.0, ge=0.0)
    # clip the global gradient norm (all parameters, the embedding table included) to this value, as
    # FuxiCTR's max_gradient_norm (BARS: 10); None = no clipping
    grad_clip_norm: float | None = Field(None, gt=0.0)
    # what early stopping, best-epoch selection and learning-rate reduction watch on the validation split:
    # "auc", or "auc-logloss" (AUC minus log loss, FuxiCTR's monitor {AUC: 1, logloss: -1})
    monitor: Literal["auc", "auc-logloss"] = "auc"
    l1: float = Field(0.0, ge=0.0)
    l2: float = Field(0.0, ge=0.0)
    patience: int = Field(2, ge=0)
    # an epoch counts as a gain only when the monitored validation score beats the best by more than this
    # (Keras / PyTorch Lightning's min_delta); 0 = any gain
    min_delta: float = Field(0.0, ge=0.0)
    lr_plateau_factor: float = Field(0.1, gt=0.0, le=1.0)
    lr_plateau_patience: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0.0)
    seed: int = 2017
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    num_threads: int | None = Field(None, gt=0)
    # CPU + glibc: keep freed memory in the process for reuse (mallopt) instead of returning each ~10 MB
    # step buffer to the OS and page-faulting it back in; ~20% faster steps, resident memory stays at its peak
    reuse_freed_memory: bool = True
    shuffle: bool = True
    shuffle_block_rows: int = Field(32, gt=0)
    checkpoint_every_steps: int = Field(1000, gt=0)
    prefetch_batches: int = Field(4, ge=1)
    progress: bool = True
    # write the optimisers' state into the model directory, so that `train --init-from` continues it
    save_optimizer_state: bool = True
    # under torchrun: a rank that waits longer than this for the others fails instead of hanging
    dist_timeout_s: float = Field(1800.0, gt=0)
    # under torchrun: "replicated" (every rank holds the whole embedding table and its optimiser state) or
    # "row" (each rank holds a contiguous 1/N of the rows and their state; rows travel by all-to-all)
    embedding_sharding: Literal["replicated", "row"] = "replicated"

    @model_validator(mode="after")
    def _opt(self) -> TrainConfig:
        if (self.l1 or self.l2) and self.optimizer != "proximal_adagrad":
            raise ValueError("train.l1 / train.l2 are the proximal_adagrad optimiser's; "
                             "use embedding_l2 or weight_decay with adam/adagrad")
        if self.embedding_l2_scope == "table" and (self.sparse or self.optimizer == "proximal_adagrad"):
            raise ValueError("embedding_l2_scope: table penalises every row at every step, which needs dense "
                             "updates: set train.sparse: false (optimizer adam or adagrad), or use scope batch")
        if self.embedding_sharding == "row" and not self.sparse:
            raise ValueError("embedding_sharding: row updates only the rows each owner receives, which needs "
                             "sparse updates: set train.sparse: true")
        return self


class Config(_Frozen):
    data: DataConfig
    fields: list[FieldConfig]
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    output: str | None = None

    @field_validator("fields")
    @classmethod
    def _expand(cls, fields: list[FieldConfig]) -> list[FieldConfig]:
        out = [f for spec in fields for f in spec.expand()]
        if not out:
            raise ValueError("fields must name at least one field")
        seen: set[str] = set()
        for f in out:
            if f.name in seen:
                raise ValueError(f"field '{f.name}' is declared twice")
            seen.add(str(f.name))
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        by_vocab: dict[str, Any] = {}
        for f in self.fields:
            if f.name == self.data.label:
                raise ValueError(f"field '{f.name}' is the label column")
            if f.name == self.data.weight_column:
                raise ValueError(f"field '{f.name}' is the weight column (data.weight_column)")
            if not f.uses_vocab:
                continue
            first = by_vocab.setdefault(f.vocab_name, f)
            if (first.min_count, first.hash_buckets, first.max_size) != (f.min_count, f.hash_buckets, f.max_size):
                raise ValueError(f"fields '{first.name}' and '{f.name}' share vocab '{f.vocab_name}' "
                                 "but differ in min_count / hash_buckets / max_size")
        cols = self.data.column_names
        if cols is not None:
            split_by = [self.data.split.by] if isinstance(self.data.split, TimeSplitConfig) else []
            weight = [self.data.weight_column] if self.data.weight_column is not None else []
            specs = (self.data.train, self.data.valid, self.data.test)
            missing = [n for n in [self.data.label, *(f.name for f in self.fields), *split_by, *weight]
                       if n not in cols and not sources.names_partition(n, *specs)]
            if missing:
                raise ValueError(f"data.columns lacks {missing}")
        return self


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``section.key=value`` strings -> (key, YAML-parsed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got '{item}'")
        key, value = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(value) if value else ""))
    return out


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        parts = list(e["loc"])
        if len(parts) >= 3 and parts[0] == "fields" and parts[2] in _FIELD_KINDS:
            del parts[2]  # the union's tag: the entry's own kind, not a key the user wrote
        if parts[:2] == ["data", "split"] and len(parts) >= 3 and parts[2] in ("random", "time"):
            del parts[2]
        loc = ".".join(str(p) for p in parts)
        msg = "unknown key (check the spelling; see the config reference in README.md)" \
            if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>",
                     overrides: list[str] | None = None) -> Config:
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def read_yaml_mapping(path: Path, what: str, expect: str) -> dict[str, Any]:
    """A YAML file that must hold a non-empty mapping; ``ConfigError`` naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: {expect}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config. Relative data paths are resolved against the config file's folder."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config", "the config must be a mapping with data / fields / model / train")
    data = raw.get("data")
    if isinstance(data, dict):
        base = path.resolve().parent
        data.setdefault("cache_dir", DataConfig.model_fields["cache_dir"].default)  # read from here too
        for key in ("train", "valid", "test", "cache_dir"):
            if key in data:
                data[key] = sources.relative_to(data[key], base)
    return config_from_dict(raw, str(path), overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"fields": {"__all__": {"names"}}})
