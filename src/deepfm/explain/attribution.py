"""Per-row attributions: a row's logit split into the global bias and one share per field.

DeepFM's logit is ``bias + linear + fm + dnn``. The first three decompose exactly by field:

- **linear**: each field's first-order term ``x_f w_f`` (a multi-valued field's pooled, combiner-weighted sum);
- **fm**: the term of a pair of fields ``<e_i, e_j>`` (over the vectors actually used: numeric values scaled,
  multi-valued tags pooled with their weights) goes half to each of the two fields; the pairs of tags *within*
  one multi-valued field go wholly to that field; the sum over fields is the FM term exactly;
- **dnn**: the deep part is not additive, so it is attributed by DeepLIFT (Shrikumar et al., 2017; Captum's
  ``DeepLift``, rescale rule) over the field vectors ``[B, F, D]`` that the DNN reads. The **baseline** is every
  field vector zero: a row the DNN knows nothing about. DeepLIFT's attributions sum exactly (summation to
  delta) to ``dnn(x) - dnn(baseline)``; the constant ``dnn(baseline)`` goes into ``attr_bias``.

So ``attr_bias = bias + logit_shift + dnn(0)`` (the same for every row of a model) and ``attr_bias + sum_f
attr_f`` is the model's logit. The pass runs the model's own modules (``FieldEmbedding.lookup``, the DNN's layers)
as a plain float32 graph: no fused kernels, no autocast. A model trained in bf16 is explained in float32, the
precision ``deepfm predict`` scores in; the sum matches that logit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepfm.data.batch import ModelInput
from deepfm.model import DeepFM

BASELINE = "zero field vectors"  # the DNN attribution's reference input (documented above)


@dataclass
class FieldTerms:
    """The exactly decomposable parts of a batch, per field (``F`` in ``layout.field_order``).

    All float64 (the looked-up float32 values, summed in float64).
    fields   [B, F, D]  the field vectors the FM and the DNN read
    linear   [B, F]     each field's first-order term (head weights applied)
    fm       [B, F]     each field's share of the FM term (half of each pair, all of its own tags' pairs)
    within   [B, F]     the pairs of tags inside a multi-valued field (0 for single-valued fields)
    fm_weight [D]       the FM's per-dimension weight (ones for the paper's head, the projection otherwise)
    """

    fields: torch.Tensor
    linear: torch.Tensor
    fm: torch.Tensor
    within: torch.Tensor
    fm_weight: torch.Tensor

    def pair_terms(self) -> torch.Tensor:
        """``[B, F, F]``: off the diagonal the FM term of each pair of fields, on it the within-field term."""
        weighted = self.fields * self.fm_weight
        pairs = torch.einsum("bid,bjd->bij", weighted, self.fields)
        eye = torch.eye(pairs.shape[1], dtype=torch.bool, device=pairs.device)
        return torch.where(eye, torch.diag_embed(self.within), pairs)


def _multi_only(inp: ModelInput, field: int) -> ModelInput:
    """The batch with the tags of one multi-valued field only (the others' bags empty)."""
    b = len(inp)
    keep = torch.div(inp.multi_bags, b, rounding_mode="floor") == field
    return ModelInput(inp.cat_ids, inp.num_values, inp.multi_ids[keep], inp.multi_weights[keep],
                      inp.multi_bags[keep])


def field_terms(model: DeepFM, inp: ModelInput) -> FieldTerms:
    """The linear and FM parts of ``inp``'s logits, per field; see the module's docstring. No gradient."""
    emb, cfg = model.embedding, model.cfg
    d = cfg.embed_dim
    with torch.no_grad():
        rows, _, _ = emb.lookup(*inp.tensors())
        # the sums in float64: the per-field split of the FM is then exact to ~1e-12, whatever the cancellation
        rows = rows.double()
        fields, linear = rows[..., :d], rows[..., d]
        if model.linear_proj is not None:
            linear = linear * model.linear_proj.weight[0].double()
        if not cfg.use_linear:
            linear = torch.zeros_like(linear)
        fm_weight = (model.fm_proj.weight[0].double() if model.fm_proj is not None
                     else torch.ones(d, dtype=fields.dtype, device=fields.device))
        within = torch.zeros_like(linear)
        first_multi = emb.num_offsets.numel() + emb.cat_offsets.numel()
        for m in range(emb.num_multi):
            # the square excess of this field alone: its tags' own squares minus its pooled vector's square
            _, excess, _ = emb.lookup(*_multi_only(inp, m).tensors())
            within[:, first_multi + m] = -0.5 * (excess.double() * fm_weight).sum(-1)
        total = fields.sum(dim=1, keepdim=True)
        # half of <e_f, sum_{g != f} e_g>, weighted per dimension
        fm = 0.5 * ((total - fields) * fields * fm_weight).sum(-1) + within
        if not cfg.use_fm:
            fm, within = torch.zeros_like(fm), torch.zeros_like(within)
    return FieldTerms(fields, linear, fm, within, fm_weight)


class _DeepPart(nn.Module):
    """The DNN's layers as a plain graph over ``[B, F, D]`` field vectors -> ``[B]``: the same Linear and
    BatchNorm modules (shared, not copied), ReLUs not in place (DeepLIFT's hooks read their inputs), dropout left
    out (identity in eval)."""

    def __init__(self, dnn: nn.Module) -> None:
        super().__init__()
        layers = [nn.ReLU() if isinstance(m, nn.ReLU) else m for m in dnn.net if not isinstance(m, nn.Dropout)]
        self.net = nn.Sequential(*layers)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        return self.net(fields.flatten(1)).squeeze(-1).float()


@dataclass
class Attribution:
    """Per-row attributions (numpy, float64 on the host) of ``B`` rows over ``F`` fields."""

    fields: tuple[str, ...]
    bias: float            # bias + logit_shift + dnn(baseline): the same for every row
    linear: np.ndarray     # [B, F]
    fm: np.ndarray         # [B, F]
    dnn: np.ndarray        # [B, F]

    @property
    def per_field(self) -> np.ndarray:
        """``[B, F]``: each field's whole share (linear + FM + DNN)."""
        return self.linear + self.fm + self.dnn

    @property
    def logit(self) -> np.ndarray:
        """``[B]``: the sum of the attributions, which is the model's logit."""
        return self.bias + self.per_field.sum(axis=1)


def _dnn_attribution(model: DeepFM, fields: torch.Tensor) -> tuple[torch.Tensor, float]:
    """DeepLIFT over the field vectors (Captum): per-field attributions ``[B, F]`` and ``dnn(baseline)``."""
    from captum.attr import DeepLift

    deep = _DeepPart(model.dnn).eval()
    fields = fields.float()  # the DNN's own precision
    baseline = torch.zeros_like(fields[:1])
    with torch.no_grad():
        at_baseline = float(deep(baseline)[0])
    if fields.shape[0] == 0:
        return fields.new_zeros(0, fields.shape[1]), at_baseline
    with torch.enable_grad(), warnings.catch_warnings():
        # Captum says it sets hooks on the activations for the call (and removes them): expected here
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
        inputs = fields.detach().clone().requires_grad_(True)
        attr = DeepLift(deep).attribute(inputs, baselines=baseline.expand_as(inputs))
    return attr.detach().sum(-1), at_baseline


def attribute(model: DeepFM, inp: ModelInput, field_names: tuple[str, ...]) -> Attribution:
    """The attributions of every row of ``inp`` (one batch, moved to the model's device); ``field_names``: the
    layout's ``field_order``. See the module docstring."""
    model.eval()
    device = model.bias.device
    inp = inp.to(device)
    terms = field_terms(model, inp)
    bias = float(model.bias.detach().float()[0]) + model.logit_shift
    dnn = torch.zeros_like(terms.linear)
    if model.dnn is not None:
        dnn, at_baseline = _dnn_attribution(model, terms.fields)
        bias += at_baseline

    def host(t: torch.Tensor) -> np.ndarray:
        return t.double().cpu().numpy()

    return Attribution(tuple(field_names), bias, host(terms.linear), host(terms.fm), host(dnn))
