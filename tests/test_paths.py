"""Every forward path ``deepfm.model.paths`` can choose equals the plain graph (``paths.plain_graph()``, what
export traces): values, and gradients where the path trains, in float32 and under bf16 autocast. Each test
first checks that the chooser really takes the path it is about."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from deepfm import native
from deepfm.config import ModelConfig
from deepfm.data.loader import make_input
from deepfm.layout import TableLayout
from deepfm.model import BiInteraction, DeepFM
from deepfm.model import paths
from deepfm.model.dnn import DNN, Dropout

PRECISIONS = [pytest.param(False, id="fp32"), pytest.param(True, id="bf16")]
needs_kernels = pytest.mark.skipif(native.load() is None, reason="no C compiler: the native kernels are not built")


def _model(multi: bool) -> tuple[DeepFM, tuple[torch.Tensor, ...]]:
    """A DeepFM over two categorical fields, a numeric one (with a missing value) and, with ``multi``, two
    pooled multi-valued fields; and a batch of 6 rows."""
    combiners = ("sqrtn", "mean") if multi else ()
    layout = TableLayout(
        num_rows=21, cat_fields=("c0", "c1"), cat_offsets=(0, 6), num_fields=("n0",), num_offsets=(11,),
        multi_fields=tuple(f"m{i}" for i in range(len(combiners))),
        multi_offsets=(0,) + (13,) * (len(combiners) - 1), multi_combiners=combiners,
        vocab_blocks={"a": (0, 6), "b": (6, 5), "t": (13, 8)})
    torch.manual_seed(5)
    model = DeepFM(layout, ModelConfig(embed_dim=4, hidden_units=[8], init_std=0.5))
    with torch.no_grad():
        model.embedding.weight[:, 4].copy_(torch.linspace(-1, 1, 21))
    rng = np.random.default_rng(7)
    inp = make_input(np.stack([rng.integers(0, 6, 6), rng.integers(0, 5, 6)], 1),
                     np.array([[0.5], [np.nan], [2.0], [-1.5], [0.0], [3.0]], np.float32),
                     [(rng.integers(0, 6, 9), rng.uniform(0.2, 2, 9).astype(np.float32), np.array([3, 0, 1, 2, 2, 1]))
                      for _ in combiners])
    return model, inp.tensors()


def _run(model: torch.nn.Module, args: tuple[torch.Tensor, ...], bf16: bool, *, grad: bool
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and (with ``grad``) every parameter's gradient of a row-weighted sum of them."""
    model.zero_grad()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(*args)
    if not grad:
        return out.detach(), {}
    (out.float() * torch.linspace(-1, 2, out.shape[0])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tolerance(bf16: bool) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if bf16 else {"rtol": 1e-6, "atol": 1e-6}


@pytest.mark.parametrize("bf16", PRECISIONS)
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels, id="native"),
                                     pytest.param(False, id="torch-ops")])
def test_fused_head_equals_the_plain_graph(bf16, multi, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(native, "load", lambda: None)
    model, args = _model(multi)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert paths.head_path(model, args[1], with_penalty=True) is paths.Head.FUSED
    fused, fused_grads = _run(model, args, bf16, grad=True)
    with paths.plain_graph():
        assert paths.head_path(model, args[1]) is paths.Head.PLAIN
        plain, plain_grads = _run(model, args, bf16, grad=True)
    torch.testing.assert_close(fused, plain, **_tolerance(bf16))
    assert fused_grads.keys() == plain_grads.keys() and "embedding.weight" in fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **_tolerance(bf16), msg=name)


@needs_kernels
@pytest.mark.parametrize("bf16", PRECISIONS)
def test_table_direct_scoring_equals_the_plain_graph(bf16):
    model, args = _model(multi=False)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert paths.head_path(model, args[1]) is paths.Head.TABLE
        assert paths.head_path(model, args[1], sharded=True) is paths.Head.FUSED  # rows from other ranks
    scored, _ = _run(model, args, bf16, grad=False)
    with paths.plain_graph():
        plain, _ = _run(model, args, bf16, grad=False)
    torch.testing.assert_close(scored, plain, **_tolerance(bf16))
    multi, multi_args = _model(multi=True)
    with torch.no_grad():
        assert paths.head_path(multi.eval(), multi_args[1]) is paths.Head.FUSED  # pooled fields need the rows


def test_the_project_head_and_a_switched_off_part_take_the_plain_graph():
    model, args = _model(multi=False)
    model.cfg = model.cfg.model_copy(update={"head": "project"})
    assert paths.head_path(model, args[1]) is paths.Head.PLAIN
    model, _ = _model(multi=False)
    model.fuse = False
    assert paths.head_path(model, args[1]) is paths.Head.PLAIN


@pytest.mark.skipif(not paths._HAS_LINEAR_POINTWISE, reason="this torch build has no oneDNN linear_pointwise")
def test_onednn_bf16_layers_equal_the_modules():
    """bf16 only: this path exists only under bf16 autocast (float32 training keeps the modules)."""
    torch.manual_seed(0)
    dnn = DNN(24, [16, 8])
    x = torch.randn(64, 24)
    results = []
    for plain in (False, True):
        dnn.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), (paths.plain_graph() if plain else nullcontext()):
            assert paths.layers_path(xi) is (paths.Layers.MODULES if plain else paths.Layers.ONEDNN_BF16)
            out = dnn(xi)
        (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((out.detach().float(), xi.grad, [p.grad.clone() for p in dnn.parameters()]))
    (o1, gx1, g1), (o2, gx2, g2) = results
    torch.testing.assert_close(o1, o2, **_tolerance(True))
    torch.testing.assert_close(gx1, gx2, **_tolerance(True))
    for a, b in zip(g1, g2, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, **_tolerance(True))


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels, id="native"),
                                     pytest.param(False, id="torch-ops")])
def test_float32_scoring_layers_equal_the_modules(kernels, monkeypatch):
    """float32 only, no gradient: the scoring pass's GEMM then bias + ReLU."""
    if not kernels:
        monkeypatch.setattr(native, "load", lambda: None)
    torch.manual_seed(0)
    dnn = DNN(24, [16, 8]).eval()
    x = torch.randn(200, 24)
    with torch.no_grad():
        assert paths.layers_path(x) is paths.Layers.FLOAT32_SCORING
        assert paths.bias_relu_kernel(x, dnn.net[0].weight, dnn.net[0].bias) is kernels
        scored = dnn(x)
        with paths.plain_graph():
            plain = dnn(x)
    torch.testing.assert_close(scored, plain, **_tolerance(False))
    assert paths.layers_path(x.requires_grad_(True)) is paths.Layers.MODULES  # a float32 training pass


@pytest.mark.parametrize("bf16", PRECISIONS)
@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels, id="native"),
                                     pytest.param(False, id="torch-bits")])
def test_dropout_paths_apply_their_mask_as_nn_dropout_would(bf16, kernels, monkeypatch):
    """Masks are random, so the comparison is with the plain graph's formula for the mask each path drew:
    ``x * keep / (1 - p)`` forward, ``grad * keep / (1 - p)`` backward, about ``1 - p`` of the elements kept."""
    if not kernels:
        monkeypatch.setattr(native, "load", lambda: None)
    dtype = torch.bfloat16 if bf16 else torch.float32
    p = 0.3
    layer = Dropout(p).train()
    x = (torch.rand(256, 64) + 0.5).to(dtype).requires_grad_(True)
    assert paths.dropout_path(x, True, p) is (paths.Drop.NATIVE if kernels else paths.Drop.TORCH_BITS)
    out = layer(x)
    keep = out.detach() != 0
    scale = 65536 / (65536 - round(p * 65536))
    torch.testing.assert_close(out.detach(), (x.detach().float() * keep * scale).to(dtype))
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, (g.float() * keep * scale).to(dtype))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    with paths.plain_graph():
        assert paths.dropout_path(x, True, p) is paths.Drop.TORCH
    assert paths.dropout_path(x, False, p) is paths.Drop.TORCH and torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("bf16", PRECISIONS)
def test_fm_function_equals_the_plain_operations(bf16):
    """Under bf16 autocast as the model runs it: the FM term sees the float32 rows (autocast casts no sums)."""
    torch.manual_seed(0)
    fields = torch.randn(8, 5, 4)
    results = []
    for plain in (False, True):
        f = fields.clone().requires_grad_(True)
        with paths.plain_graph() if plain else nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                             enabled=bf16):
            assert paths.fm_function(f) is not plain
            bi = BiInteraction()(f)
        (bi.float() * torch.linspace(-1, 1, 4)).sum().backward()
        results.append((bi.detach(), f.grad))
    (b1, g1), (b2, g2) = results
    torch.testing.assert_close(b1, b2, **_tolerance(bf16))
    torch.testing.assert_close(g1, g2, **_tolerance(bf16))
