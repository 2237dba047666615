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


def _training_pair(combiners: tuple[str, ...], dtype: torch.dtype = torch.float32):
    torch.manual_seed(5)
    cfg = ModelConfig(embed_dim=4, hidden_units=[8], init_std=0.5)
    fused = DeepFM(_layout(combiners), cfg).to(dtype)
    plain = DeepFM(_layout(combiners), cfg).to(dtype)
    plain.load_state_dict(fused.state_dict())
    plain.fuse = False
    with torch.no_grad():
        for m in (fused, plain):
            m.embedding.weight[:, 4].copy_(torch.linspace(-1, 1, 21, dtype=dtype))
    rng = np.random.default_rng(7)
    inp = make_input(np.stack([rng.integers(0, 6, 6), rng.integers(0, 5, 6)], 1),
                     np.array([[0.5], [np.nan], [2.0], [-1.5], [0.0], [3.0]], np.float32),
                     [(rng.integers(0, 6, 9), rng.uniform(0.2, 2, 9).astype(np.float32), np.array([3, 0, 1, 2, 2, 1]))
                      for _ in combiners])
    args = (inp.cat_ids, inp.num_values.to(dtype), inp.multi_ids, inp.multi_weights.to(dtype), inp.multi_bags)
    return fused, plain, args


@pytest.mark.parametrize("combiners", [(), ("sqrtn", "mean")])
@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_training_head_equals_the_plain_graph(combiners, native_on, bf16, monkeypatch):
    """The fused head (training only) gives the plain graph's logits and gradients: numeric scaling, missing
    values, pooled multi-valued fields (their square excess), with the native kernel and without."""
    from deepfm import native

    if not native_on:
        monkeypatch.setattr(native, "load", lambda: None)
    fused, plain, args = _training_pair(combiners)
    grads = []
    for model in (fused, plain):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(*args)
        (out * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per row
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_f, g_f), (out_p, g_p) = grads
    tol = {"rtol": 1e-5, "atol": 1e-5} if bf16 else {"rtol": 1e-6, "atol": 1e-6}  # the DNN sees the same bf16 input
    torch.testing.assert_close(out_f, out_p, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # inference uses it too
        torch.testing.assert_close(fused.eval()(*args), plain.eval()(*args), **tol)
    assert g_f.keys() == g_p.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-5, atol=1e-5 if bf16 else 1e-6, msg=name)


@pytest.mark.parametrize("bf16", [False, True])
def test_scoring_pass_reads_the_table_directly_with_the_training_heads_bits(bf16):
    """Without a gradient, single-valued fields are scored straight from the table (``head_gather_forward``):
    the same logits, bit for bit, as looking the rows up and running the fused head; a bad id is an error."""
    from deepfm import native

    if native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    fused, _plain, args = _training_pair(())
    fused.eval()
    calls = []
    real = native.head_gather_forward
    try:
        native.head_gather_forward = lambda *a: calls.append(1) or real(*a)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                scored = fused(*args)
            looked_up = fused(*args).detach()  # with a gradient: the training path
    finally:
        native.head_gather_forward = real
    assert calls == [1]
    assert torch.equal(scored, looked_up)
    bad = (args[0].clone(), *args[1:])
    bad[0][4, 0] = 10**6
    with torch.no_grad(), pytest.raises(IndexError, match="1000000 is outside the embedding table's 21 rows"):
        fused(*bad)


def test_fused_head_gradient_is_exact():
    from deepfm.model.interaction import _FusedHeadFn

    torch.manual_seed(0)
    rows = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)  # float64: the torch path
    assert torch.autograd.gradcheck(lambda r: _FusedHeadFn.apply(r, torch.float64), (rows,))


def test_native_head_casts_to_bfloat16_as_torch_does():
    from deepfm import native

    if native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    specials = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 3.0e38, 1e-40, float("inf"), -float("inf"),
                             float("nan"), 65504.5, -2.7182817])
    rows = torch.randn(64, 3, 5)
    rows[:3, :, :4] = specials.view(3, 4).unsqueeze(1)  # ties, rounding overflow, denormals, inf, NaN
    x, total, first_second = native.head_forward(rows, torch.bfloat16)
    expected = rows[..., :4].to(torch.bfloat16).reshape(64, -1)
    assert torch.equal(x.view(torch.int16)[~expected.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert x.isnan().equal(expected.isnan())
    finite = slice(3, None)
    torch.testing.assert_close(total[finite], rows[finite, :, :4].sum(1))
    fm = BiInteraction()(rows[finite, :, :4]).sum(1) + rows[finite, :, 4].sum(1)
    torch.testing.assert_close(first_second[finite], fm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dnn_fused_linear_relu_equals_the_plain_layers_under_bf16_autocast(dropout, monkeypatch):
    import deepfm.model.dnn as dnn_module
    from deepfm.model import paths

    if not paths._HAS_LINEAR_POINTWISE:
        pytest.skip("this torch build has no oneDNN linear_pointwise")
    torch.manual_seed(0)
    dnn = dnn_module.DNN(24, [16, 8], dropout=dropout)
    x = torch.randn(64, 24)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(paths, "_HAS_LINEAR_POINTWISE", fused)
        dnn.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dnn(xi)
        (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((out.detach().float(), xi.grad, [p.grad.clone() for p in dnn.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    assert torch.equal(o1, o2)  # the same bf16 GEMM, the ReLU fused into it
    torch.testing.assert_close(gx1, gx2)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b)



def test_dnn_scoring_pass_adds_bias_and_relu_natively_with_the_plain_layers_result(monkeypatch):
    import deepfm.model.dnn as dnn_module
    from deepfm import native
    from deepfm.model import paths

    if native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    torch.manual_seed(0)
    dnn = dnn_module.DNN(24, [16, 8], dropout=0.3).eval()
    x = torch.randn(200, 24)
    calls = []
    real = native.bias_relu_
    monkeypatch.setattr(native, "bias_relu_", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = dnn(x)
        with paths.plain_graph():
            plain = dnn(x)
    assert len(calls) == 2  # both hidden layers, the output layer plain
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)  # the bias is added after the GEMM, not before
    dnn(x.requires_grad_(True)).sum().backward()  # a training pass keeps torch's layers and their gradients
    assert len(calls) == 2 and x.grad is not None


def test_native_bias_relu_follows_torch_on_nan_and_zero():
    from deepfm import native

    if native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    y = torch.randn(300, 7)
    y[0, :4] = torch.tensor([float("nan"), 0.0, -0.0, float("inf")])
    b = torch.randn(7)
    b[:4] = 0.0
    got = native.bias_relu_(y.clone(), b)
    expected = torch.relu(y + b)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert native.bias_relu_(torch.zeros(0, 7), b).shape == (0, 7)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_cpu_dropout_keeps_the_expectation_and_drops_p(p, use_kernel, monkeypatch):
    from deepfm import native
    from deepfm.model.dnn import dropout_cpu

    if use_kernel and native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    if not use_kernel:
        monkeypatch.setattr(native, "load", lambda: None)
    torch.manual_seed(0)
    x = torch.ones(512, 1001, requires_grad=True)  # 512 * 1001 is no multiple of 4: a part-used last word
    out = dropout_cpu(x, p)
    drop = round(p * 65536)
    kept = out != 0
    n = x.numel()
    # the drop rate is p (to 2^-17) and the draws are uniform: within 5 binomial standard deviations
    assert abs(float((~kept).float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.all(out[kept] == 65536 / (65536 - drop))  # inverted dropout: E[out] = x exactly
    for col in range(4):  # each 16-bit slot of a random word drops at the same rate
        slot = (~kept).flatten()[col::4].float().mean()
        assert abs(float(slot) - p) < 5 * math.sqrt(p * (1 - p) / (n / 4))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient is masked and scaled as the output
    torch.manual_seed(0)
    assert torch.equal(dropout_cpu(x.detach(), p), out.detach())  # torch's generator: seeded runs repeat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dropout_is_bitwise_torchs_product_with_its_mask(dtype):
    from deepfm import native

    if native.load() is None:
        pytest.skip("no C compiler: the torch path is used")
    torch.manual_seed(3)
    x = torch.randn(300, 77).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    drop = round(0.3 * 65536)
    scale = 65536 / (65536 - drop)
    out, keep = native.dropout_forward(x, drop, scale, seed=12345)
    assert keep.dtype == torch.bool and out.dtype == dtype
    assert abs(float((~keep).float().mean()) - 0.3) < 0.01
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.view(bits), b.view(bits))

    assert same(out, x * keep * scale)  # bit for bit: one rounding, -0 for a dropped negative, NaN kept
    g = torch.randn(300, 77).to(dtype)
    assert same(native.dropout_backward(g, keep, scale), g * scale * keep)
    again, keep2 = native.dropout_forward(x, drop, scale, seed=12345)
    assert same(again, out) and torch.equal(keep, keep2) and not torch.equal(keep, native.dropout_forward(x, drop, scale, seed=1)[1])


def test_dnn_dropout_module_is_identity_in_eval_and_at_zero():
    from deepfm.model.dnn import Dropout

    x = torch.randn(8, 5)
    d = Dropout(0.3).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Dropout(0.3).train()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.all((y == 0) | torch.isclose(y.float(), x.bfloat16().float() / 0.7, rtol=1e-2))
