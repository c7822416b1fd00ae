"""Attention with sinks (issue 20, "attention sinks"): gpt-oss's eager attention joins a learned
per-head logit column to the scores along the keys, shifts by the row max, softmaxes and slices the
sink column off before the read-out (passes/sinks.py). It runs exact-sparse on the padded layout
(the padding-slot keys are masked in the scores before the join); the packed layout runs SDPA only
and refuses it with that reason ("auto" falls back to padded).

Negatives: hand-written attention in the graph shapes just outside the form (a joined column with
a token axis, the sink column's probability read, a slice that keeps the sink column, the row max
used for more than the shift) is refused with a reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import regate_fx
from regate_fx import Reason, RewriteError, SparsifyConfig
from regate_fx.report import BranchKind
from tests.helpers import assert_close, assert_grads_close, check_against_oracle, grads, make_batch, random_keep
from tests.models import COMMON, TinyModel
from tests.toy import ToyLM

WINDOW = 4  # gpt-oss alternates sliding-window and full layers


def _gpt_oss(attn: str) -> torch.nn.Module:
    cfg = tf.GptOssConfig(**{**COMMON, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4,
                             "num_experts_per_tok": 2, "sliding_window": WINDOW})
    cfg._attn_implementation = attn
    model = tf.GptOssForCausalLM(cfg)
    for name, p in model.named_parameters():
        if name.endswith("sinks"):  # sinks large enough to take a visible share of every row
            p.data.normal_(0.0, 1.0)
    return model


GPT_OSS = TinyModel("gpt_oss", _gpt_oss, attns=("eager",))


@pytest.mark.parametrize("pad", ["left", "right"])
def test_gpt_oss_matches_oracle(pad):
    model = GPT_OSS("eager")
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True, progress=False), backend="eager")
    batch = make_batch(GPT_OSS, 3, 12, pad=pad, seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    check_against_oracle(smodel, model, batch, keep, window=WINDOW)  # kept logits, loss, every gradient
    report = smodel.regate_report
    assert report.refused == [] and report.num_rewritten == len(report.branches) == 4
    attn = [b for b in report.branches if b.kind is BranchKind.ATTENTION]
    assert len(attn) == 2 and all(b.attention == "eager" for b in attn)


def test_gpt_oss_aot_eager_and_every_token_kept():
    """Through AOTAutograd (the static first graph, then the symbolic one), and at rho = 1."""
    model = GPT_OSS("eager")
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True, progress=False), backend="aot_eager")
    batch = make_batch(GPT_OSS, 3, 12, pad="left", seed=5)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.3, seed=5), window=WINDOW)
    batch = make_batch(GPT_OSS, 2, 16, pad="right", seed=6)
    check_against_oracle(smodel, model, batch, batch["attention_mask"].bool(), window=WINDOW)


def test_gpt_oss_sink_gradients_are_the_oracles():
    """The sinks' own gradients (a separate check: they reach the loss only through the join)."""
    model = GPT_OSS("eager")
    smodel = regate_fx.sparsify(model, SparsifyConfig(progress=False), backend="eager")
    batch = make_batch(GPT_OSS, 2, 12, pad="left", seed=3)
    keep = random_keep(batch, 0.4, seed=3)
    smodel(**batch, keep_mask=keep).loss.backward()
    sparse = {n: g for n, g in grads(model).items() if n.endswith("sinks")}
    model.zero_grad(set_to_none=True)
    _, ref_loss = regate_fx.oracle(model, batch, keep, window=WINDOW)
    ref_loss.backward()
    ref = {n: g for n, g in grads(model).items() if n.endswith("sinks")}
    assert len(ref) == 2 and all(float(g.abs().max()) > 1e-4 for g in ref.values())
    assert_grads_close(sparse, ref, atol=1e-5, rtol=1e-5)


def test_gpt_oss_packed_is_refused_with_the_reason():
    model = GPT_OSS("eager")
    batch = make_batch(GPT_OSS, 3, 12, pad="right", seed=4)
    keep = random_keep(batch, 0.5, seed=4)
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout="packed", progress=False), backend="eager")
    with pytest.raises(RewriteError, match="sink logits"):
        smodel(**batch, keep_mask=keep)
    # "auto": the packed layout's refusal is recorded, the step runs exact on the padded layout
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout="auto", return_logits=True, progress=False),
                                backend="eager")
    check_against_oracle(smodel, model, batch, keep, window=WINDOW)
    report = smodel.regate_report
    assert "joins sink logits" in report.packed_refused and report.sparse_graph.layout == "padded"


# --- the form by hand, and graphs just outside it ------------------------------------------------


def _toy_batch(b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    keep = torch.rand(b, t, generator=g) < 0.5
    keep[:, 0] = True
    return ids, keep


def test_hand_written_sink_attention_is_exact():
    """The gpt-oss form written out (tests/toy.py): kept logits and gradients equal each sample's
    dense run on its kept tokens (the toy has no positions, so that is the oracle)."""
    model = ToyLM([None, None], attn="sink").eval()
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True, progress=False), backend="eager")
    ids, keep = _toy_batch()
    model.zero_grad(set_to_none=True)
    out = smodel(input_ids=ids, keep_mask=keep)
    out.logits[keep].square().sum().backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    total = 0
    for b in range(ids.size(0)):
        pos = keep[b].nonzero().flatten()
        ref = model(ids[b:b + 1, pos]).logits[0]
        assert_close(out.logits[b, pos].detach(), ref.detach(), f"sample {b}", atol=1e-5, rtol=1e-5)
        total = total + ref.square().sum()
    total.backward()
    assert_grads_close(g_sparse, grads(model), atol=1e-5, rtol=1e-5)
    assert smodel.regate_report.refused == []


@pytest.mark.parametrize("form,needle", [
    ("sink_token_column", "cat along the token axis"),  # the joined column is computed from each query
    ("sink_unsliced", "cat along the token axis"),  # the sink column's probability is read too
    ("sink_keeps_column", "cat along the token axis"),  # the read-out keeps the sink column
    ("sink_max_reused", "cat along the token axis"),  # the row max is added to the output
])
def test_outside_the_sink_form_is_refused(form, needle):
    model = ToyLM([None, None], attn=form).eval()
    smodel = regate_fx.sparsify(model, SparsifyConfig(progress=False), backend="eager")
    ids, keep = _toy_batch()
    with pytest.raises(RewriteError) as err:
        smodel(input_ids=ids, keep_mask=keep)
    refused = err.value.report.refused
    assert [b.index for b in refused] == [0, 2]  # both attention branches, the MLPs stay sparse
    assert all(b.reason is Reason.TOKEN_MIXING and needle in b.detail for b in refused)
