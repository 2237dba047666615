"""What every reader yields and reports to: a chunk of rows with their line numbers (``RawChunk``), the sink
of skipped rows (``BadRows``), and the check that an input file can be read at all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from deepfm.data import sources
from deepfm.errors import DataError


@dataclass
class RawChunk:
    """Rows of one file: ``frame`` holds the columns, ``lines`` the 1-based line (or Parquet row) numbers."""

    path: str
    frame: pl.DataFrame
    lines: np.ndarray  # int64 [N]
    row_start: int  # 0-based index of the chunk's first data row within its file
    absent_is_missing: bool = False  # a column the frame lacks is all missing (sparse formats: libffm, libsvm)

    def __len__(self) -> int:
        return self.frame.height


@dataclass
class BadRows:
    """Collects rows skipped under ``skip_bad_rows``: a count and a side file of ``path:line: reason``."""

    side_file: Path | None = None
    count: int = 0
    examples: list[str] = field(default_factory=list)
    entries: list[tuple[str, int | None, str, str]] = field(default_factory=list)  # kept without a side file
    _handle: object | None = None

    def add(self, path: str, line: int | None, reason: str, text: str = "") -> None:
        self.count += 1
        if self.side_file is None:
            self.entries.append((path, line, reason, text))
        entry = f"{path}:{line if line is not None else '?'}: {reason}\t{text}"
        if len(self.examples) < 5:
            self.examples.append(entry)
        if self.side_file is not None:
            if self._handle is None:
                self.side_file.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.side_file, "a", encoding="utf-8")  # noqa: SIM115
            self._handle.write(entry.replace("\n", " ") + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # type: ignore[attr-defined]
            self._handle = None


CONFIG_HINT = "check data.train / valid / test in the config, relative paths are read from the config's folder"


def check_readable(path: str, hint: str = CONFIG_HINT) -> None:
    """``hint`` says where the path came from (the config by default), so the user knows what to fix."""
    if sources.source(path).remote:
        if not sources.exists(path):
            raise DataError(f"object not found ({hint})", path=path)
    elif not os.path.exists(path):
        raise DataError(f"file not found ({hint})", path=path)
    elif os.path.isdir(path):
        raise DataError("is a folder, expected a file", path=path)
    if sources.size_of(path) == 0:
        raise DataError("file is empty", path=path)
