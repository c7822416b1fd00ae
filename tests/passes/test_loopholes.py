"""Issue 18: no loophole in the token-flow proof. One small model per loophole kind (the probes of
`tests/fuzz/probes.py`, in the stem and in an MLP branch), strict=True, both layouts: refused with
the kind's `Reason`, or exact against the oracle. Batch-axis kinds (7) must be refused: no
per-sample result exists. Token-wise controls must be rewritten and exact.
"""

from __future__ import annotations

import pytest
import torch

from regate_fx import KeepMaskError, Reason, RewriteError
from tests.fuzz.arch import VOCAB, ArchSpec, FuzzLM, Mixer
from tests.fuzz.check import (BatchSpec, assert_pruned_ids_ignored, assert_same, make_batch, new_sparse, oracle,
                              reference_step)
from tests.fuzz.probes import CATEGORY, KINDS, expected

LOOPHOLES = [k for cat, ks in KINDS.items() if cat != "control" for k in ks]
# Uneven kept counts and left padding: the padded layout has padding slots, "auto" packs.
BATCH = BatchSpec(3, 10, "left", (10, 7, 9), positions=True, rho=0.5, seed=4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str, where: str) -> FuzzLM:
    return FuzzLM(ArchSpec(layers=2, heads=2, head_dim=8, kv_heads=2, probes=(Mixer(kind, where, 1),), seed=1))


def _reasons(err: Exception) -> set[Reason]:
    graph = err.report.sparse_graph
    return ({b.reason for b in graph.refused} | {o.reason for o in graph.outside}
            | ({graph.reason} if graph.reason else set()))


def run(kind: str, where: str, layout: str):
    """('refused', reasons) or ('exact', layout) for one probe; raises if neither."""
    model = _model(kind, where)
    batch, keep = make_batch(BATCH, VOCAB)
    smodel = new_sparse(model, layout)
    model.zero_grad(set_to_none=True)
    try:
        out = smodel(**batch, keep_mask=keep)
    except (RewriteError, KeepMaskError) as err:
        return "refused", _reasons(err)
    out.loss.backward()
    g = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    assert_pruned_ids_ignored(smodel, batch, keep, out, VOCAB)
    assert_same(out, keep, g, *reference_step(oracle, model, batch, keep))
    return "exact", smodel.regate_report.sparse_graph.layout


def _cases(kinds, layouts):
    """Every (kind, place, layout); the default run takes one place and layout per kind (alternating),
    `-m slow` the rest."""
    for i, kind in enumerate(kinds):
        for j, (where, layout) in enumerate((w, lay) for w in ("stem", "mlp") for lay in layouts):
            slow = j != i % (2 * len(layouts))
            yield pytest.param(kind, where, layout, id=f"{kind}-{where}-{layout}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("kind,where,layout", _cases(LOOPHOLES, ("padded", "auto")))  # auto packs these batches
def test_loophole_is_refused_or_exact(kind, where, layout):
    verdict, info = run(kind, where, layout)
    if verdict == "refused":
        assert info & expected(kind), f"{kind}: refused for {info}, expected {expected(kind)}"
    else:
        assert CATEGORY[kind] != "batch", f"{kind} couples samples: it must be refused"


@pytest.mark.parametrize("kind,where,layout", _cases(KINDS["control"], ("auto",)))
def test_token_wise_control_stays_exact(kind, where, layout):
    verdict, info = run(kind, where, layout)
    assert verdict == "exact", f"{kind} was refused: {info}"
