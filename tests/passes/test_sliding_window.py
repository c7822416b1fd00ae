"""Sliding-window attention keeps its meaning on kept tokens: the window is measured in original
positions, because the full-length 4-D mask is gathered along both token axes (a dense run on the
kept subsequence would measure it in kept tokens instead; the oracle here uses explicit masks)."""

from __future__ import annotations

import pytest
import transformers as tf

import regate_fx
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import TinyModel, _causal

WINDOW = 4
SLIDING = [
    TinyModel("mistral", _causal(tf.MistralConfig, tf.MistralForCausalLM, num_key_value_heads=2,
                                 sliding_window=WINDOW)),
    TinyModel("qwen2", _causal(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2,
                               use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    # Alternating sliding / full layers: each gets its own gathered mask.
    TinyModel("gemma2", _causal(tf.Gemma2Config, tf.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=8,
                                sliding_window=WINDOW), attns=("eager",)),
]


# Left padding shifts every position (the hard case): every family in sdpa, and Gemma2 (eager
# only). CI time: the other eager cases and right padding in eager attention under the slow mark.
@pytest.mark.parametrize("tm,attn,pad", [
    pytest.param(m, a, pad, marks=[pytest.mark.slow] if a == "eager" and (pad == "right" or "sdpa" in m.attns) else [])
    for pad in ("left", "right") for m in SLIDING for a in m.attns],
    ids=lambda p: getattr(p, "name", p))
def test_sliding_window_is_measured_in_original_positions(tm, attn, pad):
    model = tm(attn)
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 3, 16, pad=pad, seed=2)
    keep = random_keep(batch, 0.5, seed=4)
    check_against_oracle(smodel, model, batch, keep, window=WINDOW)
    assert smodel.regate_report.refused == []
    assert smodel.regate_report.sparse_graph.causal_masks == 0  # a window is not plain causal


def test_window_oracle_differs_from_the_naive_one():
    """Guards the test above: with a window smaller than the gaps, the two oracles disagree."""
    import torch

    from tests.helpers import oracle

    tm = SLIDING[0]
    model = tm("sdpa")
    batch = make_batch(tm, 1, 16, seed=2)
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, ::3] = True
    windowed, _ = oracle(model, batch, keep, window=WINDOW)
    naive, _ = oracle(model, batch, keep)
    assert (windowed[0] - naive[0]).abs().max() > 1e-3
