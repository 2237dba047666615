"""Every setting of ``deepfm serve`` in one place: its type, default, help text, flag and environment variable.

``ServeSettings`` is read (pydantic-settings) from, in order of precedence: keyword arguments (the command
line's flags, ``add_arguments``/``from_args``), ``DEEPFM_SERVE_<NAME>`` environment variables, then the
defaults below. ``deepfm serve`` hands the object itself to its one worker, or to the N workers it forks
(``deepfm.serve.prefork``). A process started some other way (uvicorn's own command, with the factory
``deepfm.serve.app:app_from_env``) can receive nothing but the environment: ``environ`` writes the settings
there, and ``ServeSettings()`` reads them back (so the same validation runs on both sides).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DEEPFM_SERVE_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess folder (read when it is imported)


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
    quantize: Literal["none", "int8"] = Field("none", description="int8: serve a row-wise int8 table (a float16 "
                                                                  "scale per row; from model.int8.safetensors when "
                                                                  "the directory holds a current one, else "
                                                                  "quantized at load)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="the forward pass's precision: fp32 (the probabilities deepfm predict writes), bf16 "
                            "(matrix products in bfloat16 under autocast, for CPUs with AMX and GPUs; probabilities "
                            "move in the 3rd or 4th digit; the model version ends in -bf16) or auto (bf16 where "
                            "the device has it, else fp32)")
    log_level: str = Field("warning", description="uvicorn log level")
    access_log: bool = Field(False, description="log every request (costs latency)")
    # what one request may ask for
    max_rows: int = Field(10_000, ge=1, description="most rows per predict request")
    max_explain_rows: int = Field(100, ge=1, description="most rows per predict request that asks for "
                                                        "\"explain\": true (per-row attributions cost a DNN "
                                                        "backward pass)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body")
    fast_path_max_rows: int = Field(10_000, ge=0, description="requests up to this many rows of plain values use "
                                                             "the per-record encoder, column by column, without "
                                                             "polars' fixed costs (0: never)",
                                    json_schema_extra={"flag": "--fast-path-rows"})
    max_batch_rows: int = Field(128, ge=1, description="concurrent predict requests are coalesced into one "
                                                       "forward pass of up to this many rows; larger requests go "
                                                       "straight through (1: no coalescing)")
    max_batch_delay_ms: float = Field(0.0, ge=0, description="how long a pass may wait for more requests once "
                                                             "one is queued (0: take what is queued, no wait)")
    max_json_depth: int = Field(32, ge=4, description="deepest nesting of JSON arrays and objects in a body")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds a client has to send a request's whole body "
                                                          "once its headers are in (a slow body: 408)",
                                  json_schema_extra={"flag": "--body-timeout"})
    header_timeout_s: float = Field(10.0, gt=0, description="seconds a connection has to send a request's "
                                                            "headers (then it is closed)",
                                    json_schema_extra={"flag": "--header-timeout"})
    keep_alive_s: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open",
                              json_schema_extra={"flag": "--keep-alive"})
    limit_concurrency: int | None = Field(None, ge=1, description="most connections and requests at once per "
                                                                  "worker; more are answered 503 (default: no "
                                                                  "limit)")
    # the model-changing endpoint: off unless a token is set
    admin_token: SecretStr | None = Field(None, description="token for POST /v1/reload, sent as 'Authorization: "
                                                            "Bearer TOKEN' (prefer the environment variable: a "
                                                            "flag is visible in ps); without one the endpoint "
                                                            "is off")
    model_root: str | None = Field(None, description="a reload may load only directories under this folder "
                                                     "(default: the parent folder of MODEL_DIR)")
    reload_timeout_s: float = Field(120.0, gt=0, description="with --workers N: seconds every worker has to load "
                                                             "a reloaded model and swap it in (then the reload is "
                                                             "refused and every worker keeps its current model)",
                                    json_schema_extra={"flag": "--reload-timeout"})
    reload_endpoint: bool = Field(True, description="POST /v1/reload (SIGHUP still reloads the current "
                                                    "directory)")

    def allowed_root(self, model_dir: str | Path) -> Path:
        """The folder reloads may load from, resolved (symlinks, ``..``): ``model_root``, else the parent
        folder of the model directory served at start."""
        return Path(self.model_root if self.model_root is not None else Path(model_dir).resolve().parent).resolve()

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
                                    help=f"turn off: {info.description} [env {env}=0]")
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS,
                                    help=f"{info.description} [env {env}=1]")
            continue
        kind = {int: int, int | None: int, float: float}.get(info.annotation, str)
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
        default = "" if info.default is None else f" (default: {info.default})"
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else flag[2:].upper().replace("-", "_"), help=f"{info.description}{default} [env {env}]")


def from_args(args: argparse.Namespace, **extra: Any) -> ServeSettings:
    """The settings from parsed flags (those given), the environment and the defaults."""
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields}
    return ServeSettings(**{**given, **extra})
