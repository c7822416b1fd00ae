"""Expert-major tiled MoE, proven per token (`expert_tiling`).

Llama 4's experts (`Llama4TextMoe`) run every token through every expert, as one batched matmul
over an (E, N, D) view of the token rows tiled E times:

    x = h.reshape(-1, D)                                        # (N, D): N = B*T token rows
    scores = sigmoid(full_like(logits, -inf).scatter(1, top_i, top_v))   # (N, E): per token
    r = x.repeat(E, 1)                                          # (E*N, D): row e*N + n is x[n]
    r = r * scores.transpose(0, 1).reshape(-1, 1)               # (E*N, 1): row e*N + n is scores[n, e]
    y = bmm(act(bmm(r.view(E, -1, D), W1)), W2)                 # (E, N, D): expert e on row n
    out = shared(x) + y.view(-1, D).reshape(E, -1, D).sum(0)    # (N, D): summed over the experts

`repeat` tiles the token axis, which the op table refuses on its own (`x.repeat(2, 1)` followed
by anything that reads the tiles token-major moves tokens). Here every value between the tiling
and the sum has a known *layout* in which element (e, n, ...) depends on token n alone:

- *flat*: dim 0 of size E*N, expert-major (row e*N + n), the other dims hidden;
- *split*: dims (E, N, ...) with the token axis second, the other dims hidden.

The proof follows every use of every such value and accepts only ops that keep that invariant:

- the tiling itself, `x.repeat(E, 1, ..)` of a tensor whose only token axis is dim 0 (N rows);
- a per-(expert, token) factor: a reshape into the flat layout of a tensor judged by the op table
  whose logical shape is (E, N, ...), the token axis second (`scores.transpose(0, 1)`: row e*N + n
  is token n's score for expert e);
- reshapes between the flat and the split layout (row-major: (E*N, ...) <-> (E, N, ...)), casts;
- pointwise ops whose other operands are in the same layout or carry no token axis (weights,
  numbers);
- a batched matmul or linear of a split or flat value by weights without a token axis, over a
  hidden axis (`bmm((E, N, D), (E, D, F))`: expert e's weights on row (e, n));
- chunk / split along a hidden axis, and the items of its result;
- the exit: a sum or mean over the expert axis (dim 0) of a split value, which is (N, ...) with
  the token axis first, as ordinary per-token rows again.

Anything else that reads a tiled value (a sum over the tokens, a view that reads the tiles
token-major as (N, E, ...), a factor laid out token-major, a slice, a use by the graph's output)
leaves the construct unproven, and the op table refuses its `repeat` as before. On the kept tokens
the same code tiles the kept rows: each of their rows gets the same result.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.passes.overloads import is_pointwise
from regate_fx.passes.placement import token_block

__all__ = ["expert_tiling"]

FLAT, SPLIT = "flat", "split"
_RESHAPES = frozenset({"view", "reshape"})
_SAME = frozenset({"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach"})
_ACTIVATIONS = frozenset({"relu", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "mish", "softplus", "leaky_relu"})
_MATMUL = frozenset({"bmm", "matmul"})
_SPLITS = {"chunk": 2, "split": 2, "split_with_sizes": 2, "unbind": 1}
_SIZES = frozenset({"size", "dim", "numel", "sym_size_int"})
_EXIT = frozenset({"sum", "mean"})


def expert_tiling(graph: fx.Graph, sym: TokenSymbols) -> set[fx.Node]:
    """The nodes of every expert-major tiling of `graph` proven per token (module docstring): the
    repeat, the factors' reshapes, every value in the tiled layouts and the sums that end them."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if op_name(n) == "repeat":
            proven = _prove(n, sym)
            if proven:
                out |= proven
    return out


def _value(n: Any) -> Any:
    return node_value(n) if isinstance(n, fx.Node) else None


def _hidden(shape: Any, start: int) -> int | None:
    """The number of elements of the hidden dims `shape[start:]`, when they are static."""
    rest = list(shape[start:])
    return math.prod(rest) if all(isinstance(s, int) for s in rest) else None


class _Tiling:
    def __init__(self, sym: TokenSymbols, experts: int, rows: Any):
        self.sym, self.experts, self.rows = sym, experts, rows  # E, and N (canonical)
        self.layout: dict[fx.Node, str] = {}

    def kind(self, v: Any) -> str | None:
        """The layout a tensor's shape reads as: flat (E*N, ...) or split (E, N, ...)."""
        sym = self.sym
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        tok = sym.token_dims(v)
        if tok == (0,) and sym.canon(v.shape[0]) == self.experts * self.rows and v.dim() >= 1:
            return FLAT
        if tok == (1,) and v.dim() >= 2 and v.shape[0] == self.experts and sym.canon(v.shape[1]) == self.rows:
            return SPLIT
        return None

    def hidden(self, v: torch.Tensor, kind: str) -> int | None:
        return _hidden(v.shape, 1 if kind == FLAT else 2)

    def factor(self, a: fx.Node) -> list[fx.Node] | None:
        """`a` a flat per-(expert, token) factor: a reshape (then casts) of a tensor judged by the op
        table whose logical shape is (E, N, ...). The reshape and the casts, or None."""
        chain = []
        n: Any = a
        for _ in range(8):
            if op_name(n) in _SAME and n.args and isinstance(n.args[0], fx.Node):
                chain.append(n)
                n = n.args[0]
                continue
            break
        if op_name(n) not in _RESHAPES or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        src, out = _value(n.args[0]), _value(n)
        if self.kind(out) != FLAT or self.kind(src) != SPLIT:
            return None  # (N, E) read as (N*E, 1) is token-major: row e*N + n would be another token's
        h_out, h_src = self.hidden(out, FLAT), self.hidden(src, SPLIT)
        if h_out is None or h_out != h_src:
            return None
        return [n, *reversed(chain)]


def _dims(dim: Any, nd: int) -> list[int] | None:
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in dims):
        return None
    return sorted(d % nd for d in dims)


def _prove(rep: fx.Node, sym: TokenSymbols) -> set[fx.Node] | None:
    x = rep.args[0] if rep.args else None
    xv = _value(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() < 1 or sym.token_dims(xv) != (0,):
        return None
    rows = sym.canon(xv.shape[0])
    if token_block(rows, sym) != 1:
        return None  # x's rows are tokens themselves (T or B*T), not blocked slots
    sizes = rep.args[1] if len(rep.args) == 2 and isinstance(rep.args[1], (list, tuple)) else rep.args[1:]
    reps = list(sizes)
    if len(reps) != xv.dim() or not all(isinstance(r, int) for r in reps) or reps[1:] != [1] * (xv.dim() - 1):
        return None
    experts = reps[0]
    if experts < 2:
        return None
    t = _Tiling(sym, experts, rows)
    if t.kind(_value(rep)) != FLAT:
        return None
    t.layout[rep] = FLAT
    proven: set[fx.Node] = {rep}
    work = [rep]
    waiting: dict[fx.Node, fx.Node] = {}  # a pointwise use whose other operand is not reached yet
    while work or waiting:
        if not work:  # retry the waiting uses once every value reachable now has its layout
            retry, waiting = waiting, {}
            for u, node in retry.items():
                ok = u in proven or _use(t, node, u, proven, work)
                if ok is None:
                    waiting[u] = node
                elif not ok:
                    return None
            if not work and len(waiting) == len(retry):
                return None  # an operand never reached: not a value of the tiling, not a factor
            continue
        node = work.pop()
        for u in list(node.users):
            if u in proven:
                continue
            ok = _use(t, node, u, proven, work)
            if ok is None:
                waiting[u] = node
            elif not ok:
                return None
    return proven


def _use(t: _Tiling, node: fx.Node, u: fx.Node, proven: set[fx.Node], work: list[fx.Node]) -> bool | None:
    """Whether `u`, a use of the tiled value `node`, keeps the layout invariant; records what it adds.
    None: not yet known (a pointwise op whose other operand may be a tiled value not reached yet)."""
    sym = t.sym
    name = op_name(u)
    uv = _value(u)
    kind = t.layout[node]

    def add(n: fx.Node, k: str) -> None:
        t.layout[n] = k
        proven.add(n)
        work.append(n)

    if u.op == "output":
        return False
    if name in _SIZES:
        return True  # a size carries no token data (a number derived from it is judged where it is used)
    if kind == "tuple":  # the items of a chunk of a tiled value
        if name != "getitem" or not isinstance(u.args[1], int):
            return False
        k = t.kind(uv)
        if k is None:
            return False
        add(u, k)
        return True
    if u.op not in ("call_function", "call_method"):
        return False
    if name in _RESHAPES or name in _SAME:
        if u.args[0] is not node:
            return False
        k = t.kind(uv)
        if k is None or t.hidden(uv, k) is None or t.hidden(uv, k) != t.hidden(_value(node), kind):
            return False
        add(u, k)
        return True
    if name in _SPLITS:
        dim = u.args[_SPLITS[name]] if len(u.args) > _SPLITS[name] else u.kwargs.get("dim", 0)
        nd = _value(node).dim()
        if u.args[0] is not node or not isinstance(dim, int) or dim % nd < (1 if kind == FLAT else 2):
            return False
        add(u, "tuple")
        return True
    if name in _MATMUL or name == "linear":
        w = u.args[1] if len(u.args) > 1 else None
        wv = _value(w)
        nd = _value(node).dim()
        if u.args[0] is not node or not isinstance(wv, torch.Tensor) or sym.token_dims(wv):
            return False
        if nd < (2 if kind == FLAT else 3) or t.kind(uv) != kind:
            return False  # the contraction must run over a hidden axis, not the expert or token axis
        if name in _MATMUL and wv.dim() == 3 and not (kind == SPLIT and nd == 3 and wv.shape[0] == t.experts):
            return False  # a batched matmul pairs expert e's weights with split row (e, n)
        if name in _MATMUL and wv.dim() not in (2, 3):
            return False
        if name == "linear" and any(
            isinstance(_value(a), torch.Tensor) and sym.token_dims(_value(a)) for a in u.args[2:]
        ):
            return False
        add(u, kind)
        return True
    if name in _EXIT:
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
        keep = u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)
        nd = _value(node).dim()
        if u.args[0] is not node or kind != SPLIT or dim is None or _dims(dim, nd) != [0] or keep:
            return False
        if not isinstance(uv, torch.Tensor) or sym.token_dims(uv) != (0,) or sym.canon(uv.shape[0]) != t.rows:
            return False
        proven.add(u)  # per-token rows again: judged by the op table from here on
        return True
    if is_pointwise(u) or name in _ACTIVATIONS:
        k = t.kind(uv)
        if k is None or uv.dim() != _value(node).dim():
            return False
        factors: list[list[fx.Node]] = []
        for a in u.all_input_nodes:
            av = _value(a)
            if a in t.layout:
                if t.layout[a] != k or av.dim() != uv.dim():
                    return False
            elif isinstance(av, torch.Tensor) and sym.token_dims(av):
                chain = t.factor(a) if k == FLAT and av.dim() == uv.dim() else None
                if chain is None:
                    # another value on the token axis: a tiled value reached later, or refused
                    return None if t.kind(av) == k else False
                factors.append(chain)
        for chain in factors:
            for n in chain:
                if n not in proven:
                    add(n, FLAT)
        add(u, k)
        return True
    return False
