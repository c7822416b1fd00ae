"""Token-choice expert dispatch by sorting, proven per token (`expert_dispatch`).

transformers' default experts (`integrations/moe.py`, `grouped_mm`: Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, GLM-4-MoE, ...) flatten each token's k (token, slot) pairs into S = N*k rows, sort the
rows by expert, run each expert's rows as one group of a grouped matmul and put the rows back with
the inverse permutation:

    keys = topk(scores, k, dim=-1).indices.reshape(-1)         # (S,) each row's expert, in [0, E)
    sorted_keys, perm = sort(keys)                              # (S,), (S,)
    x_g = x[perm // k]; w_g = w[perm]                           # (S, D), (S,): rows in expert order
    offs = cumsum(histc(sorted_keys.float(), bins=E, min=0, max=E - 1), 0)   # (E,) group ends
    y_g = grouped_mm(x_g, W, offs=offs)                         # row i: x_g[i] @ W[sorted_keys[i]]
    inv = empty_like(perm); inv[perm] = arange(S)               # the inverse permutation
    y = y_g[inv]                                                # (S, D), back in (token, slot) order

The sort reads every token, but the result does not depend on it: row i of `y` is the row-wise
function of row i alone, applied with row i's own expert. So on the kept tokens the same code sorts
fewer rows and gives every kept row the same result, and the router and the experts run on kept
tokens only. The proof checks each step of that argument from the graph:

- the keys are a topk's indices over an axis of E experts, flattened token-major (each token's k
  rows together: `placement.token_block`);
- `perm` is used only to read rows (`x[perm // k]` of a tensor of S/k rows, `w[perm]` of S rows) and
  to build `inv` (`empty_like(perm)`, written once as `inv[perm] = arange(S)`, then only read as an
  index of rows);
- the group ends are `cumsum(histc(sorted_keys, bins=E, min=0, max=E-1))` and used only as the
  `offs` of grouped matmuls whose weights have E groups;
- between the sort and `y_g[inv]`, values in expert order meet only values in expert order (no
  row of expert order is combined with a row in token order), and none leaves unpermuted.

Everything else in expert order is judged by the op table as usual (row-wise ops pass, anything
reading other rows is refused). A dispatch that fails any check is not proven and its `sort` is
refused by the table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.passes.placement import token_block

__all__ = ["GROUPED_MM", "expert_dispatch"]

#: grouped matmuls with `offs` group ends: torch's, and transformers' CPU fallback op
GROUPED_MM = frozenset({"grouped_mm", "_grouped_mm", "grouped_mm_fallback"})
_PLACE = frozenset({"view", "reshape", "flatten", "to", "long", "int", "contiguous", "clone"})
_CAST = frozenset({"float", "to", "int", "long", "double", "half", "bfloat16"})


def expert_dispatch(graph: fx.Graph, sym: TokenSymbols) -> set[fx.Node]:
    """The nodes of every sorted expert dispatch of `graph` that is proven per token (see the module
    docstring): the sort, the row reads by the permutation, the group ends, the grouped matmuls, the
    inverse permutation and the reads by it. Empty when there is none."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if op_name(n) == "sort":
            proven = _prove(n, sym)
            if proven:
                out |= proven
    return out


def _value(n: Any) -> Any:
    return node_value(n) if isinstance(n, fx.Node) else None


def _rows(v: Any, sym: TokenSymbols) -> Any:
    """The canonical size of a tensor's first dim when it is a (possibly blocked) token axis."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or 0 not in sym.token_dims(v):
        return None
    size = sym.canon(v.shape[0])
    return size if token_block(size, sym) is not None else None


def _getitems(n: fx.Node) -> dict[int, fx.Node] | None:
    out = {}
    for u in n.users:
        if op_name(u) != "getitem" or not isinstance(u.args[1], int):
            return None
        out[u.args[1]] = u
    return out


def _expert_count(keys: fx.Node) -> int | None:
    """E when `keys` is a topk's indices over an axis of E experts, flattened or cast."""
    n: Any = keys
    for _ in range(8):
        if op_name(n) in _PLACE and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
            continue
        break
    if op_name(n) != "getitem" or n.args[1] != 1 or op_name(n.args[0]) != "topk":
        return None
    top: Any = n.args[0]
    x = _value(top.args[0])
    dim = top.args[2] if len(top.args) > 2 else top.kwargs.get("dim", -1)
    if not isinstance(x, torch.Tensor) or not isinstance(dim, int):
        return None
    size = x.shape[dim]
    return size if isinstance(size, int) else None


def _prove(sort: fx.Node, sym: TokenSymbols) -> set[fx.Node] | None:
    keys = sort.args[0] if sort.args else None
    kv = _value(keys)
    dim = sort.args[1] if len(sort.args) > 1 else sort.kwargs.get("dim", -1)
    if not isinstance(keys, fx.Node) or not isinstance(kv, torch.Tensor) or kv.dim() != 1 or dim not in (0, -1):
        return None
    if sort.kwargs.get("descending") or (len(sort.args) > 2 and sort.args[2]):
        return None
    rows = _rows(kv, sym)
    experts = _expert_count(keys)
    if rows is None or experts is None:
        return None
    outs = _getitems(sort)
    if outs is None or 1 not in outs:
        return None
    perm, skeys = outs[1], outs.get(0)
    proven: set[fx.Node] = {sort, *outs.values()}
    sorted_src: set[fx.Node] = set()
    inverse: set[fx.Node] = set()
    for u in list(perm.users):
        name = op_name(u)
        if name == "floordiv" and u.args[0] is perm and isinstance(u.args[1], int) and u.args[1] >= 1:
            for r in u.users:  # x[perm // k]: row perm[i] // k of the (S/k)-row tensor x
                if not (op_name(r) == "getitem" and r.args[1] is u and _rows(_value(r.args[0]), sym) is not None):
                    return None
                if sym.canon(_value(r.args[0]).shape[0]) * u.args[1] != rows:
                    return None
                sorted_src.add(r)
            proven |= {u, *u.users}
        elif name == "getitem" and u.args[1] is perm:  # w[perm]: a row of S rows
            if _rows(_value(u.args[0]), sym) != rows:
                return None
            sorted_src.add(u)
            proven.add(u)
        elif name in ("empty_like", "zeros_like") and u.args[0] is perm:
            inv = _inverse(u, perm, rows, sym)
            if inv is None:
                return None
            proven |= inv[0]
            inverse |= inv[1]
        elif name == "setitem" and u.args[1] is perm:
            continue  # checked with its buffer
        else:
            return None
    if not inverse:
        return None
    if skeys is not None:
        ends = _group_ends(skeys, experts, sym)
        if ends is None:
            return None
        proven |= ends
        sorted_src.add(skeys)
    if not _orders_agree(sort, sorted_src, inverse, proven, sym):
        return None
    return proven


def _inverse(buf: fx.Node, perm: fx.Node, rows: Any, sym: TokenSymbols) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """`inv = empty_like(perm); inv[perm] = arange(S)`, then `z[inv]` reads: (nodes, reads)."""
    writes = [u for u in buf.users if op_name(u) == "setitem"]
    if len(writes) != 1:
        return None
    (w,) = writes
    a = w.args[2] if len(w.args) > 2 else None
    av = _value(a)
    if not isinstance(a, fx.Node) or w.args[0] is not buf or w.args[1] is not perm or op_name(a) != "arange":
        return None
    if not isinstance(av, torch.Tensor):
        return None
    if len(a.args) != 1 or a.kwargs.get("start", 0) != 0 or a.kwargs.get("step", 1) != 1:
        return None
    if av.dim() != 1 or sym.canon(av.shape[0]) != rows:
        return None
    order = {n: i for i, n in enumerate(buf.graph.nodes)}
    reads = set()
    for u in buf.users:
        if u is w:
            continue
        if op_name(u) != "getitem" or u.args[1] is not buf or order[u] < order[w]:
            return None
        if _rows(_value(u.args[0]), sym) != rows:
            return None
        reads.add(u)
    return ({buf, w, a} | reads, reads) if reads else None


def _group_ends(skeys: fx.Node, experts: int, sym: TokenSymbols) -> set[fx.Node] | None:
    """`offs = cumsum(histc(sorted_keys.float(), bins=E, min=0, max=E-1))`, used only as the group
    ends of grouped matmuls whose weights have E groups. Other uses of the sorted keys (a per-row
    bias lookup `b[sorted_keys]`) are rows in expert order, judged as such."""
    nodes: set[fx.Node] = set()
    frontier = [skeys]
    hists = []
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if op_name(u) in _CAST and u.args[0] is n:
                nodes.add(u)
                frontier.append(u)
            elif op_name(u) == "histc":
                hists.append(u)
    for h in hists:
        kw = dict(zip(("bins", "min", "max"), h.args[1:]))
        kw.update(h.kwargs)
        if (kw.get("bins"), kw.get("min"), kw.get("max")) != (experts, 0, experts - 1):
            return None
        for c in h.users:
            if op_name(c) != "cumsum" or (c.args[1] if len(c.args) > 1 else c.kwargs.get("dim")) not in (0, -1):
                return None
            for g in c.users:
                if op_name(g) not in GROUPED_MM or g.kwargs.get("offs") is not c:
                    return None
                wv = _value(g.args[1]) if len(g.args) > 1 else None
                if not isinstance(wv, torch.Tensor) or wv.dim() != 3 or wv.shape[0] != experts or sym.token_dims(wv):
                    return None
                nodes.add(g)
            nodes.add(c)
        nodes.add(h)
    return nodes if hists else None


def _orders_agree(
    sort: fx.Node, sorted_src: set[fx.Node], inverse: set[fx.Node], proven: set[fx.Node], sym: TokenSymbols
) -> bool:
    """Values in expert order meet only values in expert order, and reach nothing unpermuted."""
    expert_order: set[fx.Node] = set(sorted_src)
    # the permutation, its inverse and the group ends carry no rows of either order
    internal = {n for n in proven if n not in sorted_src and n not in inverse and op_name(n) not in GROUPED_MM}
    started = False
    for n in sort.graph.nodes:
        if n is sort:
            started = True
            continue
        if not started or n in sorted_src or n in inverse:
            continue
        ins = [a for a in n.all_input_nodes if a not in internal]
        if not any(a in expert_order for a in ins):
            continue
        if n.op == "output":
            return False
        others = [
            a
            for a in ins
            if a not in expert_order and isinstance(_value(a), torch.Tensor) and sym.token_dims(_value(a))
        ]
        if others:
            return False  # a row in expert order combined with a row in token order
        if n not in proven or op_name(n) in GROUPED_MM:
            expert_order.add(n)
    for r in inverse:  # the reads by the inverse permutation read rows in expert order
        if r.args[0] not in expert_order:
            return False
    return True
