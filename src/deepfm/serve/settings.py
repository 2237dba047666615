"""Every setting of ``deepfm serve`` in one place: its type, default, help text, flag and environment variable.

``ServeSettings`` is read (pydantic-settings) from, in order of precedence: keyword arguments (the command
line's flags, ``add_arguments``/``from_args``), ``DEEPFM_SERVE_<NAME>`` environment variables, then the
defaults below. With ``--workers N`` the worker processes are started by uvicorn's supervisor, which can
hand them nothing but the environment: ``environ`` writes the settings there, and each worker reads them back
with ``ServeSettings()`` (so the same validation runs on both sides). One worker gets the object itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DEEPFM_SERVE_"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      protected_namespaces=())

    # the process
    model_dir: str | None = Field(None, description="the model directory served (the command's MODEL_DIR)",
                                  json_schema_extra={"flag": None})
    host: str = Field("127.0.0.1", description="address to bind (127.0.0.1: this machine only; 0.0.0.0: every "
                                               "interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="worker processes (each loads the model)")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: cores / (2 * "
                                                        "workers), at least 1)")
    device: str = Field("cpu", description="where the model runs: cpu, cuda, cuda:N or auto")
    log_level: str = Field("warning", description="uvicorn log level")
    access_log: bool = Field(False, description="log every request (costs latency)")
    # what one request may ask for
    max_rows: int = Field(10_000, ge=1, description="most rows per predict request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body")
    fast_path_max_rows: int = Field(8, ge=0, description="requests up to this many rows use the pure-Python "
                                                        "encoder (0: never)",
                                    json_schema_extra={"flag": "--fast-path-rows"})
    # the model-changing endpoint
    reload_endpoint: bool = Field(True, description="POST /v1/reload (SIGHUP still reloads the current "
                                                    "directory)")

    def environ(self) -> dict[str, str]:
        """The settings as ``DEEPFM_SERVE_*`` variables, for worker processes (``ServeSettings()`` reads them)."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            out[ENV_PREFIX + name.upper()] = str(int(value) if isinstance(value, bool) else value)
        return out


def _flag(name: str, extra: Any) -> str | None:
    if isinstance(extra, dict) and "flag" in extra:
        return extra["flag"]
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its help and default from the field. A flag not given stays out of the
    namespace (``SUPPRESS``), so an environment variable of the same setting is not overridden by a default."""
    for name, info in ServeSettings.model_fields.items():
        flag = _flag(name, info.json_schema_extra)
        if flag is None:
            continue
        env = ENV_PREFIX + name.upper()
        if info.annotation is bool:
            if info.default:
                parser.add_argument("--no-" + flag[2:], dest=name, action="store_false", default=argparse.SUPPRESS,
                                    help=f"turn off: {info.description} (env {env}=0)")
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS,
                                    help=f"{info.description} (env {env}=1)")
            continue
        kind = int if info.annotation in (int, int | None) else str
        default = "" if info.default is None else f"; default {info.default}"
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                            help=f"{info.description} (env {env}{default})")


def from_args(args: argparse.Namespace, **extra: Any) -> ServeSettings:
    """The settings from parsed flags (those given), the environment and the defaults."""
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields}
    return ServeSettings(**{**given, **extra})
