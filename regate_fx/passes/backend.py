"""The torch.compile backend: analyse -> rewrite -> hand the graph to the inner backend."""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
import torch.fx as fx

from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.layouts import LAYOUT_KINDS, LayoutRefused
from regate_fx.passes.analyse import Analysis, analyse
from regate_fx.passes.checkpoint import CheckpointError, carry_recompute_tags, inline_activation_checkpoints
from regate_fx.passes.graph import fill_values, node_value, specialize_inputs
from regate_fx.passes.rewrite import rewrite
from regate_fx.report import BranchRecord, GraphReport, OutsideRecord, RewriteReport, group_outside

__all__ = ["LayoutRefused", "PlaceholderRoles", "SparseRuns", "counters", "make_backend", "resolve_backend"]

# The rewritten graph, through torch's logging: TORCH_LOGS="+regate_fx" (or
# torch._logging.set_logs(modules={"regate_fx": logging.DEBUG})) prints it with the report.
log = logging.getLogger(__name__)

# What fired, for tests and debugging: torch's own counters, under "regate_fx"
# (graphs, sparse_graphs, branches_rewritten, branches_refused, outside_refusals,
# checkpoints_inlined, packed_refused, static_graphs).
counters = torch._dynamo.utils.counters["regate_fx"]


class PlaceholderRoles:
    """Which graph inputs play which role (the sequence, the padding mask, the kept layout's tensors).

    Carried in the graph: each placeholder of a dynamo graph records where it was read
    (``node.meta["grapharg"].source``, e.g. ``L['tensors'][0]``), and ``by_source`` maps those
    sources to roles (built by :func:`regate_fx.step.step_sources` from the step's arguments). A
    graph whose placeholders carry no sources (a piece of a graph something split before the
    backend saw it) has no roles: it runs unchanged, and the step's must-run check says so.
    """

    def __init__(self, by_role: dict[str, str] | None = None) -> None:
        self.by_source: dict[str, str] = {src: role for role, src in (by_role or {}).items()}

    def set(self, by_role: dict[str, str]) -> None:
        """The roles of the next capture: role -> source (:func:`regate_fx.step.step_sources`)."""
        self.by_source = {src: role for role, src in by_role.items()}


def placeholder_source(n: fx.Node) -> str | None:
    """Where dynamo read placeholder `n` (``L['inputs']['input_ids']``), or None when not recorded."""
    source = getattr(n.meta.get("grapharg"), "source", None)
    return None if source is None else source.name


class SparseRuns:
    """Counts the executions of the graphs the backend rewrote (``count``).

    :func:`make_backend` wraps the callable it returns for every rewritten graph so that each
    call adds one; graphs it passes through unchanged (no kept layout among their inputs: a dense
    call, or a piece of a graph that something split before the backend saw it) do not count.
    A sparse step reads the count before and after its compiled call: unchanged means the step
    ran without its rewritten graph (``SparseForward._sparse_graph_must_run``).
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _counted(compiled: Callable, runs: SparseRuns) -> Callable:
    """``compiled`` (a rewritten graph's compiled callable), adding one to ``runs.count`` per call."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    # As dynamo does with a backend's result, which it can no longer see through the wrapper:
    # generate a lazy graph module's code now and call its real forward.
    owner = getattr(compiled, "__self__", None)  # a bound method's module
    if isinstance(compiled, _LazyGraphModule):
        _LazyGraphModule.force_recompile(compiled)
    elif isinstance(owner, _LazyGraphModule) and compiled.__name__ == "_lazy_forward":
        _LazyGraphModule.force_recompile(owner)
        compiled = owner.forward

    def rewritten_graph(*args, **kwargs):
        runs.count += 1
        return compiled(*args, **kwargs)

    return rewritten_graph


def resolve_backend(backend: str | Callable) -> Callable:
    """The compiler that runs after the ReGATE pass: 'eager', 'aot_eager', 'inductor' or a callable."""
    if callable(backend):
        return backend
    if backend == "eager":
        return _eager
    return torch._dynamo.lookup_backend(backend)


def _eager(gm: fx.GraphModule, example_inputs):
    return gm.forward


def _find_roles(gm: fx.GraphModule, roles: PlaceholderRoles) -> dict[str, fx.Node]:
    found = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            role = roles.by_source.get(placeholder_source(n) or "")
            if role:
                found[role] = n
    return found


def _records(analysis: Analysis) -> list[BranchRecord]:
    return [
        BranchRecord(b.index, b.layer, b.module, b.kind, b.attention_form, b.ok, b.reason, b.detail, len(b.nodes))
        for b in analysis.branches
    ]


def make_backend(
    inner: Callable,
    report: RewriteReport,
    roles: PlaceholderRoles,
    *,
    strict: bool,
    on_report: Callable[[GraphReport], None] | None = None,
    dynamic: bool | None = True,
    runs: SparseRuns | None = None,
) -> Callable:
    """Build the dynamo backend for one sparsified model.

    ``runs``: every call of a graph this backend rewrote adds one to ``runs.count`` (see
    :class:`SparseRuns`); pass-through graphs do not.

    ``dynamic=None``: the model's first sparse graph is compiled for the sizes of its first call
    (guards on them; see :func:`~regate_fx.passes.graph.specialize_inputs`), every later one with
    symbolic sizes, as ``torch.compile``'s automatic dynamic shapes. Only for an inner compiler
    that traces the graph again (not ``eager``, where the capture is all the compile and must be
    symbolic for the analysis anyway). ``True``: symbolic from the first graph.
    """
    static_left = dynamic is None and inner is not _eager  # the first sparse graph compiles static

    def regate_backend(gm: fx.GraphModule, example_inputs):
        nonlocal static_left
        found = _find_roles(gm, roles)
        name = f"graph_{len(report.graphs)}"
        kind = next((k for k in LAYOUT_KINDS if k.roles[0] in found), None)  # the kept layout among the inputs
        if "seq" not in found:  # a dense call (keep_mask=None), or a piece of a graph split before this backend
            kind = None  # (DDP's buckets): runs unchanged, and the step's must-run check names it
        if kind is None:  # nothing to rewrite
            counters["graphs"] += 1
            report.graphs.append(GraphReport(name, sparse=False))
            return inner(gm, example_inputs)
        why: str | None = None  # the layout's refusal, a value: only then is this graph neither reported nor counted
        try:
            try:  # checkpointed layers: flatten into the graph, tagged for recompute in the backward
                checkpointed = inline_activation_checkpoints(gm)
            except CheckpointError as e:
                raise RewriteError(str(e), report=report) from None
            counters["checkpoints_inlined"] += checkpointed
            seq = found["seq"]
            if not isinstance(node_value(seq), torch.Tensor):
                raise KeepMaskError("regate_fx: could not find the model's input_ids / inputs_embeds in the graph")
            layout = [found[k] for k in kind.roles]
            analysis = analyse(gm, seq, padding=found.get("attention_mask"), layout=layout)
            why = kind.problem(analysis)
        finally:
            if not why:  # counted whether it is rewritten or raises; a refused layout's graph is not
                counters["graphs"] += 1
                counters["sparse_graphs"] += 1
        if why:  # dynamo's only way out of a compile: SparseForward runs the fallback layout, whose capture reports
            counters[f"{kind.name}_refused"] += 1
            raise LayoutRefused(kind, why)
        g = GraphReport(
            name,
            sparse=True,
            branches=_records(analysis),
            reason=analysis.reason,
            detail=analysis.detail,
            regions=[(r.first, r.last) for r in analysis.regions],
            outside=[OutsideRecord(o.node.name, o.module, o.reason, o.detail) for o in analysis.outside],
        )
        report.graphs.append(g)
        refused = g.refused
        counters["branches_refused"] += len(refused)
        counters["outside_refusals"] += len(g.outside)
        if not analysis.regions:
            why = f"{g.reason.value}: {g.detail}" if g.reason else _refusal_text(refused) + _outside_text(g.outside)
            raise KeepMaskError(
                "regate_fx: keep_mask was given, but no part of this model's graph could be rewritten "
                f"to run on kept tokens ({why}). Call the model without keep_mask, or see "
                "`smodel.regate_report` for what was found.",
                report=report,
            )
        if g.outside:
            msg = (
                "regate_fx: these ops mix tokens outside every branch that runs on kept tokens, so "
                "kept positions would see pruned ones (the result would not be exact):\n" + _outside_text(g.outside)
            )
            if strict:
                raise RewriteError(
                    msg + "\nThis model is not supported by the ReGATE pass; call it "
                    "without keep_mask (dense), or pass strict=False to run it anyway "
                    "(not exact).",
                    report=report,
                )
            warnings.warn(msg, stacklevel=2)
        if refused:
            msg = "regate_fx: these branches cannot run on kept tokens only and would stay dense:\n" + _refusal_text(
                refused
            )
            if strict:
                raise RewriteError(msg + "\nPass strict=False to sparsify() to keep them dense instead.", report=report)
            warnings.warn(msg, stacklevel=2)
        g.layout = kind.name
        kept = kind.graph(found)
        with carry_recompute_tags(gm.graph):  # replayed checkpointed ops stay recomputed in the backward
            g.gathered_inputs = rewrite(gm, analysis, kept, fill=False)
        if static_left:  # after the analysis and the rewrite, which read the symbols
            static_left = False
            g.static_sizes = specialize_inputs(gm.graph)
            counters["static_graphs"] += bool(g.static_sizes)
        if _reads_values(inner):
            fill_values(gm.graph)  # on static sizes when specialised: cheaper
        g.tail_on_kept, g.tail_detail = analysis.tail is not None, analysis.tail_detail
        g.causal_masks = len(analysis.causal_masks)
        counters["branches_rewritten"] += sum(b.rewritten for b in g.branches)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("regate_fx %s rewritten:\n%s\n%s", name, report, gm.print_readable(print_output=False))
        if on_report is not None:
            on_report(g)
        # Plain eager has no backward partitioner to act on the recompute tags: use aot_eager's.
        compiler = torch._dynamo.lookup_backend("aot_eager") if checkpointed and inner is _eager else inner
        compiled = compiler(gm, example_inputs)
        return compiled if runs is None else _counted(compiled, runs)

    return regate_backend


def _reads_values(inner: Callable) -> bool:
    """Whether the inner compiler may read node values: eager and aot_eager never use AOTAutograd's
    cache or inductor's pre-grad passes; inductor and callables may."""
    return inner is not _eager and inner is not torch._dynamo.lookup_backend("aot_eager")


def _outside_text(outside: list[OutsideRecord]) -> str:
    return "\n".join(
        f"  - {m}: {o.reason.value}: {o.detail}" + (f" (+{k} more ops)" if k else "")
        for m, o, k in group_outside(outside)
    )


def _refusal_text(refused: list[BranchRecord]) -> str:
    lines = []
    for b in refused:
        assert b.reason is not None  # a branch that is not rewritten names its reason
        lines.append(f"  - branch {b.index} ({b.module}, {b.kind.value}): {b.reason.value}: {b.detail}")
    return "\n".join(lines)
