"""A graph the packed layout refuses: the refusal is a value (`Layout.problem`), counted once under
`<layout>_refused`; the refused capture is neither reported nor counted as a graph, the fallback's is."""

from __future__ import annotations

import regate_fx
from regate_fx.passes.backend import counters
from tests.helpers import make_batch, random_keep
from tests.models import BY_NAME


def test_a_refused_layout_is_counted_once_and_its_graph_not_at_all():
    tm = BY_NAME["llama"]
    smodel = regate_fx.sparsify(tm("eager"), regate_fx.SparsifyConfig(layout="auto", progress=False), backend="eager")
    batch = make_batch(tm, 3, 16, pad="right", seed=5)
    keep = random_keep(batch, 0.4, seed=5)
    before = {k: counters[k] for k in ("graphs", "sparse_graphs", "packed_refused")}
    smodel(**batch, keep_mask=keep)
    after = {k: counters[k] for k in before}
    report = smodel.regate_report
    assert "is not SDPA" in report.packed_refused and report.sparse_graph.layout == "padded"
    assert [g.layout for g in report.graphs if g.sparse] == ["padded"]  # the refused capture is not reported
    assert after["packed_refused"] - before["packed_refused"] == 1
    assert after["graphs"] - before["graphs"] == 1  # the padded graph only
    assert after["sparse_graphs"] - before["sparse_graphs"] == 1
