"""The interface of a kept layout: how a sparse step lays out the kept tokens.

A layout has two halves, and nothing outside `regate_fx/layouts/` asks which layout it has:

Runtime (`Layout`, one instance per kind, no state):
    name, roles      its name (``GraphReport.layout``) and the roles of its tensors, in order:
                     the backend finds them among the graph's placeholders by these names
    build(keep)      its tensors for a bool (B, T) keep mask
    dynamic_dims     per tensor, the axes dynamo keeps symbolic
    outputs(...)     in the step function (traced by dynamo): logits, loss and token loss from the
                     model's (B, T, V) logits, through the layout's marker (`passes/kernels.py`)
    problem(a)       why a captured graph (its `Analysis`) cannot run on this layout, or None
    graph(nodes)     the graph half, on the placeholders of its tensors
    fallback         the layout a step falls back to when `problem` says no (None: none)
    applies(keep)    whether the layout applies to a step at all (else its fallback runs)
    refusal(report)  why this model's graph refused it earlier ("": it did not); note_refusal sets it

Graph (`GraphLayout`, built by the backend for one rewrite; `passes/rewrite.py` calls it):
    length           the kept length node (K, N), inserted after the last placeholder
    gather_side      a token-indexed side input at the kept tokens
    gather_stream    the stream value entering a region, at the kept tokens
    gather_padding   the 2-D padding mask at the kept tokens, zero at the layout's padding slots
                     (what a batch-level reduction outside the decoder reads: reductions.py)
    scatter_stream   a stream value leaving a region, written back into the full-length one
    scatters         the kernels `scatter_stream` inserts (the tail reads past them)
    new_size         a size the layout changes (T; B too when packed), rebuilt for the kept tokens
    attention        a replayed node's attention on the kept tokens (key masks, varlen, ...)
    take_rows        the marker left in the graph (no tail rewrite): the kept rows of its input
    tail_rows        the replayed tail's output as the marker asked for it
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["GraphLayout", "Layout", "LayoutRefused"]


class LayoutRefused(Exception):
    """A captured graph cannot run on `layout` (`why` says why). Raised by the backend (the only
    way out of a dynamo compile), caught by `SparseForward`, which falls back or raises."""

    def __init__(self, layout: "Layout", why: str):
        super().__init__(why)
        self.layout, self.why = layout, why


class GraphLayout:
    """The in-graph half of a layout, on the placeholder nodes of its tensors (see the module doc)."""

    scatters: frozenset = frozenset()

    def length(self, graph: fx.Graph) -> fx.Node:
        raise NotImplementedError

    def gather_side(self, graph: fx.Graph, a: fx.Node, dims: tuple[int, ...]) -> fx.Node:
        raise NotImplementedError

    def gather_stream(self, graph: fx.Graph, start: fx.Node) -> fx.Node:
        raise NotImplementedError

    def gather_padding(self, graph: fx.Graph, a: fx.Node) -> fx.Node:
        """The (B, T) padding mask `a` at the kept tokens, zero at padding slots (a layout without
        padding slots: its `gather_side`)."""
        return self.gather_side(graph, a, (1,))

    def scatter_stream(self, graph: fx.Graph, start: fx.Node, kept_value: fx.Node) -> fx.Node:
        raise NotImplementedError

    def changes_size(self, sym, v: Any) -> bool:
        """Whether a non-tensor value involves a size this layout changes."""
        return sym.size_has_seq(v)

    def new_size(self, sym, v: Any, length: fx.Node) -> fx.Node | int | None:
        """The kept-token value of a size that is exactly a changed one, or None (rebuild it)."""
        return length if sym.is_seq(v) else None

    def attention(self, graph: fx.Graph, n: fx.Node, new: fx.Node, sym, causal_masks: set) -> fx.Node:
        """Adapt `new`, the replayed copy of `n`, to attention on the kept tokens; returns the
        node that stands for `n` from now on."""
        return new

    def take_rows(self, n: fx.Node) -> None:
        raise NotImplementedError

    def tail_rows(self, graph: fx.Graph, rows: fx.Node) -> fx.Node:
        return rows


class Layout:
    """The runtime half of a layout (see the module doc)."""

    name: str = ""
    roles: tuple[str, ...] = ()
    dynamic_dims: tuple[tuple[int, ...], ...] = ()
    fallback: "Layout | None" = None

    def build(self, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def outputs(self, logits: torch.Tensor, tensors: tuple, labels, inputs: dict, return_logits: bool):
        raise NotImplementedError

    def problem(self, analysis) -> str | None:
        return None

    def applies(self, keep: torch.Tensor) -> bool:
        return True

    def refusal(self, report) -> str:
        return ""

    def note_refusal(self, report, why: str) -> None:
        pass

    def graph(self, nodes: dict[str, fx.Node]) -> GraphLayout:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} layout>"
