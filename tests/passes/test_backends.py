"""The rewritten graph through the real compilers: aot_autograd (aot_eager) and inductor.

The eager backend runs the rewritten FX graph as Python; these check that what the pass emits is
also traceable by aot_autograd (the backward is derived from the rewritten graph) and compiles
with inductor, with varying kept lengths and no recompilation.
"""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

import regate_fx
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME


def _run_two_masks(name: str, attn: str, backend: str, config: regate_fx.SparsifyConfig | None = None) -> None:
    tm = BY_NAME[name]
    model = tm(attn)
    smodel = regate_fx.sparsify(model, config, backend=backend)
    batch = make_batch(tm, 3, 16, pad="left", seed=2)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=1))
    graphs = counters["stats"]["unique_graphs"]
    # A different kept length K, sequence length and padding side: no new graph. (The batch size
    # stays: LLaVA's own forward specialises on the number of images, `list(image_features)`.)
    batch = make_batch(tm, 3, 13, pad="right", seed=3)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.3, seed=2))
    assert counters["stats"]["unique_graphs"] == graphs
    assert smodel.regate_report.refused == []


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("phi", "eager"), ("llava", "sdpa")])
def test_aot_eager_matches_oracle(name, attn):
    _run_two_masks(name, attn, "aot_eager")


@pytest.mark.inductor
@pytest.mark.parametrize("name,attn", [("llama", "sdpa"),  # one representative inductor run in CI
                                       pytest.param("gpt_neox", "eager", marks=pytest.mark.slow)])
def test_inductor_matches_oracle(name, attn):
    # return_logits=True: one inductor compile (logits with the loss) instead of two (loss-only
    # step, then a call without labels for the logits)
    _run_two_masks(name, attn, "inductor", regate_fx.SparsifyConfig(return_logits=True))
