"""Rewrite accepted regions into gather -> compute on kept tokens -> scatter form.

Layout of the kept tokens (built outside the graph, see `regate_fx.layouts.padded`):

    gather_idx  (B, K)  kept positions of each sample in ascending order, then padding slots that
                        repeat the sample's last kept position (so every row of every mask is a
                        real row and no softmax row is empty)
    scatter_idx (B, K)  the same kept positions, then distinct *pruned* positions for the padding
                        slots: the scatter is a permutation, deterministic and duplicate-free
    valid       (B, K)  True for real kept slots

A region's stream is gathered once on entry, every node of the region is replayed on (B, K, ...)
tensors, every token-indexed side input (rotary tables, 4-D masks, position ids, earlier stream
values) is gathered along each of its token axes, sizes equal to T become K, and attention masks
out the padding slots as keys. The stream value leaving the region is scattered back into the
stream value that entered it: pruned positions are carried unchanged, as the method requires.

The packed layout (`PackedInputs`, see `regate_fx.passes.kernels`) puts every sample's kept
tokens in one row instead: (B, T, ...) values become (1, N, ...), sizes equal to T become N and
sizes equal to B become 1, and every causal SDPA call becomes `packed_attention` (each sample's
tokens attend among themselves). `regate_fx.passes.packed` says when a graph allows it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from regate_fx.passes.analyse import Analysis, Region, Tail
from regate_fx.passes.graph import (TokenSymbols, fill_values, is_sdpa, node_value, op_name, sdpa_arg, set_sdpa_arg,
                                    value_free_meta)
from regate_fx.passes.kernels import (KERNELS, gather_tokens, kept_rows, kept_rows_packed, mark_cacheable,
                                      mask_keys_scores, mask_keys_weights, pack_tokens, packed_attention, packed_rows,
                                      scatter_tokens, sdpa_key_mask, unpack_tokens)
from regate_fx.passes.ops import classify

__all__ = ["KeptInputs", "PackedInputs", "rewrite"]


# --- the rewrite --------------------------------------------------------------------------------

@dataclass
class KeptInputs:
    """Placeholders carrying the kept layout into the graph."""

    gather_idx: fx.Node
    scatter_idx: fx.Node
    valid: fx.Node


@dataclass
class PackedInputs:
    """Placeholders carrying the packed layout into the graph."""

    flat_idx: fx.Node
    pad_idx: fx.Node
    pack_idx: fx.Node
    cu_seqlens: fx.Node


def rewrite(gm: fx.GraphModule, analysis: Analysis, kept: KeptInputs | PackedInputs, *,
            fill: bool = True) -> list[str]:
    """Rewrite every region (and the tail) of `analysis` in place.

    With `fill`, every added node gets its fake value (what AOTAutograd's cache and inductor's
    pre-grad passes read; 0.4 s at 4 layers, 1.4 s at 24 in docs/benchmarks.md): a compiler that
    runs the graph as it is (eager, aot_eager) does not need them.

    Returns:
        The names of the token-indexed side inputs that were gathered.
    """
    graph = gm.graph
    sym = analysis.sym
    packed = isinstance(kept, PackedInputs)
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        k_node = (graph.call_method("size", (kept.flat_idx, 0)) if packed  # N, the packed length
                  else graph.call_method("size", (kept.gather_idx, 1)))  # K, the kept length
    gathered: dict[fx.Node, fx.Node] = {}

    def gathered_side(a: fx.Node) -> fx.Node:
        if a not in gathered:
            dims = sym.token_dims(node_value(a))
            with graph.inserting_after(a if a.op != "placeholder" else k_node):
                gathered[a] = (graph.call_function(pack_tokens, (a, kept.flat_idx, dims[0])) if packed  # T -> N
                               else graph.call_function(gather_tokens, (a, kept.gather_idx, dims)))  # T -> K
        return gathered[a]

    replay = _Replay(graph, sym, kept, k_node, gathered_side, analysis.causal_masks)
    env: dict[fx.Node, fx.Node] = {}
    for region in analysis.regions:
        env = _rewrite_region(replay, region)
    if analysis.tail is not None:
        _rewrite_tail(replay, analysis.tail, env)
    # Masks replaced by is_causal=True: drop their gathers and the full (B, 1, T, T) construction.
    unused = [g for g in gathered.values() if not g.users]
    _erase_unused(graph, unused)
    _finish(graph, kept, fill)
    gm.recompile()
    return [a.name for a, g in gathered.items() if g not in unused]


class _Replay:
    """Copies nodes so that they compute on kept tokens: (B, T, ...) values become (B, K, ...)."""

    def __init__(self, graph: fx.Graph, sym: TokenSymbols, kept: KeptInputs | PackedInputs, k_node: fx.Node,
                 gathered_side, causal_masks: set[fx.Node]):
        self.graph, self.sym, self.kept, self.k_node = graph, sym, kept, k_node
        self.gathered_side, self.causal_masks = gathered_side, causal_masks
        self.packed = isinstance(kept, PackedInputs)
        # Packed: the batch axis is gone too (B -> 1); sizes are read with the roles swapped.
        self.sym_b = TokenSymbols(sym.shape_env, sym.seq, sym.batch) if self.packed else None

    def has_size(self, v) -> bool:
        """Whether a non-tensor value involves a size the layout changes (T; B too when packed)."""
        return self.sym.size_has_seq(v) or (self.packed and self.sym_b.size_has_seq(v))

    def gather_stream(self, start: fx.Node) -> fx.Node:
        if self.packed:
            return self.graph.call_function(pack_tokens, (start, self.kept.flat_idx))  # (1, N, D)
        return self.graph.call_function(gather_tokens, (start, self.kept.gather_idx, (1,)))  # (B, K, D)

    def scatter_stream(self, start: fx.Node, kept_value: fx.Node) -> fx.Node:
        if self.packed:
            return self.graph.call_function(unpack_tokens, (start, kept_value, self.kept.flat_idx))  # (B, T, D)
        kept = self.kept
        return self.graph.call_function(scatter_tokens, (start, kept_value, kept.scatter_idx, kept.valid))  # (B, T, D)

    def lookup(self, a: fx.Node, at: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
        """The kept-token version of input `a` of a node replayed just before `at`."""
        if a in env:
            return env[a]
        v = node_value(a)
        if isinstance(v, torch.Tensor) and self.sym.token_dims(v):
            return self.gathered_side(a)
        if not isinstance(v, torch.Tensor) and self.has_size(v):
            return self.sym_k(a, at, env)
        return a

    def sym_k(self, a: fx.Node, before: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node | int:
        """Rebuild a size expression (analyse._sym_derivable said it can be) with T replaced by K
        (packed: by N, and B by 1)."""
        if self.sym.is_seq(node_value(a)):
            return self.k_node
        if self.packed and self.sym.is_batch(node_value(a)):
            return 1
        with self.graph.inserting_before(before):
            new = self.graph.node_copy(a, lambda x: self.lookup(x, before, env))
        new.meta = value_free_meta(a.meta)
        return new

    def run(self, nodes: list[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
        """Replay `nodes` (in graph order) on kept tokens, each right after its original."""
        graph, sym, valid = self.graph, self.sym, getattr(self.kept, "valid", None)
        for n in nodes:
            with graph.inserting_after(n):
                new = graph.node_copy(n, lambda a, n=n: self.lookup(a, n, env))
            new.meta = value_free_meta(n.meta)  # values recorded for T, not K: refilled at the end
            env[n] = new
            if self.packed and is_sdpa(n):  # packed.py proved it causal SDPA on this graph's tokens
                env[n] = self._packed_attention(new)
            elif is_sdpa(n) and sdpa_arg(n, "attn_mask") in self.causal_masks:
                set_sdpa_arg(new, "attn_mask", None)  # proven "causal AND key is real": masks.py
                set_sdpa_arg(new, "is_causal", True)
            elif is_sdpa(n) and sym.token_dims(node_value(sdpa_arg(n, "key"))):  # not cross-attention
                _mask_sdpa_keys(graph, new, valid)
            else:
                form = classify(n, sym).attention if n.op in ("call_function", "call_method") else None
                if form == "softmax":  # -inf on padding-slot keys before the normalisation
                    with graph.inserting_before(new):
                        masked = graph.call_function(mask_keys_scores, (new.args[0], valid))
                    new.update_arg(0, masked)
                elif form == "pv" and not _from_softmax(n.args[0], sym):
                    # Weights formed without a softmax (sigmoid attention, ...): zero the padding-slot
                    # keys where the weights meet the values.
                    with graph.inserting_before(new):
                        masked = graph.call_function(mask_keys_weights, (new.args[0], valid))  # (B, ..., K, K)
                    new.update_arg(0, masked)


    def _packed_attention(self, new: fx.Node) -> fx.Node:
        """Replace a replayed causal SDPA call by attention of each sample's packed tokens."""
        kept = self.kept
        q, k, v = (sdpa_arg(new, r) for r in ("query", "key", "value"))
        with self.graph.inserting_after(new):
            out = self.graph.call_function(
                packed_attention, (q, k, v, kept.pad_idx, kept.pack_idx, kept.cu_seqlens),
                {"scale": sdpa_arg(new, "scale"), "enable_gqa": sdpa_arg(new, "enable_gqa", False)})  # (1, H, N, d)
        new.replace_all_uses_with(out)
        self.graph.erase_node(new)
        return out


def _finish(graph: fx.Graph, kept: KeptInputs | PackedInputs, fill: bool) -> None:
    """Leave a graph AOTAutograd can cache: no `kept_rows` marker, a fake value on every node
    (with `fill`), kernel calls marked with their cache hash."""
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target in (kept_rows, kept_rows_packed)]:
        if n.target is kept_rows_packed:  # tail left dense
            n.target, n.args, n.kwargs = packed_rows, (n.args[0], kept.flat_idx), {}
        else:
            n.target, n.args, n.kwargs = gather_tokens, (n.args[0], kept.gather_idx, (1,)), {}
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


def _rewrite_region(replay: _Replay, region: Region) -> dict[fx.Node, fx.Node]:
    """Gather the stream once, replay the region on kept tokens, scatter what leaves it."""
    graph, kept = replay.graph, replay.kept
    members = set(region.nodes)
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


def _rewrite_tail(replay: _Replay, tail: Tail, env: dict[fx.Node, fx.Node]) -> None:
    """Run the final norm / LM head on the last region's gathered stream, not on all T rows.

    The marker `kept_rows(x)` asked for x's kept rows (B, K, V); the replayed x is exactly that.
    (`kept_rows_packed(x, ...)` asked for (N, V); the replayed x is (1, N, V).)
    """
    graph = replay.graph
    end_k = env[tail.end]  # (B, K, D): the stream before it was scattered back
    scattered = [u for u in end_k.users if u.target in (scatter_tokens, unpack_tokens)]
    env = {s: end_k for s in scattered}  # the tail reads the scattered stream; read the gathered one
    replay.run(tail.nodes, env)
    rows = env[tail.take.args[0]]  # (B, K, V) padded, (1, N, V) packed
    if replay.packed:
        with graph.inserting_after(rows):
            rows = graph.call_method("squeeze", (rows, 0))  # (N, V); a view: no zero-filled (1, N, V) grad
    tail.take.replace_all_uses_with(rows)
    graph.erase_node(tail.take)
    _erase_unused(graph, [*scattered, *tail.nodes])


_VALUE_KEEPING = {"dropout", "to", "type_as", "contiguous", "float", "half", "bfloat16", "clone", "detach"}


def _from_softmax(w: fx.Node, sym: TokenSymbols) -> bool:
    """Whether attention weights are a (key-masked) softmax, through dropout and casts only."""
    while isinstance(w, fx.Node) and w.op in ("call_function", "call_method") and op_name(w) in _VALUE_KEEPING:
        w = w.args[0]
    return isinstance(w, fx.Node) and w.op in ("call_function", "call_method") and \
        classify(w, sym).attention == "softmax"


def _mask_sdpa_keys(graph: fx.Graph, new: fx.Node, valid: fx.Node) -> None:
    """Padding slots sit after every real slot, so causal attention never sees them as keys."""
    mask = sdpa_arg(new, "attn_mask")
    if mask is None and sdpa_arg(new, "is_causal", False):
        return
    with graph.inserting_before(new):
        set_sdpa_arg(new, "attn_mask", graph.call_function(sdpa_key_mask, (mask, valid)))

