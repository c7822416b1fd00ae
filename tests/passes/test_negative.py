"""Graphs that must not be rewritten, and what the report and the errors say about them."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import KeepMaskError, Reason, RewriteError, SparsifyConfig
from regate_fx.report import BranchKind
from tests.helpers import assert_close
from tests.toy import NoStreamLM, ToyLM


def _batch(b=2, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    keep = torch.rand(b, t, generator=g) < 0.6
    keep[:, 0] = True
    return ids, keep


def test_token_wise_toy_is_rewritten_and_exact():
    model = ToyLM([None, None]).eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, keep = _batch()
    out = smodel(input_ids=ids, keep_mask=keep)
    for b in range(ids.size(0)):
        pos = keep[b].nonzero().flatten()
        ref = model(ids[b:b + 1, pos]).logits[0]
        assert_close(out.logits[b, pos], ref, f"sample {b}")
    kinds = [r.kind for r in smodel.regate_report.branches]
    assert kinds == [BranchKind.ATTENTION, BranchKind.MLP] * 2


@pytest.mark.parametrize("mix,needle", [("conv", "conv"), ("cumsum", "cumsum")])
def test_token_mixing_mlp_is_refused_with_reason(mix, needle):
    model = ToyLM([None, mix]).eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, keep = _batch()
    with pytest.raises(RewriteError) as err:
        smodel(input_ids=ids, keep_mask=keep)
    assert "layers.1.mlp" in str(err.value) and needle in str(err.value)
    refused = err.value.report.refused
    assert len(refused) == 1
    assert refused[0].reason is Reason.TOKEN_MIXING
    assert refused[0].index == 3 and needle in refused[0].detail
    assert "DENSE" in str(err.value.report)


def test_non_strict_keeps_refused_branch_dense_and_rest_sparse():
    model = ToyLM([None, "cumsum"]).eval()
    smodel = regate_fx.sparsify(model, SparsifyConfig(strict=False), backend="eager")
    ids, keep = _batch()
    with pytest.warns(UserWarning, match="stay dense"):
        out = smodel(input_ids=ids, keep_mask=keep)
    report = smodel.regate_report
    assert [b.rewritten for b in report.branches] == [True, True, True, False]
    assert report.sparse_graph.regions == [(0, 2)]
    # The dense cumsum branch sees every token, so kept logits differ from the oracle, but the
    # first three branches still ran on kept tokens: compare against a manual hybrid reference.
    with torch.no_grad():
        x = model.embed(ids)
        for b in range(ids.size(0)):
            pos = keep[b].nonzero().flatten()
            xs = x[b:b + 1, pos]
            l0 = model.layers[0]
            xs = l0(xs)
            xs = xs + model.layers[1].attn(model.layers[1].ln1(xs))
            full = x[b:b + 1].clone()
            full[:, pos] = xs
            full = full + model.layers[1].mlp(model.layers[1].ln2(full))
            ref = model.head(model.norm(full))[0, pos]
            assert_close(out.logits[b, pos].detach(), ref, f"sample {b}")


def test_keep_mask_on_model_without_stream_is_an_error():
    model = NoStreamLM()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, keep = _batch()
    with pytest.raises(KeepMaskError, match="no part of this model's graph could be rewritten") as err:
        smodel(input_ids=ids, keep_mask=keep)
    assert err.value.report.sparse_graph.reason is Reason.NO_STREAM
    # without a keep mask it is the model itself, called directly
    out = smodel(input_ids=ids)
    torch.testing.assert_close(out.logits, model(ids).logits)
    assert out.loss is None  # the model's own output


def test_returned_attention_weights_are_refused_as_escaping():
    from tests.models import BY_NAME
    from tests.helpers import make_batch, random_keep

    tm = BY_NAME["llama"]
    model = tm("eager")

    class WithAttn(torch.nn.Module):  # a user model that also returns the attention weights
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kw):
            out = self.inner(**kw, output_attentions=True)
            out.logits = out.logits + 0 * out.attentions[0].sum()
            return out

    smodel = regate_fx.sparsify(WithAttn(), SparsifyConfig(strict=False), backend="eager")
    batch = make_batch(tm, 2, 8)
    with pytest.warns(UserWarning, match="escaping_value"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))
    refused = smodel.regate_report.refused
    assert refused and all(b.kind is BranchKind.ATTENTION for b in refused)
    assert {b.reason for b in refused} == {Reason.ESCAPING_VALUE}
    assert "output_attentions" in refused[0].detail


# Mixture of experts used to be refused here (the sorted dispatch); it now runs on kept tokens:
# tests/passes/test_moe.py, with its own negatives (broken dispatches).
