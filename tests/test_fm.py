"""The FM term checked against a brute-force pairwise sum, with every kind of field and combiner."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from deepfm.config import ModelConfig
from deepfm.data.loader import make_input
from deepfm.layout import TableLayout
from deepfm.model import BiInteraction, DeepFM, FieldEmbedding


def brute_force_fm(vectors: list[np.ndarray]) -> float:
    """sum_{i<j} <u_i, u_j> over the value-scaled feature vectors u_i = x_i v_i."""
    return float(sum(np.dot(a, b) for a, b in itertools.combinations(vectors, 2)))


def test_bi_interaction_equals_pairwise_sum():
    torch.manual_seed(0)
    fields = torch.randn(5, 7, 4, dtype=torch.float64)
    bi = BiInteraction()(fields).sum(1)
    for b in range(5):
        assert bi[b].item() == pytest.approx(brute_force_fm(list(fields[b].numpy())), rel=1e-12)


def _layout(combiners: tuple[str, ...]) -> TableLayout:
    # vocab "a" (6 rows) shared by cat fields c0 and multi field m0; vocab "b" (5 rows) for c1;
    # numeric n0 rows 11-12; multi fields m1.. on vocab "t" (8 rows) at 13
    return TableLayout(
        num_rows=21, cat_fields=("c0", "c1"), cat_offsets=(0, 6), num_fields=("n0",), num_offsets=(11,),
        multi_fields=tuple(f"m{i}" for i in range(len(combiners))),
        multi_offsets=(0,) + (13,) * (len(combiners) - 1), multi_combiners=combiners,
        vocab_blocks={"a": (0, 6), "b": (6, 5), "t": (13, 8)})


def _coefficients(weights: np.ndarray, combiner: str) -> np.ndarray:
    if combiner == "sum":
        return weights
    if combiner == "mean":
        return weights / weights.sum()
    return weights / math.sqrt(float((weights ** 2).sum()))


@pytest.mark.parametrize("combiners", [("sum", "mean", "sqrtn"), ("mean", "sqrtn", "sum"), ("sqrtn",)])
def test_embedding_fm_exact_with_weighted_multi_fields(combiners):
    torch.manual_seed(1)
    layout = _layout(combiners)
    emb = FieldEmbedding(layout, embed_dim=4, init_std=1.0).double()
    table = emb.weight.detach().numpy()
    rng = np.random.default_rng(3)
    batch = 4
    cat = np.stack([rng.integers(0, 6, batch), rng.integers(0, 5, batch)], 1)
    num = np.array([[0.5], [np.nan], [2.0], [-1.5]], dtype=np.float32)
    multi, per_row = [], []
    for k in range(len(combiners)):
        lengths = np.array([3, 0, 1, 2])  # row 1 has an empty field
        vocab = 6 if k == 0 else 8
        ids = rng.integers(0, vocab, lengths.sum())
        weights = rng.uniform(0.2, 2.0, lengths.sum()).astype(np.float32)
        multi.append((ids, weights, lengths))
        per_row.append(np.split(np.arange(lengths.sum()), np.cumsum(lengths)[:-1]))
    inp = make_input(cat, num, multi)
    fields, linear, square_excess, _ = emb(inp.cat_ids, inp.num_values.double(), inp.multi_ids,
                                         inp.multi_weights.double(), inp.multi_bags)
    fm = BiInteraction()(fields, square_excess).sum(1).detach().numpy()
    for b in range(batch):
        feats = [table[cat[b, 0], :4], table[6 + cat[b, 1], :4]]
        lin = [table[cat[b, 0], 4], table[6 + cat[b, 1], 4]]
        if np.isnan(num[b, 0]):
            feats.append(table[12, :4]); lin.append(table[12, 4])
        else:
            feats.append(num[b, 0] * table[11, :4]); lin.append(num[b, 0] * table[11, 4])
        for k, comb in enumerate(combiners):
            ids, weights, _ = multi[k]
            pos = per_row[k][b]
            off = layout.multi_offsets[k]
            if len(pos) == 0:
                pooled = np.zeros(4); pooled_lin = 0.0
            else:
                c = _coefficients(weights[pos].astype(np.float64), comb)
                tag_vecs = [c_j * table[off + i, :4] for c_j, i in zip(c, ids[pos])]
                feats.extend(tag_vecs)
                pooled = np.sum(tag_vecs, axis=0)
                pooled_lin = float(sum(c_j * table[off + i, 4] for c_j, i in zip(c, ids[pos])))
            np.testing.assert_allclose(fields[b, 3 + k].detach().numpy(), pooled, rtol=1e-6, atol=1e-6)
            lin.append(pooled_lin)
        assert fm[b] == pytest.approx(brute_force_fm(feats), rel=1e-5, abs=1e-6)
        assert linear[b].sum().item() == pytest.approx(float(np.sum(lin)), rel=1e-5, abs=1e-6)


def test_shared_vocabulary_fields_read_the_same_rows():
    layout = _layout(("sum",))
    emb = FieldEmbedding(layout, embed_dim=4, init_std=1.0)
    # c0 id 2 and m0 tag 2 (weight 1, sum) both live in vocab "a": same vector
    inp = make_input(np.array([[2, 0]]), np.array([[1.0]], np.float32),
                     [(np.array([2]), np.array([1.0], np.float32), np.array([1]))])
    fields, *_ = emb(*inp.tensors())
    torch.testing.assert_close(fields[0, 0], fields[0, 3])
    assert emb.weight.shape == (21, 5)  # one table for every field


def test_deepfm_sum_head_is_bias_plus_linear_plus_fm_without_dnn():
    torch.manual_seed(2)
    layout = _layout(("mean",))
    model = DeepFM(layout, ModelConfig(embed_dim=4, use_deep=False, init_std=0.5)).double()
    with torch.no_grad():
        model.embedding.weight[:, 4].normal_()
        model.bias.fill_(0.3)
    inp = make_input(np.array([[1, 2], [3, 4]]), np.array([[1.5], [np.nan]], np.float32),
                     [(np.array([1, 5, 2]), np.array([1.0, 2.0, 0.5], np.float32), np.array([2, 1]))])
    args = (inp.cat_ids, inp.num_values.double(), inp.multi_ids, inp.multi_weights.double(), inp.multi_bags)
    fields, linear, sq, _ = model.embedding(*args)
    expected = 0.3 + linear.sum(1) + BiInteraction()(fields, sq).sum(1)
    torch.testing.assert_close(model(*args), expected)


@pytest.mark.parametrize("head", ["sum", "project"])
@pytest.mark.parametrize("parts", [(True, True, True), (False, True, False), (False, False, True),
                                   (True, False, False)])
def test_deepfm_shapes_for_every_head_and_part(head, parts):
    use_linear, use_fm, use_deep = parts
    cfg = ModelConfig(embed_dim=8, hidden_units=[16, 8], head=head, use_linear=use_linear, use_fm=use_fm,
                      use_deep=use_deep, batch_norm=True, dropout=0.1)
    model = DeepFM(_layout(("sum", "sqrtn")), cfg)
    inp = make_input(np.array([[1, 2]]), np.array([[0.1]], np.float32),
                     [(np.array([1]), np.array([1.0], np.float32), np.array([1])),
                      (np.zeros(0, np.int64), np.zeros(0, np.float32), np.array([0]))])
    model.eval()  # one-row batch: batch norm in eval mode
    out = model(*inp.tensors())
    assert out.shape == (1,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bi_interaction_gradient_is_exact():
    """The fused backward (training) equals the derivative of the formula; no-grad/export use plain ops."""
    torch.manual_seed(0)
    fields = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    excess = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, e: BiInteraction()(f, e), (fields, excess))
    with torch.no_grad():
        torch.testing.assert_close(BiInteraction()(fields, excess), BiInteraction()(fields.detach(), excess))
