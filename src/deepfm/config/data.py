"""The ``data`` section: where the raw files are, how to read them, how rows are split and sampled."""

from __future__ import annotations

import codecs
import math
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from deepfm.data import sources
from deepfm.config.base import Frozen


CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
PRESETS = {"criteo": CRITEO_COLUMNS}


class SplitConfig(Frozen):
    """A seeded random split of one file into train / valid / test (fractions of rows)."""

    valid: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 2017

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid + self.test >= 1.0:
            raise ValueError("split.valid + split.test must leave rows for training (< 1.0)")
        return self


class TimeSplitConfig(Frozen):
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


class DeriveConfig(Frozen):
    """A column computed from another one before encoding, as BARS's Avazu preprocessing: from a YYMMDDHH
    timestamp (Avazu's ``hour``), ``hour_of_day`` (0-23), ``weekday`` (0 = Sunday .. 6, as ``%w``) or
    ``weekend`` (1 on Saturday and Sunday, else 0). The result is text, for a categorical field of that name;
    ``name`` may equal ``source`` (the derived value then replaces the raw one)."""

    name: str
    source: str
    fn: Literal["hour_of_day", "weekday", "weekend"]


class DataConfig(Frozen):
    format: Literal["tsv", "csv", "parquet", "libffm", "libsvm"] = "csv"
    # a path, glob, directory, URL (s3://, gs://, hdfs://, file://) or a list of these: deepfm.data.sources
    train: str | list[str]
    valid: str | list[str] | None = None
    test: str | list[str] | None = None
    # the endpoint of an S3-compatible store (else AWS_ENDPOINT_URL); credentials never go in the config
    s3_endpoint_url: str | None = None
    # under torchrun: rank 0 prepares one cache every rank maps (a shared filesystem), or every rank prepares a
    # share of the files and keeps its rows (deepfm.data.ranked); one process prepares alone either way
    prepare_on: Literal["rank0", "every_rank"] = "rank0"
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
