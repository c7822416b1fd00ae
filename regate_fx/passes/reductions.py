"""Batch-level reductions of per-token values the decoder computes: an MoE router's auxiliary loss.

With ``output_router_logits=True`` a token-choice MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
...) returns every layer's router logits, one row per token, and reduces them over the batch into
a load-balancing loss (transformers' ``load_balancing_loss_func``):

    softmax, top-k per token                          (token-wise)
    counts  = scatter_add(zeros(E), top-k ids, mask)  (a sum over the tokens, weighted by the mask)
    probs   = (softmax * mask[:, None]).sum(0)        (a sum over the tokens, weighted by the mask)
    rows    = mask.sum()                              (the number of real tokens)
    aux     = E * sum(counts / rows * probs / rows)   (no token axis)

It has no per-sample value, so the oracle's rule "each sample alone" does not apply; what the dense
model means by it is a sum over its batch's *real* tokens (the padding mask weights every term).
Run on the kept layout with the padding mask gathered there (zero at the layout's padding slots),
every such sum sees exactly the kept tokens: the same value the dense model computes on the batch of
kept subsequences, right-padded, with an attention mask marking them real.

`find_reductions` proves that from the graph. The router logits are region intermediates that leave
their region; every node that reads them outside the regions (forward), and every token-indexed
node those read (backward, up to the padding mask), forms `Reductions.nodes`, replayed on the kept
layout by the rewrite. Each token-indexed node must be token-wise by the op table, or a *masked
reduction*: a sum over every token (and sample) of a value that is zero wherever the padding mask
is zero (`_masked`: the mask itself, its re-views, a product with it), or a scatter_add of such a
value into a buffer without a token axis (index: a token-wise value of the same shape). Refused
(`TOKEN_MIXING`): a reduction over tokens of an unmasked value (``histc`` of every row, a mean: a
model that does not pass its attention mask counts padding), a size of the batch used as a number,
a reduction's value flowing back into the decoder or the logits (there the region intermediate is
an escaping value, as any other).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.passes.kernels import MARKERS
from regate_fx.report import Reason

__all__ = ["Reductions", "find_reductions"]

# Ops after which a value that is zero at padding is still zero there, at the same token.
_PLACEMENTS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "bool",
    "long",
    "int",
    "type_as",
    "contiguous",
    "clone",
    "repeat_interleave",
    "permute",
    "transpose",
}
_PRODUCTS = {"mul", "mul_", "imul", "and_", "iand", "logical_and", "bitwise_and"}


@dataclass
class Reductions:
    """The nodes that reduce per-token region values over the batch (a router's aux loss)."""

    nodes: list[fx.Node]  # graph order; replayed on the kept layout
    seeds: set[fx.Node]  # the region intermediates they read (every layer's router logits)
    padding: fx.Node | None  # the 2-D attention mask placeholder: gathered zero at padding slots

    def __contains__(self, n: object) -> bool:
        return n in self._set

    def __post_init__(self) -> None:
        self._set = set(self.nodes)


@dataclass
class Problem:
    node: fx.Node
    reason: Reason
    detail: str


def find_reductions(
    graph: fx.Graph,
    members: set[fx.Node],
    stream: set[fx.Node],
    verdict,
    sym: TokenSymbols,
    padding: fx.Node | None,
) -> tuple[Reductions | None, Problem | None]:
    """The reductions of region intermediates over the batch (module doc), or why they are not exact.

    Args:
        members: every node of every region; `stream`: the stream's nodes.
        verdict: the analysis' node -> `Verdict` (along the token and batch axes).
        padding: the placeholder of the 2-D attention mask (the only source of "zero at padding").

    Returns (None, None) when no region intermediate is read outside its region.
    """
    decoder = members | stream
    seeds = {n for n in members if n not in stream and any(u not in members and u.op != "output" for u in n.users)}
    if not seeds:
        return None, None
    # forward: everything the seeds reach outside the decoder, up to the graph's output
    forward: set[fx.Node] = set()
    todo = [u for s in seeds for u in s.users if u not in members]
    while todo:
        u = todo.pop()
        if u in forward or u.op == "output":
            continue
        if u in decoder or u.op not in ("call_function", "call_method") or u.target in MARKERS:
            return None, None  # back into the decoder or its logits: an escaping value (analyse.py refuses it)
        forward.add(u)
        todo.extend(u.users)
    # backward: the tensors they read that are computed outside the decoder (the flattened padding
    # mask, its sum: the number of rows), replayed with them
    nodes = set(forward)
    todo = list(forward)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in nodes or a in decoder or a.op != "call_function" and a.op != "call_method":
                continue
            if isinstance(node_value(a), torch.Tensor):
                nodes.add(a)
                todo.append(a)
    order = {n: i for i, n in enumerate(graph.nodes)}
    ordered = sorted(nodes, key=order.__getitem__)
    masked: set[fx.Node] = set()
    for n in ordered:
        problem = _judge(n, verdict, sym, padding, masked, seeds | nodes)
        if problem is not None:
            return None, problem
    return Reductions(ordered, seeds, padding), None


def _judge(
    n: fx.Node, verdict, sym: TokenSymbols, padding: fx.Node | None, masked: set[fx.Node], known: set[fx.Node]
) -> Problem | None:
    """Why `n` is not exact on the kept layout, or None; records in `masked` whether it is zero at padding."""
    v = node_value(n)
    if isinstance(v, (torch.SymInt, torch.SymFloat)) and (sym.size_has_seq(v) or _batched_size(v, sym)):
        return Problem(
            n,
            Reason.SYMBOLIC_SIZE,
            f"'{n.name}' uses a size of the batch as a number: on the kept "
            "layout it would count the layout's slots, not the batch's real tokens",
        )
    if _masked(n, padding, masked):
        masked.add(n)
    if any(u.op == "output" for u in n.users) and _tokened(v, sym):
        return Problem(n, Reason.ESCAPING_VALUE, f"'{n.name}' (one value per token) is returned by the graph")
    if _masked_reduction(n, sym, masked):
        return None
    vd = verdict(n)
    if vd.token_wise:
        return None
    reduces = any(_tokened(node_value(a), sym) for a in n.all_input_nodes) and not _tokened(v, sym)
    if reduces:
        return Problem(
            n,
            Reason.TOKEN_MIXING,
            f"'{n.name}' ({op_name(n)}) reduces per-token values over the "
            "batch without the padding mask weighting every term (a model that does not pass its "
            "attention mask to the auxiliary loss counts padding rows): no kept-token equivalent; "
            "pass output_router_logits=False",
        )
    assert vd.reason is not None  # every refusing verdict names its reason
    return Problem(n, vd.reason, f"{vd.detail} (node '{n.name}')")


def _tokened(v, sym: TokenSymbols) -> bool:
    """Whether a tensor has a token axis or a batch axis (a per-sample value is not a batch total)."""
    return isinstance(v, torch.Tensor) and any(sym.has_seq(s) or _batched_size(s, sym) for s in v.shape)


def _batched_size(s, sym: TokenSymbols) -> bool:
    if not isinstance(s, (torch.SymInt, torch.SymFloat)):
        return False
    free = getattr(sym.canon(s), "free_symbols", set()) if isinstance(s, torch.SymInt) else s.node.expr.free_symbols
    return bool(free & getattr(sym.batch, "free_symbols", set()))


def _masked(n: fx.Node, padding: fx.Node | None, masked: set[fx.Node]) -> bool:
    """Zero wherever the padding mask is zero, at the same token: the mask, its re-views and casts,
    a product with such a value, `where(m, x, 0)` on one."""
    if padding is None:
        return False
    name = op_name(n)
    first = n.args[0] if n.args else None
    if name in _PLACEMENTS or name == "getitem" and _inserts_axes(n.args[1] if len(n.args) > 1 else None):
        return first is padding or first in masked
    if name in _PRODUCTS:
        return any(a is padding or a in masked for a in n.args if isinstance(a, fx.Node))
    if name == "where" and len(n.args) == 3:
        other = n.args[2]
        return (first is padding or first in masked) and isinstance(other, (int, float)) and other == 0
    return False


def _inserts_axes(index) -> bool:
    """An index that only adds axes (`mask[:, None]`): every element stays where it was."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def _masked_reduction(n: fx.Node, sym: TokenSymbols, masked: set[fx.Node]) -> bool:
    """A sum over every token and sample of a value zero at padding, or a scatter_add of one into a
    buffer without a token axis: on the kept layout, a sum over exactly the kept tokens."""
    name = op_name(n)
    out = node_value(n)
    if not isinstance(out, torch.Tensor) or _tokened(out, sym):
        return False
    if name == "sum":
        return bool(n.args) and n.args[0] in masked
    if name in ("scatter_add", "scatter_add_") and len(n.args) >= 4:
        target, index, src = n.args[0], n.args[2], n.args[3]
        if not (isinstance(target, fx.Node) and isinstance(index, fx.Node) and isinstance(src, fx.Node)):
            return False
        iv, sv = node_value(index), node_value(src)
        return (
            src in masked
            and not _tokened(node_value(target), sym)
            and isinstance(iv, torch.Tensor)
            and isinstance(sv, torch.Tensor)
            and tuple(iv.shape) == tuple(sv.shape)
        )
    return False
