"""Rewrite accepted regions into gather -> compute on kept tokens -> scatter form.

A region's stream is gathered once on entry, every node of the region is replayed on kept-token
tensors, every token-indexed side input (rotary tables, 4-D masks, position ids, earlier stream
values) is gathered along its token axes, sizes the layout changes are rebuilt, and attention is
adapted to the kept tokens. The stream value leaving the region is scattered back into the
stream value that entered it: pruned positions are carried unchanged, as the method requires.

How each of those steps reads on the kept layout, (B, K) padded or (1, N) packed, is the
layout's: this module asks the `GraphLayout` (`regate_fx/layouts/`) and never which one it is.
"""

from __future__ import annotations

import operator
from typing import cast

import torch
import torch.fx as fx

from regate_fx.layouts.base import GraphLayout
from regate_fx.passes.analyse import Analysis, Region, Tail
from regate_fx.passes.graph import TokenSymbols, fill_values, node_value, value_free_meta
from regate_fx.passes.kernels import KERNELS, MARKERS, mark_cacheable
from regate_fx.passes.reductions import Reductions

__all__ = ["rewrite"]


# --- the rewrite --------------------------------------------------------------------------------


def rewrite(gm: fx.GraphModule, analysis: Analysis, kept: GraphLayout, *, fill: bool = True) -> list[str]:
    """Rewrite every region (and the tail) of `analysis` in place.

    With `fill`, every added node gets its fake value (what AOTAutograd's cache and inductor's
    pre-grad passes read; 0.4 s at 4 layers, 1.4 s at 24 in docs/benchmarks.md): a compiler that
    runs the graph as it is (eager, aot_eager) does not need them.

    Returns:
        The names of the token-indexed side inputs that were gathered.
    """
    graph = gm.graph
    # None only for an analysis that found no token axis, hence no regions and no tail: nothing reads it
    sym = cast(TokenSymbols, analysis.sym)
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        k_node = kept.length(graph)  # K padded, N packed
    gathered: dict[fx.Node, fx.Node] = {}

    def gathered_side(a: fx.Node) -> fx.Node:
        if a not in gathered:
            dims = sym.token_dims(node_value(a))
            with graph.inserting_after(a if a.op != "placeholder" else k_node):
                gathered[a] = kept.gather_side(graph, a, dims)  # T -> K (N)
        return gathered[a]

    replay = _Replay(graph, sym, kept, k_node, gathered_side, analysis.causal_masks)
    env: dict[fx.Node, fx.Node] = {}
    envs: dict[fx.Node, fx.Node] = {}  # every region's nodes -> their kept copies
    red = analysis.reductions
    for region in analysis.regions:
        env = _rewrite_region(replay, region, red)
        envs.update(env)
    if analysis.tail is not None:
        _rewrite_tail(replay, analysis.tail, env)
    if red is not None:
        _rewrite_reductions(replay, red, envs, [n for r in analysis.regions for n in r.nodes])
    # Masks replaced by is_causal=True: drop their gathers and the full (B, 1, T, T) construction.
    unused = [g for g in gathered.values() if not g.users]
    _erase_unused(graph, unused)
    _finish(graph, kept, fill)
    gm.recompile()
    return [a.name for a, g in gathered.items() if g not in unused]


class _Replay:
    """Copies nodes so that they compute on kept tokens: (B, T, ...) values become (B, K, ...)."""

    def __init__(
        self,
        graph: fx.Graph,
        sym: TokenSymbols,
        kept: GraphLayout,
        k_node: fx.Node,
        gathered_side,
        causal_masks: set[fx.Node],
    ):
        self.graph, self.sym, self.kept, self.k_node = graph, sym, kept, k_node
        self.gathered_side, self.causal_masks = gathered_side, causal_masks

    def gather_stream(self, start: fx.Node) -> fx.Node:
        return self.kept.gather_stream(self.graph, start)

    def scatter_stream(self, start: fx.Node, kept_value: fx.Node) -> fx.Node:
        return self.kept.scatter_stream(self.graph, start, kept_value)

    def lookup(self, a: fx.Node, at: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node | int:
        """The kept-token version of input `a` of a node replayed just before `at`."""
        if a in env:
            return env[a]
        v = node_value(a)
        if isinstance(v, torch.Tensor) and self.sym.token_dims(v):
            return self.gathered_side(a)
        if not isinstance(v, torch.Tensor) and self.kept.changes_size(self.sym, v):
            return self.sym_k(a, at, env)
        return a

    def sym_k(self, a: fx.Node, before: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node | int:
        """Rebuild a size expression (analyse.sym_derivable said it can be) with the sizes the
        layout changes replaced (`GraphLayout.new_size`: T by K; packed, T by N and B by 1)."""
        size = self.kept.new_size(self.sym, node_value(a), self.k_node)
        if size is not None:
            return size
        with self.graph.inserting_before(before):
            new = self.graph.node_copy(a, lambda x: self.lookup(x, before, env))
        new.meta = value_free_meta(a.meta)
        return new

    def run(self, nodes: list[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
        """Replay `nodes` (in graph order) on kept tokens, each right after its original."""
        graph = self.graph
        for n in nodes:
            with graph.inserting_after(n):
                new = graph.node_copy(n, lambda a: self.lookup(a, n, env))  # called right here, for this n
            new.meta = value_free_meta(n.meta)  # values recorded for T, not K: refilled at the end
            env[n] = self.kept.attention(graph, n, new, self.sym, self.causal_masks)


def _finish(graph: fx.Graph, kept: GraphLayout, fill: bool) -> None:
    """Leave a graph AOTAutograd can cache: no `kept_rows` marker, a fake value on every node
    (with `fill`), kernel calls marked with their cache hash."""
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target in MARKERS]:
        kept.take_rows(n)  # tail left dense
    if fill:
        fill_values(graph)
    for n in graph.nodes:
        if n.op == "call_function" and n.target in KERNELS:
            mark_cacheable(n)


def _erase_unused(graph: fx.Graph, replaced) -> None:
    """Erase the `replaced` nodes left without users, then every pure op above them left so too."""
    stack, erased = [(n, True) for n in replaced], set()
    while stack:
        n, was_replaced = stack.pop()
        name = getattr(n.target, "__name__", str(n.target))
        pure = n.op in ("call_function", "call_method") and not name.endswith("_") and n.target is not operator.setitem
        if n in erased or n.users or not (was_replaced or pure):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend((a, False) for a in inputs)


def _rewrite_region(replay: _Replay, region: Region, red: Reductions | None) -> dict[fx.Node, fx.Node]:
    """Gather the stream once, replay the region on kept tokens, scatter what leaves it (not into
    the batch-level reductions `red`, which read the kept values: `_rewrite_reductions`)."""
    graph = replay.graph
    members = set(region.nodes) | set(red.nodes if red is not None else ())
    start = region.start
    # A stream that starts at an input (inputs_embeds) is gathered after the last placeholder.
    with graph.inserting_after(start if start.op != "placeholder" else replay.k_node):
        env = {start: replay.gather_stream(start)}  # (B, K, D) padded, (1, N, D) packed
    replay.run(region.nodes, env)
    # Stream values leaving the region (its end, and any stream value used after it).
    for n in region.nodes:
        outside = [u for u in n.users if u not in members and u not in env.values()]
        if not outside:
            continue
        with graph.inserting_after(env[n]):
            full = replay.scatter_stream(start, env[n])  # (B, T, D)
        for u in outside:
            u.replace_input_with(n, full)
    _erase_unused(graph, region.nodes)
    return env


def _rewrite_reductions(
    replay: _Replay, red: Reductions, envs: dict[fx.Node, fx.Node], region_nodes: list[fx.Node]
) -> None:
    """Replay the batch-level reductions (a router's aux loss, reductions.py) on the kept layout:
    the region values they read at their kept copies, the padding mask zero at padding slots, so
    each masked sum runs over exactly the kept tokens. Their results (no token axis) replace the
    originals in the graph's output; the originals are erased with the full-length region nodes
    only they kept alive (a node the model also reads stays, judged by the coverage check)."""
    graph = replay.graph
    env = dict(envs)
    if red.padding is not None:
        with graph.inserting_before(red.nodes[0]):  # before every replayed copy, in insertion order
            env[red.padding] = replay.kept.gather_padding(graph, red.padding)  # (B, K) padded, (1, N) packed
    replay.run(red.nodes, env)
    for n in red.nodes:  # the graph returns the totals (the aux loss, the model's aux term)
        for u in [u for u in n.users if u.op == "output"]:
            u.replace_input_with(n, env[n])
    for n in reversed(red.nodes):  # in-place ones too (scatter_add_ into a buffer): exactly once
        if not n.users:
            graph.erase_node(n)
    _erase_unused(graph, [n for n in region_nodes if not getattr(n, "_erased", False)])


def _rewrite_tail(replay: _Replay, tail: Tail, env: dict[fx.Node, fx.Node]) -> None:
    """Run the final norm / LM head on the last region's gathered stream, not on all T rows.

    The marker `kept_rows(x)` asked for x's kept rows (B, K, V); the replayed x is exactly that
    (in the layout's form: `GraphLayout.tail_rows`).
    """
    graph = replay.graph
    end_k = env[tail.end]  # (B, K, D): the stream before it was scattered back
    scattered = [u for u in end_k.users if u.target in replay.kept.scatters]
    env = {s: end_k for s in scattered}  # the tail reads the scattered stream; read the gathered one
    replay.run(tail.nodes, env)
    rows = env[cast(fx.Node, tail.take.args[0])]  # (B, K, V) padded, (1, N, V) packed
    rows = replay.kept.tail_rows(graph, rows)
    tail.take.replace_all_uses_with(rows)
    graph.erase_node(tail.take)
    _erase_unused(graph, [*scattered, *tail.nodes])
