"""The torch.compile backend: analyse -> rewrite -> hand the graph to the inner backend."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.fx as fx

from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.passes.analyse import Analysis, analyse
from regate_fx.passes.checkpoint import CheckpointError, carry_recompute_tags, inline_activation_checkpoints
from regate_fx.passes.graph import node_value
from regate_fx.passes.rewrite import KeptInputs, rewrite
from regate_fx.report import BranchRecord, GraphReport, RewriteReport

__all__ = ["PlaceholderRoles", "counters", "make_backend", "resolve_backend"]

# What fired, for tests and debugging (in the style of torch._dynamo.utils.counters).
counters: dict[str, int] = {"graphs": 0, "sparse_graphs": 0, "branches_rewritten": 0, "branches_refused": 0,
                             "checkpoints_inlined": 0}


class PlaceholderRoles:
    """Maps the tensors of the current call to their roles, so the backend can find them in the graph."""

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}

    def set(self, **tensors: torch.Tensor | None) -> None:
        self.by_id = {id(t): role for role, t in tensors.items() if t is not None}


def resolve_backend(backend: str | Callable) -> Callable:
    """The compiler that runs after the ReGATE pass: 'eager', 'aot_eager', 'inductor' or a callable."""
    if callable(backend):
        return backend
    if backend == "eager":
        return _eager
    return torch._dynamo.lookup_backend(backend)


def _eager(gm: fx.GraphModule, example_inputs):
    return gm.forward


def _find_roles(gm: fx.GraphModule, example_inputs, roles: PlaceholderRoles) -> dict[str, fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for n, t in zip(placeholders, example_inputs):
        role = roles.by_id.get(id(t))
        if role:
            found[role] = n
    return found


def _records(analysis: Analysis) -> list[BranchRecord]:
    return [
        BranchRecord(b.index, b.layer, b.module, b.kind, b.attention_form, b.ok, b.reason, b.detail, len(b.nodes))
        for b in analysis.branches
    ]


def make_backend(inner: Callable, report: RewriteReport, roles: PlaceholderRoles, *, strict: bool,
                 log: Callable[[GraphReport], None] | None = None) -> Callable:
    """Build the dynamo backend for one sparsified model."""

    def regate_backend(gm: fx.GraphModule, example_inputs):
        counters["graphs"] += 1
        found = _find_roles(gm, example_inputs, roles)
        name = f"graph_{len(report.graphs)}"
        if "gather_idx" not in found:  # a dense call (keep_mask=None): nothing to rewrite
            report.graphs.append(GraphReport(name, sparse=False))
            return inner(gm, example_inputs)
        counters["sparse_graphs"] += 1
        try:  # checkpointed layers: flatten into the graph, tagged for recompute in the backward
            checkpointed = inline_activation_checkpoints(gm)
        except CheckpointError as e:
            raise RewriteError(str(e), report=report) from None
        counters["checkpoints_inlined"] += checkpointed
        seq = found.get("seq")
        if seq is None or not isinstance(node_value(seq), torch.Tensor):
            raise KeepMaskError("regate_fx: could not find the model's input_ids / inputs_embeds in the graph")
        analysis = analyse(gm, seq, padding=found.get("attention_mask"))
        g = GraphReport(name, sparse=True, branches=_records(analysis), reason=analysis.reason,
                        detail=analysis.detail,
                        regions=[(r.first, r.last) for r in analysis.regions])
        report.graphs.append(g)
        refused = g.refused
        counters["branches_refused"] += len(refused)
        if not analysis.regions:
            why = f"{g.reason.value}: {g.detail}" if g.reason else _refusal_text(refused)
            raise KeepMaskError(
                "regate_fx: keep_mask was given, but no part of this model's graph could be rewritten "
                f"to run on kept tokens ({why}). Call the model without keep_mask, or see "
                "`smodel.regate_report` for what was found.", report=report)
        if refused:
            msg = ("regate_fx: these branches cannot run on kept tokens only and would stay dense:\n"
                   + _refusal_text(refused))
            if strict:
                raise RewriteError(msg + "\nPass strict=False to sparsify() to keep them dense instead.",
                                   report=report)
            warnings.warn(msg, stacklevel=2)
        with carry_recompute_tags(gm.graph):  # replayed checkpointed ops stay recomputed in the backward
            g.gathered_inputs = rewrite(gm, analysis, KeptInputs(found["gather_idx"], found["scatter_idx"], found["valid"]))
        g.tail_on_kept, g.tail_detail = analysis.tail is not None, analysis.tail_detail
        g.causal_masks = len(analysis.causal_masks)
        counters["branches_rewritten"] += sum(b.rewritten for b in g.branches)
        if log is not None:
            log(g)
        # Plain eager has no backward partitioner to act on the recompute tags: use aot_eager's.
        compiler = torch._dynamo.lookup_backend("aot_eager") if checkpointed and inner is _eager else inner
        return compiler(gm, example_inputs)

    return regate_backend


def _refusal_text(refused: list[BranchRecord]) -> str:
    return "\n".join(f"  - branch {b.index} ({b.module}, {b.kind.value}): {b.reason.value}: {b.detail}"
                     for b in refused)
