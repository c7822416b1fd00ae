"""A call with keep_mask runs its rewritten graph or raises (issue 19): the step counts the calls of
the graphs the backend rewrote and refuses a call that ran none. DDP's bucket split of the captured
step, which made models above 1 MiB run dense in silence, is driven here in one process through
dynamo's real DDP optimizer (the 2-rank run is tests/test_distributed.py)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import regate_fx
from regate_fx import RewriteError, SparsifyConfig
from tests.helpers import LOSS_ATOL, assert_close, assert_grads_close, grads, make_batch, random_keep
from tests.models import BY_NAME, LLAMA_ABOVE_FIRST_BUCKET

LLAMA = BY_NAME["llama"]
BIG = LLAMA_ABOVE_FIRST_BUCKET


@contextlib.contextmanager
def inside_ddp_forward(monkeypatch):
    """What DDP's forward sets around the module's call (``_inside_ddp_forward``), with DDP's default
    bucket size: dynamo's DDP optimizer then splits any graph it captures at 1 MiB of parameters."""
    with monkeypatch.context() as m:
        m.setattr(DistributedDataParallel, "_active_ddp_module", types.SimpleNamespace(bucket_bytes_cap=25 * 2**20))
        yield


def exact(smodel, model, batch, keep) -> None:
    """One sparse step with labels: loss and every gradient equal the oracle's."""
    model.zero_grad(set_to_none=True)
    got = smodel(**batch, keep_mask=keep).loss
    got.backward()
    got_grads = grads(model)
    model.zero_grad(set_to_none=True)
    _, want = regate_fx.oracle(model, batch, keep)
    want.backward()
    assert_close(got.detach(), want.detach(), "loss", atol=LOSS_ATOL, rtol=0)
    assert_grads_close(got_grads, grads(model))
    model.zero_grad(set_to_none=True)


def test_inside_a_ddp_forward_a_model_above_the_first_bucket_runs_one_sparse_graph(monkeypatch):
    model = BIG("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    fwd = regate_fx.sparse_forward(smodel)
    batch = make_batch(BIG, 2, 12, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    with monkeypatch.context() as m:
        # The fix undone: dynamo's DDP optimizer splits the step into pieces the backend passes through.
        m.setattr(regate_fx.compat, "one_graph_under_ddp", lambda: False)
        with inside_ddp_forward(m), pytest.raises(RewriteError, match="ran without its sparse graph") as e:
            smodel(**batch, keep_mask=keep)
    assert "pieces of a graph split" in str(e.value) and "captures it again" in str(e.value)
    pieces = list(model.regate_report.graphs)
    assert len(pieces) >= 2 and not any(g.sparse for g in pieces) and fwd._runs.count == 0
    with inside_ddp_forward(monkeypatch):  # the split graphs were dropped: captured again, as one graph
        exact(smodel, model, batch, keep)
    exact(smodel, model, batch, random_keep(batch, 0.5, seed=3))  # outside DDP: the same graph
    assert [g.sparse for g in model.regate_report.graphs[len(pieces):]] == [True]


def test_a_step_run_eagerly_raises():
    model = LLAMA("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(LLAMA, 2, 10, seed=4)
    keep = random_keep(batch, 0.5, seed=5)
    with torch.compiler.set_stance("force_eager"), \
            pytest.raises(RewriteError, match="ran without its sparse graph.*dynamo ran the step's Python code"):
        smodel(**batch, keep_mask=keep)
    exact(smodel, model, batch, keep)


@pytest.mark.parametrize("backend,layout", [("eager", "packed"), ("aot_eager", "padded")])
def test_every_sparse_call_runs_one_rewritten_graph(backend, layout):
    # aot_eager with dynamic=None: a static first graph, then a symbolic one for new sizes.
    model = LLAMA("sdpa").train()
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout=layout, progress=False), backend=backend)
    fwd = regate_fx.sparse_forward(smodel)
    for i, seq in enumerate((10, 12, 9)):
        batch = make_batch(LLAMA, 3, seq, pad="left", seed=i)
        smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=i)).loss.backward()
        assert fwd._runs.count == i + 1
    graphs = model.regate_report.graphs
    assert all(g.sparse for g in graphs) and {g.layout for g in graphs} == {layout}
    assert len(graphs) == (2 if backend == "aot_eager" else 1)
