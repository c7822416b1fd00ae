"""The residual stream of a captured decoder: the chain of adds `h = h + branch(h)`.

An add of two (B, T, D) tensors belongs to the stream when one operand (the carry) is an ancestor of
the other (the branch), or, for Cohere's `(h + attn) + mlp`, when the carry is itself a stream add.
Between two adds the stream may pass through token-wise ops (post-norm). `find_stream` returns the
longest such chain; analyse.py turns it into branches and regions.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from regate_fx.passes.graph import Ancestry, TokenSymbols, mutates, node_value, op_name
from regate_fx.passes.ops import classify

__all__ = [
    "find_stream",
    "is_stream_value",
    "scaled_source",
    "stream_3d",
    "stream_root",
    "stream_start",
    "written_in_place",
]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "to", "view_as", "reshape_as"}


# A stream value: floating point (B, T, D), or (B*T, D) when a layer flattens the tokens (OPT).
def is_stream_value(v, sym: TokenSymbols, flat_ok: bool = True) -> bool:
    if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() in (2, 3)):
        return False
    if sym.has_seq(v.shape[-1]):
        return False
    if v.dim() == 3:
        return sym.is_seq(v.shape[1]) and sym.is_batch(v.shape[0])
    return flat_ok and sym.canon(v.shape[0]) == sym.batch * sym.seq


def _is_reshape(n: fx.Node) -> bool:
    return (
        n.op in ("call_method", "call_function")
        and op_name(n) in _RESHAPES
        and len([a for a in n.all_input_nodes if isinstance(node_value(a), torch.Tensor)]) == 1
    )


# Walks back through reshapes/casts to the value they re-view (OPT flattens the stream).
def stream_root(n: fx.Node) -> fx.Node:
    while _is_reshape(n) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _is_candidate_add(n: fx.Node, sym: TokenSymbols) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCTIONS:
        pass
    elif n.op == "call_method" and n.target in _ADD_METHODS:
        pass
    else:
        return False
    if len(n.args) < 2 or "alpha" in n.kwargs:
        return False
    a, b = n.args[0], n.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    va, vb, vo = node_value(a), node_value(b), node_value(n)
    if not all(is_stream_value(v, sym) for v in (va, vb, vo)):
        return False
    return va.dim() == vb.dim() and all(sym.canon(x) == sym.canon(y) for x, y in zip(va.shape, vb.shape))


def find_stream(graph: fx.Graph, sym: TokenSymbols, anc: Ancestry) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Return the longest chain of stream adds as (add, carry, branch_output) triples."""
    adds: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for n in graph.nodes:
        if not _is_candidate_add(n, sym):
            continue
        a, b = n.args[0], n.args[1]
        if anc.is_ancestor(a, b):
            adds[n] = (a, b)
        elif anc.is_ancestor(b, a):
            adds[n] = (b, a)
        elif (stream_root(a) in adds) != (stream_root(b) in adds):  # Cohere: (h + attn) + mlp
            adds[n] = (a, b) if stream_root(a) in adds else (b, a)
        elif _scales_an_ancestor(a, b, sym, anc):  # MiniMax, Doge: h = alpha * h + f(h)
            adds[n] = (a, b)
        elif _scales_an_ancestor(b, a, sym, anc):
            adds[n] = (b, a)
    # Link adds whose carry is (a token-wise function of) the previous add into chains; keep the longest.
    next_of: dict[fx.Node, fx.Node | None] = {}
    prev_of = {n: _previous_add(carry, adds, sym, anc) for n, (carry, _) in adds.items()}
    for n, root in prev_of.items():
        if root is not None:
            next_of[root] = None if root in next_of else n  # two continuations: ambiguous, cut
    heads = [n for n, root in prev_of.items() if root is None]
    best: list[fx.Node] = []
    for h in heads:
        chain, cur = [h], h
        while (nxt := next_of.get(cur)) is not None:
            cur = nxt
            chain.append(cur)
        if len(chain) > len(best):
            best = chain
    return [(n, adds[n][0], adds[n][1]) for n in best]


_PROJECTIONS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "embedding"}
_SCALES = {"mul", "mul_", "__mul__", "__rmul__", "div", "truediv", "to", "float", "type_as"}


def scaled_source(carry: fx.Node, branch: fx.Node, sym: TokenSymbols, anc: Ancestry, depth: int = 4) -> fx.Node | None:
    """The value a scaled residual carry scales, when `branch` is computed from it: `carry` is
    elementwise scalings of one token-indexed value by constants or parameters (`alpha * h`,
    MiniMax's `residual * attn_alpha_factor`, Doge's `input_residual * residual`). Else None."""
    n = carry
    for _ in range(depth):
        if n.op not in ("call_function", "call_method") or op_name(n) not in _SCALES:
            return None
        tokened = [a for a in n.all_input_nodes if sym.token_dims(node_value(a))]
        if len(tokened) != 1 or not classify(n, sym).token_wise:
            return None
        n = tokened[0]
        if anc.is_ancestor(n, branch):
            return n
    return None


def _scales_an_ancestor(carry: fx.Node, branch: fx.Node, sym: TokenSymbols, anc: Ancestry) -> bool:
    return scaled_source(carry, branch, sym, anc) is not None


def stream_start(carry: fx.Node, branch: fx.Node, sym: TokenSymbols, anc: Ancestry) -> fx.Node:
    """The (B, T, D) value a stream starts from at the add `carry + branch`: the carry's root
    through re-views (OPT's flattened stream), the value a scaled carry scales (`alpha * h + f(h)`:
    h), or the carry itself when its root is not (B, T, D) (a stem ending in a per-token reshape,
    `x.view(B, T, H, d).transpose(2, 3).reshape(B, T, D)`)."""
    source = scaled_source(carry, branch, sym, anc)
    if source is not None and is_stream_value(node_value(stream_root(source)), sym, flat_ok=False):
        return stream_root(source)
    root = stream_root(carry)
    if not is_stream_value(node_value(root), sym, flat_ok=False) and is_stream_value(
        node_value(carry), sym, flat_ok=False
    ):
        return carry
    return root


def _previous_add(carry: fx.Node, adds: dict, sym: TokenSymbols, anc: Ancestry) -> fx.Node | None:
    """The stream add that `carry` continues: itself re-viewed, or passed through token-wise ops
    whose only token-indexed input is that add (a post-norm: h = norm(h + attn(h)))."""
    root = stream_root(carry)
    if root in adds:
        return root
    before = [a for a in adds if a is not carry and anc.is_ancestor(a, carry)]
    if not before:
        return None
    prev = before[-1]  # adds are in graph order
    pv, cv = node_value(prev), node_value(carry)
    if pv.dim() != cv.dim() or any(sym.canon(a) != sym.canon(b) for a, b in zip(pv.shape, cv.shape)):
        return None  # a projection to another width (an MLP's hidden), not the stream
    between = anc.members(anc.descendants_of_any([prev]) & (anc.ancestors(carry) | anc.bit(carry)))
    inside = set(between) | {prev}
    return prev if all(_carries_stream(n, inside, sym) for n in between) else None


def _carries_stream(n: fx.Node, inside: set[fx.Node], sym: TokenSymbols) -> bool:
    """`n` is a token-wise function of the stream alone: no projection, and no token-indexed
    input from outside `inside` (another source joining is not the stream)."""
    if op_name(n) in _PROJECTIONS or not classify(n, sym).token_wise:
        return False
    return not any(a not in inside and sym.token_dims(node_value(a)) for a in n.all_input_nodes)


def stream_3d(n: fx.Node, sym: TokenSymbols) -> fx.Node | None:
    """`n` itself if (B, T, D), else the re-view of it to (B, T, D) that the graph makes next."""
    while not is_stream_value(node_value(n), sym, flat_ok=False):
        nxt = [u for u in n.users if _is_reshape(u)]
        if len(nxt) != 1:
            return None
        n = nxt[0]
    return n


def written_in_place(n: fx.Node, sym: TokenSymbols) -> list[fx.Node]:
    """The in-place writes that continue the stream value `n`, in order: `n`'s only user writes
    into it (`h *= scale`), and so on from that write. Each must be token-wise, keep the value
    (batch, tokens, hidden), and read no other token-indexed value (a per-layer constant or
    parameter, Gemma 4's `hidden_states *= self.layer_scalar` at the end of every layer).

    Such a write is the stream itself, as the link between two adds is (`_previous_add`): the
    next carry reads it, and after the last add it is the value the final norm reads. A write
    whose old value is also read elsewhere is not followed (that reader aliases the written
    tensor), nor one that mixes in another token-indexed value."""
    out: list[fx.Node] = []
    while len(n.users) == 1:
        u = next(iter(n.users))
        if not (u.args and u.args[0] is n and mutates(u)):
            break
        if not (_carries_stream(u, {n}, sym) and is_stream_value(node_value(u), sym, flat_ok=False)):
            break
        out.append(u)
        n = u
    return out
