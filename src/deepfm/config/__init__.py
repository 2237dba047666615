"""Typed, frozen configuration read from YAML.

Every section is a pydantic model that rejects unknown keys and wrong types, so a typo in a config is an
error with the key's path, never a silently ignored setting. Each component receives only its own section.

    data:    where the raw files are and how to read them
    fields:  one entry per input field (kind, vocabulary, combiner, numeric handling)
    model:   DeepFM shape
    train:   optimiser, schedule, early stopping, precision
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator

from deepfm.config.base import Frozen
from deepfm.config.data import (CRITEO_COLUMNS, PRESETS, DataConfig, DeriveConfig, Split,  # noqa: F401 (re-exported)
                                SplitConfig, TimeSplitConfig)
from deepfm.config.fields import (FIELD_KINDS, CategoricalField, FieldConfig, MultiField,  # noqa: F401 (re-exported)
                                  NumericField, parse_field)
from deepfm.config.training import ModelConfig, TrainConfig, auto_batch_size  # noqa: F401 (re-exported)
from deepfm.data import sources
from deepfm.errors import ConfigError


class Config(Frozen):
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
        if len(parts) >= 3 and parts[0] == "fields" and parts[2] in FIELD_KINDS:
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
