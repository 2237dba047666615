"""A safetensors file's header, read and checked before any tensor is: ``read_header`` and ``check_tensors``.

A model directory can be damaged (a copy cut short, a file replaced by something else) or handed over by
someone else (``POST /v1/reload``). The format is 8 bytes of little-endian header length, that many bytes of
JSON, then the raw data; so a reader that trusts the length field allocates whatever a damaged file says
(random bytes: a ``MemoryError``, not an answer). Here the length is checked against the safetensors
library's own cap and against the file's size before anything is read, every entry is checked against the
bytes the file holds, and the tensors' names and shapes are checked against the model the config builds,
so a bad file is one ``ArtifactError`` line that names it and says what is wrong. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from deepfm.errors import ArtifactError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers (its MAX_HEADER_SIZE)
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
              "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its dtype name, shape, and byte range in the file (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _damaged(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what}; the model directory is damaged: retrain or restore it")


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors (name -> ``Entry``) and the metadata of the safetensors file ``path``, every field checked
    against the file's size; an ``ArtifactError`` naming the file for anything that is not a whole file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            if size < 8:
                raise _damaged(path, f"not a safetensors file (only {size} bytes)")
            length = int.from_bytes(fh.read(8), "little")
            if length > MAX_HEADER_BYTES:
                raise _damaged(path, f"not a safetensors file (its header length field says {length:,} bytes, "
                                     f"more than the {MAX_HEADER_BYTES:,} a header may have)")
            if 8 + length > size:
                raise _damaged(path, f"truncated (its header needs {8 + length:,} bytes, the file has {size:,})")
            raw = fh.read(length)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _damaged(path, "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _damaged(path, "not a safetensors file (its __metadata__ is not an object)")
    entries = {name: _entry(path, name, value, 8 + length) for name, value in header.items()}
    end = max((e.end for e in entries.values()), default=8 + length)
    if end > size:
        raise _damaged(path, f"truncated (its tensors need {end:,} bytes, the file has {size:,})")
    return entries, metadata


def _entry(path: Path, name: str, value: object, data_start: int) -> Entry:
    """One header entry, checked: a known dtype, a shape of non-negative ints, and a byte range that holds
    exactly that shape."""
    try:
        dtype, shape, (start, end) = value["dtype"], value["shape"], value["data_offsets"]  # type: ignore[index]
        ok = (dtype in ITEM_BYTES and isinstance(shape, list) and
              all(type(d) is int and d >= 0 for d in shape) and type(start) is int and type(end) is int)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _damaged(path, f"not a safetensors file (the header entry of tensor {name!r} is malformed)")
    if not 0 <= start <= end or end - start != math.prod(shape) * ITEM_BYTES[dtype]:
        raise _damaged(path, f"tensor {name!r}: bytes {start}..{end} do not hold a {dtype} tensor of shape "
                             f"{tuple(shape)}")
    return Entry(dtype, tuple(shape), data_start + start, data_start + end)


def check_tensors(path: str | Path, entries: dict[str, Entry], expected: dict[str, tuple[int, ...]],
                  optional: frozenset[str] = frozenset()) -> None:
    """The file holds exactly the tensors ``expected`` (name -> shape: what the config's model needs), each of
    that shape; ``optional`` names may be absent. Else one ``ArtifactError`` line naming the file."""
    path = Path(path)
    missing = sorted(set(expected) - set(entries) - optional)
    unexpected = sorted(set(entries) - set(expected))
    wrong = [f"{name} is {entries[name].shape}, needs {shape}" for name, shape in expected.items()
             if name in entries and entries[name].shape != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(f"shapes: {_few(wrong)}")
    if problems:
        raise ArtifactError(f"{path}: its tensors are not what config.yaml's model needs ({'; '.join(problems)}); "
                            "the weights belong to another model or the directory is damaged")


def _few(items: list[str], most: int = 4) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")
