"""Issue 6's graph shapes: each runs exact against the oracle or is refused with a reason.

Before the coverage invariant each of these passed `strict=True` silently and differed from the
oracle by 2e-3 to 2. The oracle here is the model itself on each kept subsequence (no pass code).
"""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import Reason, RewriteError, SparsifyConfig
from tests.helpers import assert_close
from tests.toy import ToyLM


def _batch(b=2, t=10, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    if pad:
        am[0, t - 3:] = 0  # right padding on the first sample
    keep = (torch.rand(b, t, generator=g) < 0.6) & am.bool()
    keep[:, 0] = True
    return ids, am, keep


def _refused(smodel, ids, am, keep) -> list:
    with pytest.raises(RewriteError) as err:
        smodel(input_ids=ids, attention_mask=am, keep_mask=keep)
    g = err.value.report.sparse_graph
    return [b.reason for b in g.refused] + [o.reason for o in g.outside]


@pytest.mark.parametrize("mix", ["max", "absmax"])
def test_max_over_tokens_is_refused(mix):
    """`max` has a pointwise overload (max(x, y)); the overload called here is a reduction."""
    model = ToyLM([None, mix]).eval()
    ids, am, keep = _batch()
    reasons = _refused(regate_fx.sparsify(model, backend="eager"), ids, am, keep)
    assert reasons == [Reason.TOKEN_MIXING]


def test_elementwise_max_of_two_tensors_is_token_wise():
    from regate_fx.passes import rules
    from regate_fx.passes.ops import RULES

    assert RULES["max"] is rules.reduce  # ...but torch.max(a, b) binds max.other, which is pointwise
    model = ToyLM([None, None]).eval()

    class Clamp(torch.nn.Module):  # a user model: logits clamped from below by a learned floor
        def __init__(self):
            super().__init__()
            self.inner, self.floor = model, torch.nn.Parameter(torch.full((64,), -0.1))

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            out = self.inner(input_ids, attention_mask)
            out.logits = torch.max(out.logits, self.floor.expand_as(out.logits))
            return out

    ids, am, keep = _batch()
    out = regate_fx.sparsify(Clamp(), backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)
    for b in range(2):
        pos = keep[b].nonzero().flatten()
        ref = torch.max(model(ids[b:b + 1, pos]).logits[0], torch.tensor(-0.1))
        assert_close(out.logits[b, pos], ref, f"sample {b}")


def test_integer_mixing_of_hidden_states_is_content_not_structure():
    """Integer token-indexed values are exempt as structure (masks, positions) only when no
    floating-point hidden state feeds them: a cumsum of `h > 0` before the first add is refused."""
    model = ToyLM([None, None], stem="gate_count").eval()
    ids, am, keep = _batch()
    with pytest.raises(RewriteError, match="cumsum"):
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)


def test_token_mixing_stem_before_the_first_add_is_refused():
    model = ToyLM([None, None], stem="conv").eval()
    ids, am, keep = _batch()
    with pytest.raises(RewriteError, match="conv1d") as err:
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)
    outside = err.value.report.outside
    assert outside[0].module == "stem" and {o.reason for o in outside} == {Reason.TOKEN_MIXING}


def test_reshape_that_moves_tokens_is_refused():
    model = ToyLM([None, "flip"]).eval()
    ids, am, keep = _batch()
    reasons = _refused(regate_fx.sparsify(model, backend="eager"), ids, am, keep)
    assert reasons and set(reasons) == {Reason.TOKEN_MIXING}  # the unflatten, the flip, the flatten


@pytest.mark.parametrize("mask", [None, "causal_padding"])
def test_sigmoid_attention_is_exact(mask):
    """No softmax: the kept layout's padding slots are zeroed where the weights meet the values."""
    model = ToyLM([None, None], attn="sigmoid", mask=mask).eval()
    ids, am, keep = _batch(b=3, pad=mask is not None)
    keep[1, 5:] = False  # samples keep different counts: the layout has padding slots
    smodel = regate_fx.sparsify(model, backend="eager")
    out = smodel(input_ids=ids, attention_mask=am, keep_mask=keep)
    assert smodel.regate_report.num_rewritten == 4
    for b in range(3):
        pos = keep[b].nonzero().flatten()
        ref = model(ids[b:b + 1, pos], torch.ones(1, len(pos), dtype=torch.long)).logits[0]
        assert_close(out.logits[b, pos], ref, f"sample {b}", atol=1e-5, rtol=0)


def test_non_strict_reports_outside_mixing_and_warns():
    model = ToyLM([None, None], stem="conv").eval()
    ids, am, keep = _batch()
    smodel = regate_fx.sparsify(model, SparsifyConfig(strict=False), backend="eager")
    with pytest.warns(UserWarning, match="not be exact"):
        smodel(input_ids=ids, attention_mask=am, keep_mask=keep)
    assert "REFUSED" in str(smodel.regate_report)


def test_fullgraph_false_is_refused_with_the_reason():
    """fullgraph=False could never run sparse (no captured piece sees inputs and layout)."""
    with pytest.raises(ValueError, match="graph break"):
        SparsifyConfig(fullgraph=False)
