"""Every family in the model table, in sdpa and eager attention, against the unsparsified model
(keep all) and against the oracle (random keep masks, left/right padding, batch sizes 1-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regate_fx
from tests.helpers import (assert_close, assert_grads_close, check_against_oracle, grads, make_batch,
                           random_keep, sparse_logits)
from tests.models import EXTRA_MODELS, MODELS


PAIRS = [(m, a) for m in MODELS for a in m.attns]


def _id(p) -> str:
    return f"{p[0].name}-{p[1]}"


# Families whose every padding / batch-size case runs in the default run: each brings its own
# position scheme or block layout (RoPE, learned positions, parallel residual, ALiBi, partial
# rotary, encoder-style decoder, LLaVA's merge). The others run the first case and keep-all.
DISTINCT = {"llama", "llava", "gpt_neox", "opt", "falcon", "phi", "bert_decoder", "openai_gpt"}


def _eager_twin(p) -> bool:
    """The eager variant of a family that also runs sdpa (its sdpa variant runs the whole matrix)."""
    return p[1] == "eager" and "sdpa" in p[0].attns


@pytest.fixture(scope="module", params=PAIRS, ids=_id)
def pair(request):
    tm, attn = request.param
    model = tm(attn)
    # return_logits=True: logits come with the loss, one graph per call shape. (The default config
    # needs a second graph for calls without labels, and LLaVA specialises on the batch size: 4
    # batch sizes x 2 graphs would reach dynamo's recompile limit. The default is tested below.)
    # layout="padded": this matrix pins the (B, K) layout; tests/passes/test_packed.py runs the
    # packed one on every family that allows it (the default "auto" picks per step).
    return tm, model, regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True, layout="padded"),
                                         backend="eager")


@pytest.mark.parametrize("pair", [pytest.param(p, id=_id(p), marks=[pytest.mark.slow] if _eager_twin(p) else [])
                                  for p in PAIRS], indirect=True)
def test_keep_all_reproduces_unsparsified_model(pair):
    tm, model, smodel = pair
    batch = make_batch(tm, 2, 12, seed=5, positions=False)
    keep = torch.ones(2, 12, dtype=torch.bool)
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    logits = sparse_logits(smodel, batch, keep, out)  # default config: from a call without labels
    dense = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(dense.logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    loss.backward()
    assert_close(logits.detach(), dense.logits.detach(), "logits", atol=1e-5, rtol=1e-5)
    assert_close(out.loss.detach(), loss.detach(), "loss", atol=1e-6, rtol=1e-6)
    assert_grads_close(g_sparse, grads(model), atol=1e-5, rtol=1e-5)
    model.zero_grad(set_to_none=True)
    assert smodel.regate_report.refused == [] and smodel.regate_report.outside == []
    # Every layer is accounted for: 2 branches per layer (attention, MLP), or 1 when parallel.
    cfg = getattr(model.config, "text_config", model.config)
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    assert len(smodel.regate_report.branches) in (2 * layers, layers)
    assert smodel.regate_report.num_rewritten == len(smodel.regate_report.branches)
    assert smodel.regate_report.sparse_graph.tail_on_kept


def _random_keep_cases():
    """Every pair x (left padding, batch 3), (right, 2), (no padding, batch 1), (left, 4; slow). An
    eager twin of an sdpa family, or a family outside DISTINCT, runs the first in the default run and
    the others under the slow mark (CI time): the padding and batch-size cases exercise the masks and
    the gather, which the variants share; the eager attention rewrite itself is exact in the first
    case (and keep-all of an eager twin is slow too)."""
    for p in PAIRS:
        for i, case in enumerate([("left", 3, 0.5), ("right", 2, 0.3), ("none", 1, 0.6), ("left", 4, 0.8)]):
            slow = i == 3 or (i > 0 and (_eager_twin(p) or p[0].name not in DISTINCT))
            yield pytest.param(p, *case, id=f"{_id(p)}-{'-'.join(map(str, case))}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("pair,pad,batch_size,rho", list(_random_keep_cases()), indirect=["pair"])
def test_random_keep_matches_oracle(pair, pad, batch_size, rho):
    tm, model, smodel = pair
    batch = make_batch(tm, batch_size, 14, pad=pad, seed=batch_size)
    check_against_oracle(smodel, model, batch, random_keep(batch, rho, seed=7))


@pytest.mark.parametrize("pair", [pytest.param(p, id=_id(p), marks=[pytest.mark.slow] if _eager_twin(p) else [])
                                  for p in PAIRS], indirect=True)
def test_model_itself_stays_dense(pair):
    tm, model, smodel = pair
    batch = make_batch(tm, 2, 10, seed=1, positions=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs, use_cache=False).logits
    smodel(**batch, keep_mask=random_keep(batch, 0.5))
    after = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(before, after)
    assert set(map(id, smodel.parameters())) == set(map(id, model.parameters()))


def _beyond_the_list_cases():
    """Every family x attention; eager attention of a family that also has sdpa under the slow mark
    (CI time): the eager-attention rewrite is covered by the required table's eager variants, and
    GPT-2 (its own eager attention) and Gemma2 (eager only) stay in."""
    for m in EXTRA_MODELS:
        for a in m.attns:
            slow = a == "eager" and "sdpa" in m.attns and m.name != "gpt2"
            yield pytest.param(m, a, marks=pytest.mark.slow) if slow else (m, a)


@pytest.mark.parametrize("tm,attn", list(_beyond_the_list_cases()), ids=lambda p: getattr(p, "name", p))
def test_families_beyond_the_list_match_oracle(tm, attn):
    """Families nobody wrote an adapter for: every branch rewritten, exact against the oracle."""
    model = tm(attn)
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 3, 14, pad="left", seed=3)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=7))
    assert smodel.regate_report.refused == []
