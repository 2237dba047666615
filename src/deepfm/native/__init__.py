"""Native kernels, compiled on first use with the system C compiler and called through ctypes.

Plain C with no Python or torch headers, so compiling takes well under a second and needs no build step at
install time. The shared library is cached under ``$DEEPFM_CACHE_DIR`` (default ``~/.cache/deepfm``),
named by a hash of the source, the compiler and the CPU, and written atomically (several ranks may build at
once). Without a C compiler, or with ``DEEPFM_NATIVE=0``, every kernel has a torch path that computes the same:
``deepfm.model.paths`` sends the forward pass there, and ``rowwise_adam`` returns False to its optimiser.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from deepfm.io import atomic_path

_SOURCES = sorted(Path(__file__).parent.glob("*.c"))
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # included by the sources: part of the cache key
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    if os.environ.get("DEEPFM_CACHE_DIR"):
        return Path(os.environ["DEEPFM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepfm"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def torch_uses_libgomp() -> bool:
    """Whether the OpenMP runtime torch loaded is GNU's ``libgomp.so.1`` (Linux wheels), read from this process's
    mapped files. Only then may the kernels be built with ``-fopenmp``: their ``libgomp.so.1`` resolves to
    torch's copy by soname, one thread pool. Beside another runtime (Intel's ``libiomp5``, LLVM's ``libomp``)
    they would bring a second pool that competes with torch's, so they are built without OpenMP there."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any(line.rsplit("/", 1)[-1].startswith("libgomp.so") for line in f)
    except OSError:  # not Linux
        return False


def _flag_sets(openmp: bool) -> list[list[str]]:
    """Tried in order until one builds: tuned to this CPU (with OpenMP where torch's runtime is libgomp), then
    without OpenMP (a compiler without it: one thread), then without -march=native."""
    return ([["-march=native", "-fopenmp"]] if openmp else []) + [["-march=native"], []]


def _compile(cc: str, out: Path, openmp: bool) -> None:
    base = [cc, "-O3", "-fno-math-errno", "-Wno-unknown-pragmas", "-shared", "-fPIC", "-std=c99"]
    with atomic_path(out) as tmp:  # several ranks may build at once: each renames a complete library in
        for flags in _flag_sets(openmp):
            res = subprocess.run(base + flags + [*map(str, _SOURCES), "-o", str(tmp), "-lm"], capture_output=True,
                                 text=True, timeout=120, check=False)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip()[-2000:])


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None where that is off or impossible."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("DEEPFM_NATIVE", "1").lower() in ("0", "false", "no", "off") or os.name == "nt":
            return None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            return None
        openmp = torch_uses_libgomp()
        key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + cc.encode()
                             + _cpu_signature().encode() + platform.machine().encode()
                             + (b"omp" if openmp else b"")).hexdigest()[:16]
        path = cache_dir() / f"kernels-{key}.so"
        try:
            if not path.is_file():
                _compile(cc, path, openmp)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            warnings.warn(f"deepfm: the native kernels could not be built ({exc}); using the torch path (same "
                          f"results, slower). Set DEEPFM_NATIVE=0 to skip the attempt.", stacklevel=2)
            return None
        fn = lib.deepfm_rowwise_adam
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        fn.argtypes = [p, p, p, i64, i64, p, p, i64, p, p, p, f32, f32, f32, f32, f32, f32, i64]
        fn.restype = i64
        lib.deepfm_head_forward.argtypes = [p, i64, i64, i64, p, i64, p, p, i64]
        lib.deepfm_head_forward.restype = None
        lib.deepfm_head_gather_forward.argtypes = [p, i64, p, p, i64, i64, i64, p, i64, p, i64]
        lib.deepfm_head_gather_forward.restype = i64
        lib.deepfm_head_backward.argtypes = [p, p, p, i64, p, i64, i64, i64, p, i64]
        lib.deepfm_head_backward.restype = None
        lib.deepfm_dropout_forward.argtypes = [p, p, p, i64, i64, i64, f32, ctypes.c_uint64, i64]
        lib.deepfm_dropout_forward.restype = None
        lib.deepfm_dropout_backward.argtypes = [p, p, p, i64, i64, f32, i64]
        lib.deepfm_dropout_backward.restype = None
        lib.deepfm_bias_relu.argtypes = [p, p, i64, i64, i64]
        lib.deepfm_bias_relu.restype = None
        lib.deepfm_json_scan.argtypes = [ctypes.c_char_p, i64, p]
        lib.deepfm_json_scan.restype = None
        _lib = lib
        return _lib


def _kernels() -> ctypes.CDLL:
    """The loaded kernels, for wrappers whose caller checked (``deepfm.model.paths``) that they are built."""
    lib = load()
    if lib is None:
        raise RuntimeError("deepfm native kernels called without being built (ask deepfm.model.paths first)")
    return lib


class Scratch:
    """Working memory of ``rowwise_adam`` for one table, kept between steps: a row -> slot map (int32, all -1
    between calls) and buffers for the summed rows. Allocating them afresh each step costs more in page
    faults than the kernel's own work."""

    def __init__(self) -> None:
        self.slot = torch.empty(0, dtype=torch.int32)
        self.acc = torch.empty(0, dtype=torch.float32)
        self.rows = torch.empty(0, dtype=torch.int64)

    def reserve(self, num_rows: int, n: int, dim: int) -> None:
        if self.slot.numel() != num_rows:
            self.slot = torch.full((num_rows,), -1, dtype=torch.int32)
        if self.acc.numel() < n * dim:
            self.acc = torch.empty(n * dim, dtype=torch.float32)
            self.rows = torch.empty(n, dtype=torch.int64)


def rowwise_adam(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, scratch: Scratch,
                 ids: torch.Tensor, grad: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 bias1: float, bias2: float) -> bool:
    """One lazy-Adam update of the rows ``ids`` (duplicates allowed) with gradient rows ``grad [N, D]``.

    Returns False, touching nothing, where the kernel does not apply (not built, not CPU, not float32, not
    2-D); the caller then uses its torch path.
    """
    tensors = (weight, exp_avg, exp_avg_sq, grad)
    if (weight.device.type != "cpu" or any(t.dtype != torch.float32 for t in tensors)
            or not all(t.is_contiguous() for t in tensors[:3])
            or weight.dim() != 2 or grad.dim() != 2 or grad.shape[1] != weight.shape[1]):
        return False
    lib = load()
    if lib is None:
        return False
    ids = ids.contiguous().to(torch.int64)
    grad = grad.contiguous()
    n, dim = grad.shape
    scratch.reserve(weight.shape[0], n, dim)
    got = lib.deepfm_rowwise_adam(weight.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), weight.shape[0],
                                  dim, ids.data_ptr(), grad.data_ptr(), n, scratch.slot.data_ptr(),
                                  scratch.acc.data_ptr(), scratch.rows.data_ptr(), lr / bias1, 1 - beta1, beta2,
                                  1 - beta2, bias2, eps, torch.get_num_threads())
    if got < 0:
        raise IndexError(f"row id {int(ids[-got - 1])} is outside the table's {weight.shape[0]} rows")
    return True


def head_forward(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows [B, F, D + 1]`` -> (DNN input ``[B, F * D]`` in ``dtype``, sum of the field vectors ``[B, D]``,
    first + second order logit part ``[B]``), in one pass (``fused_head.c``); the caller checked
    ``deepfm.model.paths.head_kernel``."""
    batch, fields, dim = rows.shape[0], rows.shape[1], rows.shape[2] - 1
    x = torch.empty((batch, fields * dim), dtype=dtype)
    total = torch.empty((batch, dim), dtype=torch.float32)
    first_second = torch.empty(batch, dtype=torch.float32)
    _kernels().deepfm_head_forward(rows.data_ptr(), batch, fields, dim, x.data_ptr(), int(dtype == torch.bfloat16),
                                   total.data_ptr(), first_second.data_ptr(), torch.get_num_threads())
    return x, total, first_second


def head_gather_forward(table: torch.Tensor, ids: torch.Tensor, values: torch.Tensor | None, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_forward``'s DNN input and first + second order part for the rows ``table[ids] * values[..., None]``
    (``ids`` int64 and ``values`` float32 ``[B, F]``; ``values`` None: all 1), read straight from the table: the
    scoring pass, which keeps no rows for a backward. The caller checked ``paths.head_gather_kernel``; an id
    outside the table raises IndexError."""
    ids = ids.contiguous()
    values = None if values is None else values.contiguous()
    (batch, fields), dim = ids.shape, table.shape[1] - 1
    x = torch.empty((batch, fields * dim), dtype=dtype)
    first_second = torch.empty(batch, dtype=torch.float32)
    got = _kernels().deepfm_head_gather_forward(table.data_ptr(), table.shape[0], ids.data_ptr(),
                                                None if values is None else values.data_ptr(), batch, fields, dim,
                                                x.data_ptr(), int(dtype == torch.bfloat16), first_second.data_ptr(),
                                                torch.get_num_threads())
    if got < 0:
        raise IndexError(f"row id {int(ids.view(-1)[-got - 1])} is outside the embedding table's {table.shape[0]} "
                         f"rows")
    return x, first_second


def head_backward(rows: torch.Tensor, total: torch.Tensor, grad_x: torch.Tensor | None,
                  grad_logit: torch.Tensor) -> torch.Tensor:
    """The gradient of ``rows`` for ``head_forward``'s outputs, in one pass; the caller checked
    ``paths.head_backward_kernel``."""
    batch, fields, dim = rows.shape[0], rows.shape[1], rows.shape[2] - 1
    g = grad_logit.contiguous()
    dx = grad_x.contiguous() if grad_x is not None else None
    out = torch.empty_like(rows, memory_format=torch.contiguous_format)
    _kernels().deepfm_head_backward(rows.data_ptr(), total.data_ptr(), None if dx is None else dx.data_ptr(),
                                    int(dx is not None and dx.dtype == torch.bfloat16), g.data_ptr(), batch, fields,
                                    dim, out.data_ptr(), torch.get_num_threads())
    return out


def dropout_forward(x: torch.Tensor, drop: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout of ``x`` (``dropout.c``): (output, keep mask as bool), the mask drawn from ``seed`` with
    each element dropped when its 16-bit draw is below ``drop``; the caller checked ``paths.dropout_kernel``."""
    out = torch.empty_like(x)
    keep = torch.empty(x.shape, dtype=torch.bool)
    _kernels().deepfm_dropout_forward(x.data_ptr(), out.data_ptr(), keep.data_ptr(), x.numel(),
                                      int(x.dtype == torch.bfloat16), drop, scale, seed & ((1 << 64) - 1),
                                      torch.get_num_threads())
    return out, keep


def dropout_backward(grad: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``grad * keep * scale`` in one pass (``grad`` contiguous, the shape of ``keep``); the caller checked
    ``paths.dropout_kernel``."""
    out = torch.empty_like(grad)
    _kernels().deepfm_dropout_backward(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(),
                                       int(grad.dtype == torch.bfloat16), scale, torch.get_num_threads())
    return out


def bias_relu_(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y = relu(y + bias)`` in place on a contiguous float32 ``[B, N]`` GEMM output (``linear_relu.c``); the
    caller checked ``paths.bias_relu_kernel``."""
    _kernels().deepfm_bias_relu(y.data_ptr(), bias.data_ptr(), y.shape[0], y.shape[1], torch.get_num_threads())
    return y


def json_scan(text: bytes) -> tuple[int, int] | None:
    """(deepest nesting of arrays and objects, longest run of digits) of a JSON text (``json_scan.c``), or
    None where the kernels are not built (``deepfm.serve.limits`` then takes its numpy path)."""
    lib = load()
    if lib is None:
        return None
    out = (ctypes.c_int64 * 2)()
    lib.deepfm_json_scan(text, len(text), ctypes.addressof(out))
    return out[0], out[1]
