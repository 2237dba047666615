"""The native row-wise Adam kernel: same update as the torch path, safe on bad ids, optional at run time."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from deepfm import native
from deepfm.train.optim import RowwiseAdam

needs_kernel = pytest.mark.skipif(native.load() is None, reason="no C compiler: the torch path is used")


def _train(use_native: bool, table: torch.Tensor, steps: int = 6, dim_rows: int = 50) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)
    p = torch.nn.Parameter(table.clone())
    opt = RowwiseAdam([p], lr=0.05, native=use_native)
    for _ in range(steps):
        # heavy duplicates (as a Zipf field), rows never touched, and a different set each step
        ids = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(0, dim_rows // 2, (200,))])
        target = torch.randn(ids.numel(), table.shape[1])
        opt.zero_grad()
        F.mse_loss(F.embedding(ids, p, sparse=True), target, reduction="sum").backward()
        opt.step()
    return p.detach(), opt.state[p]


@needs_kernel
@pytest.mark.parametrize("dim", [1, 16, 17, 33])
@pytest.mark.parametrize("steps", [1, 6])
def test_native_rowwise_adam_equals_the_torch_path(dim, steps):
    table = torch.randn(50, dim)
    w_native, s_native = _train(True, table, steps)
    w_torch, s_torch = _train(False, table, steps)
    # duplicate rows are summed in another order: equal up to float rounding, which Adam's m / sqrt(v)
    # amplifies over steps where the summed gradient nearly cancels
    tol = {"rtol": 1e-5, "atol": 1e-6} if steps == 1 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(w_native, w_torch, **tol)
    torch.testing.assert_close(s_native["exp_avg"], s_torch["exp_avg"], **tol)
    torch.testing.assert_close(s_native["exp_avg_sq"], s_torch["exp_avg_sq"], **tol)
    assert s_native["step"] == s_torch["step"] == steps
    # rows no batch touched keep their initial values and zero moments
    untouched = torch.arange(25, 50)
    assert torch.equal(w_native[untouched], table[untouched])
    assert not s_native["exp_avg"][untouched].any()


@needs_kernel
def test_native_kernel_is_deterministic_and_leaves_its_slot_map_clean():
    table = torch.randn(50, 17)
    a, _ = _train(True, table)
    b, _ = _train(True, table)
    assert torch.equal(a, b)
    scratch = native.Scratch()
    w, m, v = torch.randn(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    assert native.rowwise_adam(w, m, v, scratch, torch.tensor([3, 3, 9]), torch.ones(3, 4), lr=0.1, beta1=0.9,
                               beta2=0.999, eps=1e-8, bias1=0.1, bias2=0.001)
    assert (scratch.slot == -1).all()
    # one Adam step from zero moments moves each touched weight by lr (|m_hat / sqrt(v_hat)| = 1)
    torch.testing.assert_close(m[3], torch.full((4,), 0.2))
    assert torch.allclose(v[9], torch.full((4,), 0.001))


@needs_kernel
def test_an_out_of_range_id_raises_and_changes_nothing():
    scratch = native.Scratch()
    w, m, v = torch.randn(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    before = w.clone()
    with pytest.raises(IndexError, match="row id 10 is outside the table's 10 rows"):
        native.rowwise_adam(w, m, v, scratch, torch.tensor([1, 2, 10]), torch.ones(3, 4), lr=0.1, beta1=0.9,
                            beta2=0.999, eps=1e-8, bias1=0.1, bias2=0.001)
    assert torch.equal(w, before) and not m.any() and (scratch.slot == -1).all()


def test_the_kernel_declines_what_it_does_not_handle():
    scratch = native.Scratch()
    w64 = torch.randn(10, 4, dtype=torch.float64)
    before = w64.clone()
    assert not native.rowwise_adam(w64, torch.zeros_like(w64), torch.zeros_like(w64), scratch, torch.tensor([1]),
                                   torch.ones(1, 4, dtype=torch.float64), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                                   bias1=0.1, bias2=0.001)
    assert torch.equal(w64, before)  # float64 tables go through torch; so does everything on CUDA


def test_without_a_compiler_training_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("DEEPFM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.delenv("DEEPFM_NATIVE", raising=False)
    with pytest.warns(UserWarning, match="could not be built.*torch path"):
        assert native.load() is None
    # the optimiser still trains, through torch
    w, state = _train(True, torch.randn(50, 8))
    assert state["step"] == 6 and torch.isfinite(w).all()
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_deepfm_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("DEEPFM_NATIVE", "0")
    assert native.load() is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reuse_freed_memory_applies_on_glibc():
    from deepfm.process import reuse_freed_memory

    assert reuse_freed_memory()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_the_same_bits_on_one_thread_and_on_two(dtype):
    """The kernels split rows (head, Adam) or elements (dropout) over torch's OpenMP threads; each output is
    computed by one thread whatever the split, so the bits cannot depend on the thread count."""
    torch.manual_seed(3)
    rows = torch.randn(700, 7, 17)
    g = torch.randn(700)
    dx = torch.randn(700, 7 * 16).to(dtype)
    table = torch.randn(20_000, 16)
    ids = torch.randint(0, 20_000, (30_000,))  # > 4096 distinct rows: the Adam update is split too
    grad = torch.randn(30_000, 16)
    x = torch.randn(5_003).to(dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = native.head_forward(rows, dtype)
            bwd = native.head_backward(rows, fwd[1], dx, g)
            w, m, v = table.clone(), torch.zeros_like(table), torch.zeros_like(table)
            assert native.rowwise_adam(w, m, v, native.Scratch(), ids, grad, lr=0.01, beta1=0.9, beta2=0.999,
                                       eps=1e-8, bias1=0.1, bias2=0.001)
            drop, keep = native.dropout_forward(x, 9_000, 1.2, seed=77)
            results.append([*fwd, bwd, w, m, v, drop, keep, native.dropout_backward(x, keep, 1.2)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_the_kernels_share_torchs_openmp_runtime():
    """Linked against libgomp.so.1, the kernels must resolve to the copy torch loaded (its soname), not a second
    runtime with its own spinning thread pool."""
    native.load()
    with open("/proc/self/maps", encoding="utf-8") as f:
        # by soname: another package's renamed copy (scikit-learn's libgomp-<hash>.so) is its own business
        gomp = {line.split()[-1] for line in f if line.split()[-1].rsplit("/", 1)[-1].startswith("libgomp.so")}
    assert len(gomp) <= 1, gomp


def test_importing_deepfm_changes_no_environment_and_the_command_shortens_openmps_spin():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    show = "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'))"

    def run(code: str, **extra: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    # a library: importing it (and using the estimator) leaves the process's environment alone
    assert run(f"import os, deepfm, deepfm.api, torch; {show}") == ["None", "None"]
    # the command applies it before anything loads torch; a value the user set wins
    command = f"import os\nfrom deepfm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n{show}"
    assert run(command)[-2:] == ["5000", "1"]  # after the help text
    assert run(command, GOMP_SPINCOUNT="300000")[-2:] == ["300000", "1"]
    # opt-in for a program: before torch it applies; torch loaded first has read its settings, so it does not
    assert run(f"import os, deepfm.process as p; print(p.tune_process(malloc=False)); {show}") == \
        ["{'openmp':", "True,", "'malloc':", "False}", "5000", "1"]
    assert run(f"import os, torch, deepfm.process as p; print(p.tune_openmp()); {show}") == ["False", "None", "None"]


def test_openmp_only_beside_torchs_own_libgomp():
    assert ["-march=native", "-fopenmp"] in native._flag_sets(True)
    assert all("-fopenmp" not in flags for flags in native._flag_sets(False))  # libiomp5 / libomp: one thread
    if platform.system() == "Linux" and "+cpu" in torch.__version__:
        assert native.torch_uses_libgomp()  # the PyPI Linux wheels bundle libgomp.so.1
