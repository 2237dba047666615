"""Exact metrics and the proximal optimiser, against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from deepfm.metrics import auc, calibration, group_auc, log_loss, reliability
from deepfm.train.optim import ProximalAdagrad


def test_auc_exact_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000), 2)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(np.array([0, 1]), np.array([0.3, 0.3])) == 0.5
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_log_loss_calibration_and_gauc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    p = rng.uniform(0.01, 0.99, 2000)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)
    assert calibration(y, p) == pytest.approx(p.mean() / y.mean())
    g = rng.integers(0, 30, 2000)
    expected_num = expected_den = 0.0
    for k in range(30):
        m = g == k
        if 0 < y[m].sum() < m.sum():
            expected_num += roc_auc_score(y[m], p[m]) * m.sum()
            expected_den += m.sum()
    assert group_auc(y, p, g) == pytest.approx(expected_num / expected_den, abs=1e-12)
    mean_p, rate, count = reliability(y, p, bins=10)
    assert count.sum() == 2000 and np.all(np.diff(mean_p) > 0)


def test_proximal_adagrad_matches_tensorflow_formula_and_l1_zeroes():
    w0 = torch.tensor([0.5, -0.02, 0.3])
    g = torch.tensor([0.1, 0.01, -0.2])
    lr, l1, l2, init = 0.1, 0.5, 0.2, 0.1
    p = torch.nn.Parameter(w0.clone())
    opt = ProximalAdagrad([p], lr=lr, l1=l1, l2=l2, initial_accumulator_value=init)
    p.grad = g.clone()
    opt.step()
    accum = init + g * g
    lr_t = lr / accum.sqrt()
    v = w0 - lr_t * g
    expected = torch.sign(v) * torch.clamp(v.abs() - lr_t * l1, min=0) / (1 + lr_t * l2)
    torch.testing.assert_close(p.detach(), expected)
    assert p[1].item() == 0.0  # small weight driven exactly to zero by L1


def test_proximal_adagrad_sparse_rows_equal_dense_update():
    torch.manual_seed(0)
    table = torch.randn(6, 3)
    dense_p = torch.nn.Parameter(table.clone())
    sparse_p = torch.nn.Parameter(table.clone())
    ids = torch.tensor([1, 4, 1])
    for p, sparse in ((dense_p, False), (sparse_p, True)):
        opt = ProximalAdagrad([p], lr=0.05, l1=0.01, l2=0.01)
        loss = torch.nn.functional.embedding(ids, p, sparse=sparse).pow(2).sum()
        loss.backward()
        opt.step()
    # rows the batch touched are updated identically; untouched rows do not move under the sparse update
    torch.testing.assert_close(sparse_p.detach()[[1, 4]], dense_p.detach()[[1, 4]])
    torch.testing.assert_close(sparse_p.detach()[[0, 2, 3, 5]], table[[0, 2, 3, 5]])


def test_rowwise_adam_equals_torch_sparse_adam():
    from deepfm.train.optim import RowwiseAdam

    torch.manual_seed(0)
    table = torch.randn(20, 4)
    ours, ref = torch.nn.Parameter(table.clone()), torch.nn.Parameter(table.clone())
    opt_ours, opt_ref = RowwiseAdam([ours], lr=0.01), torch.optim.SparseAdam([ref], lr=0.01)
    for step in range(5):
        ids = torch.randint(0, 20, (30,))  # repeated rows: gradients must be summed
        target = torch.randn(30, 4)
        for p, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(torch.nn.functional.embedding(ids, p, sparse=True), target).backward()
            opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_counts_a_sparse_gradient_with_duplicates_summed():
    from deepfm.train.optim import clip_grad_norm

    torch.manual_seed(0)
    table, dense = torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(4))
    idx = torch.tensor([1, 4, 1, 7, 4, 4])
    vals = torch.randn(6, 3)
    table.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, (10, 3))
    dense.grad = torch.randn(4) * 5
    ref_t, ref_d = torch.nn.Parameter(table.detach().clone()), torch.nn.Parameter(dense.detach().clone())
    ref_t.grad, ref_d.grad = table.grad.to_dense(), dense.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_([ref_t, ref_d], 1.5)
    norm = clip_grad_norm([table, dense], 1.5)
    assert torch.allclose(norm, expected)
    torch.testing.assert_close(table.grad.to_dense(), ref_t.grad)
    torch.testing.assert_close(dense.grad, ref_d.grad)
    # below the limit nothing changes
    before = dense.grad.clone()
    clip_grad_norm([table, dense], 1e6)
    torch.testing.assert_close(dense.grad, before)


def test_whole_table_embedding_l2_is_fuxictrs_penalty():
    """scope "table": one Adam step equals Adam on loss + l2/2 * ||W||^2 over the whole table (FuxiCTR)."""
    from deepfm.config import TrainConfig
    from deepfm.train.optim import build_optimizers

    torch.manual_seed(0)
    lam = 0.05

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(6, 3)
            self.out = torch.nn.Linear(3, 1)

        def forward(self, ids):
            return self.out(self.embedding(ids).sum(1)).squeeze(-1)

    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    ids, y = torch.tensor([[0, 1], [1, 2]]), torch.tensor([1.0, 0.0])
    opts = build_optimizers(a, TrainConfig(sparse=False, embedding_l2=lam, embedding_l2_scope="table", lr=0.01))
    torch.nn.functional.binary_cross_entropy_with_logits(a(ids), y).backward()
    for o in opts:
        o.step()
    ref = torch.optim.Adam(b.parameters(), lr=0.01)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(b(ids), y) + lam / 2 * b.embedding.weight.pow(2).sum()
    loss.backward()
    ref.step()
    torch.testing.assert_close(a.embedding.weight, b.embedding.weight)
    torch.testing.assert_close(a.out.weight, b.out.weight)
    with pytest.raises(ValueError, match="sparse: false"):
        TrainConfig(embedding_l2=lam, embedding_l2_scope="table")
