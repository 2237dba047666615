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
    assert native.reuse_freed_memory()
