"""Hypothesis properties of the rewrite over shapes, masks and padding: the oracle for any keep
mask, and the unsparsified model when every real position is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regate_fx
from tests.helpers import (IMAGE_TOKENS, assert_close, assert_grads_close, check_against_oracle, grads,
                           make_batch, sparse_logits)
from tests.models import BY_NAME

# One pre-norm family in each attention form, a parallel-residual family and the MLLM.
CASES = [("llama", "sdpa"), ("qwen2", "eager"), ("gpt_neox", "sdpa"), ("llava", "sdpa")]
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    name, attn = request.param
    tm = BY_NAME[name]
    model = tm(attn)
    # return_logits=True: one graph per call shape (see test_families.pair)
    return tm, model, regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")


@st.composite
def batches(draw, multimodal: bool):
    """A padded batch (B in 1-4, T in 4-20, left/right/no padding) and a keep mask over it."""
    low = IMAGE_TOKENS + 1 if multimodal else 2
    b = draw(st.integers(1, 4))
    t = draw(st.integers(max(4, low), 20))
    pad = draw(st.sampled_from(["none", "left", "right"]))
    lengths = [draw(st.integers(low, t)) for _ in range(b)] if pad != "none" else None
    seed = draw(st.integers(0, 2**16))
    bits = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return b, t, pad, lengths, seed, torch.tensor(bits).view(b, t)


def _batch_and_keep(tm, drawn, keep_all: bool = False):
    b, t, pad, lengths, seed, bits = drawn
    batch = make_batch(tm, b, t, pad=pad, lengths=lengths, seed=seed)
    real = batch["attention_mask"].bool()
    keep = real.clone() if keep_all else bits & real
    first = real.float().argmax(1)  # every sample keeps at least one position
    keep[torch.arange(b), first] = True
    return batch, keep


@given(data=st.data())
@SETTINGS
def test_any_keep_mask_matches_oracle(case, data):
    tm, model, smodel = case
    batch, keep = _batch_and_keep(tm, data.draw(batches(tm.multimodal)))
    check_against_oracle(smodel, model, batch, keep)


@given(data=st.data())
@SETTINGS
def test_keeping_every_real_position_is_the_unsparsified_model(case, data):
    tm, model, smodel = case
    batch, keep = _batch_and_keep(tm, data.draw(batches(tm.multimodal)), keep_all=True)
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    logits = sparse_logits(smodel, batch, keep, out)  # default config: from a call without labels
    dense = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).masked_fill(~keep, -100)
    loss = F.cross_entropy(dense.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    loss.backward()
    assert_close(logits[keep].detach(), dense[keep].detach(), "logits at real positions")
    assert_close(out.loss.detach(), loss.detach(), "loss")
    assert_grads_close(g_sparse, grads(model))
    model.zero_grad(set_to_none=True)
