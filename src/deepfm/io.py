"""Atomic writes and pickle-free tensor state.

Model weights and optimiser state are stored as safetensors (loading never unpickles) plus JSON for the
non-tensor parts. Every file and folder is written under a temporary name and renamed into place, so a
crash leaves either the old version or the new one, never half of one. Files and folders get the modes the
umask gives (as ``open`` would), not ``mkstemp``'s private 0600/0700: a service account reading a model
written by another user must be able to read it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path | str, *, directory: bool = False) -> None:
    """Give a ``mkstemp`` / ``mkdtemp`` result the mode a plain ``open`` / ``mkdir`` would have had."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _temporary_prefix(final: Path, kind: str = "tmp") -> str:
    """``.NAME.tmp-PID@HOST@`` (a random tail follows): who wrote a leftover, so that only a dead writer's is
    removed (``remove_dead_temporaries``) and a live one's, or another host's on a shared folder, is kept."""
    return f".{final.name}.{kind}-{os.getpid()}@{socket.gethostname()}@"


def temp_file_beside(path: Path) -> str:
    """An empty file beside ``path`` under a temporary name, with the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path))
    os.close(fd)
    apply_umask(tmp)
    return tmp


def _fsync(path: Path | str, *, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; a folder that cannot be opened (Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(os.path.join(folder, name))
        _fsync(folder, directory=True)


@contextmanager
def atomic_path(final: Path | str, *, directory: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary path beside ``final`` to write: a file, or (``directory``) a folder to fill.

    When the block ends without an error the file (every file of the folder) and the folder are synced to disk
    and renamed to ``final``, so a crash leaves the old version or the new one, never half of one; on an error
    the temporary is removed. A folder replaces an existing ``final`` in one step where Linux allows
    (``replace_directory``); with ``keep_existing`` an existing ``final`` wins instead (a cache another process
    filled first). After the rename, leftovers of earlier writes of ``final`` by processes that are gone are
    removed. Modes follow the umask, as ``open``/``mkdir`` would give::

        with atomic_path(out) as tmp:
            tmp.write_text("done")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temporary_prefix(final))) if directory \
        else Path(temp_file_beside(final))
    try:
        yield tmp
        if directory:
            replace_directory(tmp, final, keep_existing=keep_existing)  # syncs, renames and cleans up
            return
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync(final.parent, directory=True)
    remove_dead_temporaries(final.parent, name=final.name)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor written to a safetensors file block by block (its rows in order), never held whole."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: Iterable[torch.Tensor]


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                        streamed: StreamedTensor | list[StreamedTensor] | None = None) -> None:
    """``tensors`` (and ``streamed`` ones, written block by block in list order) -> a safetensors file, atomically."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    streams = [streamed] if isinstance(streamed, StreamedTensor) else list(streamed or [])
    with atomic_path(path) as tmp:
        if not streams:
            save_file(plain, str(tmp), metadata=metadata)
            apply_umask(tmp)  # safetensors writes the file anew (0600)
        else:
            _write_safetensors(plain, streams, tmp, metadata)


def _write_safetensors(tensors: dict[str, torch.Tensor], streams: list[StreamedTensor], path: Path,
                       metadata: dict[str, str] | None) -> None:
    """The safetensors format (8-byte header size, JSON header, raw little-endian data) written by hand, so that
    each of ``streams`` goes to disk block by block; ``safetensors.torch.load_file`` reads the result as usual."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    for st in streams:
        size = int(torch.Size(st.shape).numel()) * torch.empty(0, dtype=st.dtype).element_size()
        header[st.name] = {"dtype": _SAFETENSORS_DTYPES[st.dtype], "shape": list(st.shape),
                           "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in tensors.values():
            fh.write(_raw_bytes(t))
        for st in streams:
            written, total = 0, header[st.name]["data_offsets"][1] - header[st.name]["data_offsets"][0]
            for block in st.blocks:
                if block.dtype != st.dtype or tuple(block.shape[1:]) != tuple(st.shape[1:]):
                    raise ValueError(f"{st.name}: a block of {block.dtype} {tuple(block.shape)} does not fit "
                                     f"{st.dtype} {st.shape}")
                data = _raw_bytes(block.detach().cpu().contiguous())
                fh.write(data)
                written += len(data)
            if written != total:
                raise ValueError(f"{st.name}: blocks hold {written} bytes, the shape {st.shape} needs {total}")


def _raw_bytes(t: torch.Tensor) -> bytes:
    """A CPU tensor's little-endian bytes (through a same-width integer view: numpy has no bfloat16)."""
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(ints).numpy().astype(f"<i{t.element_size()}", copy=False).tobytes()


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing directory entries in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or the filesystem cannot (the caller falls back to two renames)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def leftover_siblings(final: Path) -> list[Path]:
    """Temporaries of earlier writes of ``final`` still beside it (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefixes = (f".{final.name}.tmp-", f".{final.name}.old-")
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefixes))


# ``_temporary_prefix``'s names; also the cache's older ``.FINGERPRINT.tmp-PID@HOST`` and ``.NAME.tmp-PID``
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<tail>.+)")
_OWNER = re.compile(r"(?P<pid>\d+)(?:@(?P<host>[^@]+))?(?:@[0-9a-z_]+)?")


def remove_dead_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries under ``folder`` that writers killed on this host left (their process is gone);
    a live writer's, or another host's on a shared folder, is kept. With ``name`` (after a write of
    ``folder/name`` succeeded) only that name's, and those whose writer cannot be told are removed too.
    Returns those removed."""
    removed = []
    host = socket.gethostname()
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        m = _TEMPORARY.fullmatch(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        owner = _OWNER.fullmatch(m["tail"])
        if owner is None:
            if name is None:
                continue
        elif (owner["host"] is not None and owner["host"] != host) or _alive(int(owner["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number too large to be a process
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmp)`` and swap it in for ``final`` (``atomic_path``)."""
    with atomic_path(final, directory=True) as tmp:
        fill(tmp)


def replace_directory(tmp: Path, final: Path, *, keep_existing: bool = False) -> None:
    """Sync the complete directory ``tmp`` (beside ``final``) to disk and swap it in for ``final``; also for a
    directory several processes filled (``deepfm.train.sharding.write_directory``).

    At every moment ``final`` is the complete old directory or the complete new one: on Linux the swap is
    one ``renameat2(RENAME_EXCHANGE)``, after which the old tree (now under the temporary name) is removed.
    Elsewhere (or on a filesystem without the exchange) the old directory is renamed aside and the new one
    in, which leaves a moment without ``final``. ``keep_existing``: a ``final`` that appeared meanwhile wins."""
    try:
        apply_umask(tmp, directory=True)
        _fsync_tree(tmp)
        if not final.exists():
            try:
                os.rename(tmp, final)
            except OSError:
                if not (keep_existing and final.exists()):
                    raise
        elif keep_existing:
            pass  # tmp is removed below
        elif exchange_paths(tmp, final):
            pass  # tmp now holds the old tree, removed below
        else:
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temporary_prefix(final, "old")))
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            tmp = old
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(final.parent, directory=True)
    shutil.rmtree(tmp, ignore_errors=True)
    remove_dead_temporaries(final.parent, name=final.name)


def state_key(*path: Any) -> str:
    """The name ``save_state`` gives the tensor at ``state[path[0]][path[1]]...``."""
    return ".".join(["s", *map(str, path)])


def state_to_tensors(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state (dicts, lists) by a reference, collecting the tensors."""
    if isinstance(state, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = state
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {str(k): state_to_tensors(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [state_to_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def state_from_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: state_from_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_from_tensors(v, tensors) for v in obj]
    return obj


def optimizer_state_from_json(state: dict) -> dict:
    """Optimiser ``state`` keys are parameter indices: JSON made them strings."""
    out = dict(state)
    out["state"] = {int(k): v for k, v in state["state"].items()}
    for group in out["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return out


def save_state(path: Path, state: dict[str, Any], streamed: list[StreamedTensor] | None = None) -> None:
    """A nested state with tensors -> ``path.safetensors`` + ``path.json``, both atomically. ``streamed``: tensors
    written block by block instead of the state's tensors of the same names (the names ``state_to_tensors``
    gives, as ``state_key`` spells them), which then need not be whole in ``state``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = state_to_tensors(state, "s", tensors)
    for st in streamed or []:
        del tensors[st.name]
    atomic_save_tensors(tensors, path.with_suffix(".safetensors"), streamed=streamed)
    atomic_write_text(path.with_suffix(".json"), json.dumps(skeleton))


def load_state(path: Path) -> dict[str, Any]:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return state_from_tensors(json.loads(path.with_suffix(".json").read_text()), tensors)
