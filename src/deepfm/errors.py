"""Errors that reach the user: each names what went wrong and where, and says what to do next."""

from __future__ import annotations


class DeepFMError(Exception):
    """Base class of every error deepfm raises on purpose; the CLI prints it without a traceback."""


class ConfigError(DeepFMError):
    """The YAML config (or a ``--set`` override) is invalid."""


class DataError(DeepFMError):
    """A data file is missing, empty or holds a value that cannot be used.

    ``path``, ``line`` (1-based, counting a header line) and ``field`` locate the problem when known.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = []
        if path is not None:
            where.append(f"{path}" + (f", line {line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class ArtifactError(DeepFMError):
    """A model directory is missing, incomplete or written by an incompatible version."""


class OutOfMemory(DeepFMError):
    """A process ran out of memory (under its address-space limit, if one is set) while training."""
