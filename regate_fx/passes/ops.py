"""What each op does along the token axis: one table, one rule per op.

The rewrite replays a branch on the kept tokens only. That is exact when every op in the branch
either treats tokens independently (pointwise ops, linears over the hidden axis, norms over the
hidden axis, reshapes that keep the token axis whole) or is attention, whose key axis the rewrite
masks for the padded kept layout. Anything else that touches the token axis (a convolution or
cumsum along the sequence, a reduction over it, a slice of it, a reshape that splits it, an op
this table does not know) is refused: the report names the node and why.

`classify(node, sym)` resolves the op to the overload actually called (`max(x, dim)` is a
reduction, `max(x, y)` is pointwise: both are `aten::max`), then looks its rule up in `RULES`.
Unknown ops refuse. Every rule has a unit test (tests/passes/test_ops.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.report import Reason

__all__ = [
    "RULES",
    "Verdict",
    "classify",
    "called_overloads",
    "higher_order_detail",
    "identity_index",
    "length_scalar_problem",
    "role_free",
    "role_strides",
    "same_place",
]


@dataclass(frozen=True)
class Verdict:
    """Result of classifying a node. `attention` is 'sdpa', 'softmax' or 'pv' for attention pieces."""

    ok: bool
    attention: str | None = None
    reason: Reason | None = None
    detail: str = ""

    @property
    def token_wise(self) -> bool:
        """Exact at full length and on any subset of tokens alike (no attention, no mixing)."""
        return self.ok and self.attention is None


OK = Verdict(True)


def _mix(detail: str) -> Verdict:
    return Verdict(False, reason=Reason.TOKEN_MIXING, detail=detail)


def _unsupported(detail: str) -> Verdict:
    return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail=detail)


# --- resolving the overload actually called -------------------------------------------------

# Python operators dynamo records, mapped to the aten op whose overloads we read.
_OPERATOR_ALIASES = {
    "truediv": "div",
    "itruediv": "div",
    "floordiv": "floor_divide",
    "ifloordiv": "floor_divide",
    "iadd": "add",
    "isub": "sub",
    "imul": "mul",
    "and_": "bitwise_and",
    "or_": "bitwise_or",
    "xor": "bitwise_xor",
    "invert": "bitwise_not",
    "inv": "bitwise_not",
    "mod": "remainder",
    "ipow": "pow",
    "iand": "bitwise_and",
    "ior": "bitwise_or",
    "pos": "positive",
    "getattr": "",
}


def _kind(value: Any) -> str:
    """The schema kind of one argument of the call: tensor, int, float, bool, none, list, other."""
    if isinstance(value, fx.Node):
        value = node_value(value)
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (bool, torch.SymBool)):
        return "bool"
    if isinstance(value, (int, torch.SymInt)):
        return "int"
    if isinstance(value, (float, torch.SymFloat)):
        return "float"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "list"
    return "other"


_ACCEPTS = {
    "TensorType": {"tensor"},
    "IntType": {"int", "bool"},
    "SymIntType": {"int", "bool"},
    "FloatType": {"float", "int"},
    "NumberType": {"int", "float", "bool"},
    "BoolType": {"bool", "int"},
    "ListType": {"list"},
}


def _binds(schema, arg_kinds: tuple[str, ...], kwarg_kinds: dict[str, str]) -> bool:
    """Whether a call with arguments of these kinds (`_kind`) binds to `schema` (arity, names and
    argument kinds)."""
    params = list(schema.arguments)
    positional = [p for p in params if not p.kwarg_only]
    if len(arg_kinds) > len(positional) or any(p.name == "out" for p in params):
        return False
    names = {p.name for p in params}
    if any(k not in names for k in kwarg_kinds):
        return False
    given = {p.name: a for p, a in zip(positional, arg_kinds)} | kwarg_kinds
    for p in params:
        if p.name not in given:
            if not p.has_default_value():
                return False
            continue
        kind, tk = given[p.name], p.type.kind()
        if tk == "OptionalType":
            if kind == "none":
                continue
            tk = p.type.getElementType().kind()
        if tk in _ACCEPTS and kind not in _ACCEPTS[tk]:
            return False
        if tk not in _ACCEPTS and kind == "tensor":  # dtype, device, str, ...: never a tensor
            return False
    return True


@lru_cache(maxsize=4096)
def _overloads(name: str, arg_kinds: tuple[str, ...], kwarg_kinds: tuple[tuple[str, str], ...]) -> tuple:
    """The overloads of aten.<name> a call with arguments of these kinds binds to (memoised: a
    24-layer graph asks the same few questions thousands of times)."""
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return ()
    ops = (getattr(packet, o) for o in packet.overloads())
    return tuple(op for op in ops if _binds(op._schema, arg_kinds, dict(kwarg_kinds)))


def called_overloads(node: fx.Node) -> list[torch._ops.OpOverload]:
    """The aten overloads a call_function / call_method node can bind to (usually one)."""
    name = op_name(node)
    name = _OPERATOR_ALIASES.get(name, name)
    if not name:
        return []
    kinds = tuple(_kind(a) for a in node.args)
    if getattr(node.target, "__module__", None) == "_operator" and len(kinds) == 2 and kinds[0] != "tensor":
        kinds = kinds[::-1]  # `0.5 * x` is recorded as mul(0.5, x): aten's schemas take the tensor first
    kwarg_kinds = tuple((k, _kind(v)) for k, v in node.kwargs.items() if k != "inplace")  # functional API only
    return list(_overloads(name, kinds, kwarg_kinds))


@lru_cache(maxsize=None)
def _tagged_pointwise(op: torch._ops.OpOverload) -> bool:
    return torch.Tag.pointwise in op.tags


def _is_pointwise(node: fx.Node) -> bool:
    """Pointwise when every overload the call can bind to carries aten's pointwise tag."""
    ops = called_overloads(node)
    return bool(ops) and all(_tagged_pointwise(o) for o in ops)


# --- helpers --------------------------------------------------------------------------------


def _arg(node: fx.Node, pos: int, key: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


def _dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not all(isinstance(d, int) for d in dims):
        return None
    return [d % ndim for d in dims] if ndim else []


@dataclass
class _Call:
    """What every rule reads: the node, its first tensor operand and token axes."""

    node: fx.Node
    sym: TokenSymbols
    name: str
    x: Any  # value of the first argument (a fake tensor, or whatever it is)
    nd: int
    x_tok: tuple[int, ...]


# --- the rules ------------------------------------------------------------------------------
# Each takes a _Call and returns a Verdict. Comments name the models a rule exists for.


def _token_wise(c: _Call) -> Verdict:
    return OK


def _reshape(c: _Call) -> Verdict:
    """view / reshape / flatten / unflatten: exact only while every token keeps its row, judged by
    memory order, not by sizes.

    (B, T, D) <-> (B*T, D) (OPT flattens the stream) and (B, T, H, d) <-> (B, T, H*d) keep each
    token's row; (B, T, D) -> (B, T/2, 2, D) splits it, and (B, T, D) -> (B, D, T) keeps the sizes
    but scrambles the tokens: refused. A token axis is identified by the number of elements after it
    in memory (its stride in a contiguous layout): the reshape keeps tokens in place exactly when the
    token axes (and the batch axes, for the order of a merged B*T axis) have the same strides before
    and after.
    """
    sym = c.sym
    out = node_value(c.node)
    if not (isinstance(c.x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return _unsupported(f"{c.name} of a non-tensor")
    for v in (c.x, out):
        for d in sym.token_dims(v):
            size = sym.canon(v.shape[d])
            if size != sym.seq and size != sym.batch * sym.seq:
                return _mix(f"{c.name} splits or merges the token axis (a dim of size {v.shape[d]})")
    if not same_place(c.x, out, sym, "seq"):
        return _mix(
            f"{c.name} {tuple(c.x.shape)} -> {tuple(out.shape)} keeps the sizes but moves tokens "
            "(the token axis changes place in memory)"
        )
    return OK


def role_strides(v: Any, sym: TokenSymbols, role: str) -> list[frozenset] | None:
    """Where the token axis (`role` "seq") or the batch axis ("batch") of a contiguous tensor lies in
    memory: the sorted strides of its dims of that axis, one entry per way of reading a merged B*T
    dim (batch outer or token outer). None when a dim merges the axis in another way.

    The batch axis may be merged with hidden dims, outermost ((B, H, T, d) -> (B*H, T, d): each
    sample's rows stay together); the token axis only with the batch axis (OPT's (B*T, D))."""
    if not isinstance(v, torch.Tensor):
        return None
    key = ("role_strides", id(v), role)
    hit = sym._memo.get(key)
    if hit is not None and hit[0] is v:
        return hit[1]
    out = _role_strides(v, sym, role)
    sym._memo[key] = (v, out)
    return out


def _role_strides(v: torch.Tensor, sym: TokenSymbols, role: str) -> list[frozenset] | None:
    import sympy

    seq, batch = sym.seq, sym.batch
    sizes = [sym.canon(s) for s in v.shape]
    if not any(getattr(s, "free_symbols", None) for s in sizes):
        return [()]  # static shape: neither axis
    role_syms = getattr(seq if role == "seq" else batch, "free_symbols", set())
    other_syms = getattr(batch if role == "seq" else seq, "free_symbols", set())
    options: list[list] = [[]]
    stride = sympy.Integer(1)
    for size in reversed(sizes):
        free = getattr(size, "free_symbols", set())
        if size == batch * seq and role_syms:
            options = [o + [stride] for o in options] + [
                o + [stride * (seq if role == "batch" else batch)] for o in options
            ]
        elif role_syms and free & role_syms:
            rest = size / (seq if role == "seq" else batch)  # a product: sympy cancels the factor
            if role == "seq" and rest != 1:
                return None
            if role == "batch" and (getattr(rest, "free_symbols", set()) & (role_syms | other_syms)):
                return None
            options = [o + [stride * rest] for o in options]
        stride = stride * size
    return [frozenset(Counter(o).items()) for o in options]  # products of symbols: canonical in sympy


def _same_strides(a, b) -> bool:
    return a is not None and b is not None and bool(set(a) & set(b))


def same_place(x: Any, out: Any, sym: TokenSymbols, role: str) -> bool:
    """Whether a reshape from `x` to `out` keeps the token axis (`role` "seq") or the batch axis
    ("batch") in place in memory. Fast path: the dims up to the last one of that axis are the same
    sizes in both (so the elements after it are as many too: same strides)."""
    if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
        dims = sym.token_dims(x) if role == "seq" else [i for i, s in enumerate(x.shape) if sym.is_batch(s)]
        if (
            dims
            and len(out.shape) > dims[-1]
            and all(sym.canon(a) == sym.canon(b) for a, b in zip(x.shape[: dims[-1] + 1], out.shape))
        ):
            if role == "seq" or len(dims) == sum(
                1
                for s in x.shape
                if getattr(sym.canon(s), "free_symbols", None) and sym.batch.free_symbols & sym.canon(s).free_symbols
            ):
                return True
    return _same_strides(role_strides(x, sym, role), role_strides(out, sym, role))


def _permute(c: _Call) -> Verdict:
    return OK  # transpose / permute / movedim: the token axis moves, every token stays whole


def _view_complex(c: _Call) -> Verdict:
    """view_as_complex / view_as_real pair up or split the last dim (Llama4's complex RoPE)."""
    if c.nd and (c.nd - 1) in c.x_tok:
        return _mix(f"{c.name} reinterprets the token axis")
    return OK


def _linear(c: _Call) -> Verdict:
    if c.nd and (c.nd - 1) in c.x_tok:
        return _mix("linear contracts the token axis")
    return OK


def _embedding(c: _Call) -> Verdict:
    """`embedding(idx, table)`: a lookup per token only when the table's rows are not themselves
    token-indexed content (a slice of the hidden states read at token-derived rows mixes tokens)."""
    table = _arg(c.node, 1, "weight")
    tv = node_value(table) if isinstance(table, fx.Node) else None
    if isinstance(tv, torch.Tensor) and c.sym.token_dims(tv):
        return _mix("embedding reads a table whose rows are token-indexed (hidden states, not parameters)")
    return OK


def _gather(c: _Call) -> Verdict:
    """`gather(table, dim, index)`: out[..., j, ...] = table[..., index[..., j, ...], ...] along `dim`,
    the same coordinate elsewhere: a lookup per position unless `dim` is a token axis of the table
    (BERT reads its token-type buffer at the position ids)."""
    dims = _dims(_arg(c.node, 1, "dim"), c.nd)
    if dims is None:
        return _unsupported(f"{c.name} with a symbolic dim")
    if set(dims) & set(c.x_tok):
        return _mix(f"{c.name} reads other positions along the token axis")
    return OK


def _matmul(c: _Call) -> Verdict:
    n = c.node
    if c.name in ("addmm", "baddbmm", "addbmm"):
        # bias + a @ b: GPT-2's Conv1D projection (addmm), Bloom's ALiBi scores (baddbmm).
        a = _arg(n, 1, "mat1" if c.name == "addmm" else "batch1")
        b = _arg(n, 2, "mat2" if c.name == "addmm" else "batch2")
    else:
        a, b = n.args[0], n.args[1]
    av, bv = node_value(a), node_value(b)
    if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor)):
        return _unsupported("matmul with a non-tensor operand")
    a_tok, b_tok = c.sym.token_dims(av), c.sym.token_dims(bv)
    contract_a = av.dim() - 1
    contract_b = bv.dim() - 2 if bv.dim() >= 2 else 0
    if contract_a not in a_tok and contract_b not in b_tok:
        return OK  # q @ k^T, or x @ W: the contraction runs over a hidden axis
    if len(a_tok) >= 2 and contract_a in a_tok and contract_b in b_tok:
        if av.dim() >= 3 and c.sym.is_batch(av.shape[0]) and c.sym.is_seq(av.shape[-1]):
            return Verdict(True, attention="pv")  # weights (B, ..., Tq, Tk) @ values: the read-out
        return Verdict(
            False, reason=Reason.ATTENTION_FORM, detail="attention weights are not (batch, ..., queries, keys)"
        )
    return _mix("matmul contracts the token axis outside attention")


def _softmax(c: _Call) -> Verdict:
    dims = _dims(_arg(c.node, 1, "dim"), c.nd)
    if dims is None:
        return _unsupported(f"{c.name} with an implicit dim")
    if not set(dims) & set(c.x_tok):
        return OK
    x = c.x
    if (
        len(c.x_tok) >= 2
        and c.nd == 4
        and dims == [c.nd - 1]
        and c.x_tok[-1] == c.nd - 1
        and c.sym.is_batch(x.shape[0])
    ):
        return Verdict(True, attention="softmax")
    return _mix(f"{c.name} over the token axis outside an attention score matrix")


def _sdpa(c: _Call) -> Verdict:
    n, sym = c.node, c.sym
    key, value, mask = (
        node_value(a) if isinstance(a, fx.Node) else a
        for a in (_arg(n, 1, "key"), _arg(n, 2, "value"), _arg(n, 3, "attn_mask"))
    )
    if isinstance(key, torch.Tensor) and not sym.token_dims(key) and not sym.token_dims(value):
        # Cross-attention (Mllama): keys and values are another sequence (image tokens), so each
        # query row reads only its own mask row: token-wise over the queries.
        q_ok = isinstance(c.x, torch.Tensor) and c.x.dim() == 4 and c.x_tok == (2,) and sym.is_batch(c.x.shape[0])
        m_ok = not isinstance(mask, torch.Tensor) or set(sym.token_dims(mask)) <= {mask.dim() - 2}
        if q_ok and m_ok and not _arg(n, 5, "is_causal", False):
            return Verdict(True, attention="cross")
        return Verdict(
            False,
            reason=Reason.ATTENTION_FORM,
            detail="cross-attention (keys without a token axis) whose query or mask is not "
            "(batch, heads, tokens, ...) or that is causal",
        )
    for role, v in (("query", c.x), ("key", key)):
        if not (
            isinstance(v, torch.Tensor) and v.dim() == 4 and sym.token_dims(v) == (2,) and sym.is_batch(v.shape[0])
        ):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            return Verdict(
                False,
                reason=Reason.ATTENTION_FORM,
                detail=f"sdpa {role} {shape} is not (batch, heads, tokens, head_dim)",
            )
    return Verdict(True, attention="sdpa")


def _norm(c: _Call) -> Verdict:
    shape = _arg(c.node, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    if set(range(c.nd - n, c.nd)) & set(c.x_tok):
        return _mix(f"{c.name} normalises over the token axis")
    return OK


def _always_mixing(c: _Call) -> Verdict:
    return _mix(f"{c.name} mixes positions along the token axis")


# Where each reduction / scan takes its dim: (position, keyword, default); None = every dim.
_REDUCE_DIM = {
    "topk": (2, "dim", -1),
    "sort": (1, "dim", -1),
    "argsort": (1, "dim", -1),
    "norm": (2, "dim", None),
    "normalize": (2, "dim", 1),
    "roll": (2, "dims", None),
    "kthvalue": (2, "dim", -1),
    "cumsum": (1, "dim", None),
    "flip": (1, "dims", None),
}


def _reduce(c: _Call) -> Verdict:
    """Reductions, scans, sorts, flips: exact only off the token axis.

    `max`/`min` arrive here only in their reduction overloads (`h.max(dim=1)`); `max(x, y)` is
    pointwise and never reaches this rule.
    """
    pos, key, default = _REDUCE_DIM.get(c.name, (1, "dim", None))
    dim = _arg(c.node, pos, key, default)
    dims = _dims(dim, c.nd) if dim is not None else list(range(c.nd))  # None: every dim
    if dims is None:
        return _unsupported(f"{c.name} with a symbolic dim")
    if set(dims) & set(c.x_tok):
        return _mix(f"{c.name} along the token axis")
    return OK


def _cat(c: _Call) -> Verdict:
    n = c.node
    seq = n.args[0] if n.args else n.kwargs.get("tensors")
    first = seq[0] if isinstance(seq, (list, tuple)) and seq else None
    fv = node_value(first) if isinstance(first, fx.Node) else None
    nd = fv.dim() if isinstance(fv, torch.Tensor) else 0
    dim = _arg(n, 1, "dim", 0)
    if c.name == "stack":
        return OK if isinstance(dim, int) else _unsupported("stack with a symbolic dim")
    dims = _dims(dim, nd)
    toks: set[int] = set()
    for t in seq or ():
        if isinstance(t, fx.Node):
            toks |= set(c.sym.token_dims(node_value(t)))
    if dims is None or set(dims) & toks:
        return _mix(f"{c.name} along the token axis")
    return OK


_SPLIT_DIM = {
    "chunk": (2, 0),
    "split": (2, 0),
    "split_with_sizes": (2, 0),
    "tensor_split": (2, 0),
    "narrow": (1, None),
    "select": (1, None),
    "index_select": (1, None),
    "unbind": (1, 0),
    "repeat_interleave": (2, None),
}


def _split(c: _Call) -> Verdict:
    pos, default = _SPLIT_DIM[c.name]
    dim = _arg(c.node, pos, "dim", default)
    if c.name == "repeat_interleave" and dim is None:
        return _mix("repeat_interleave flattens the token axis")
    dims = _dims(dim, c.nd)
    if dims is None or set(dims) & set(c.x_tok):
        return _mix(f"{c.name} along the token axis")
    return OK


def _pad(c: _Call) -> Verdict:
    pad = _arg(c.node, 1, "pad")
    if not isinstance(pad, (list, tuple)):
        return _unsupported("pad with symbolic padding")
    for i in range(len(pad) // 2):
        if (c.nd - 1 - i) in c.x_tok and (pad[2 * i] != 0 or pad[2 * i + 1] != 0):
            return _mix("pad shifts the token axis")
    return OK


def _repeat(c: _Call) -> Verdict:
    n = c.node
    reps = list(n.args[1:]) if len(n.args) > 2 else list(_arg(n, 1, "sizes") or [])
    lead = len(reps) - c.nd
    if any(reps[lead + d] != 1 for d in c.x_tok if 0 <= lead + d < len(reps)):
        return _mix("repeat tiles the token axis")
    return OK


def _tril(c: _Call) -> Verdict:
    if c.nd >= 2 and {c.nd - 2, c.nd - 1} <= set(c.x_tok):
        return OK  # a causal mask on a (query, key) matrix: order is preserved by the gather
    return _mix(f"{c.name} over a token axis")


def _where(c: _Call) -> Verdict:
    """where(cond, a, b) is per element (any overload); where(cond) lists indices: refused."""
    if len(c.node.args) + len(c.node.kwargs) >= 3:
        return OK
    return _mix("where(cond) lists positions along the token axis")


def _masked_scatter(c: _Call) -> Verdict:
    """`x.masked_scatter(mask, source)`: position p receives the next unused element of `source`
    when mask[p] is set, numbered over every earlier position of the whole tensor (the batch too).

    That numbering mixes positions: it is exact only when every selected position is always kept
    and `source` carries no token axis (LLaVA's image-feature merge at image placeholders, which
    the runtime protects). The op table alone refuses it; `analyse` accepts the one exact form, a
    mask computed from the input ids alone (`ids == image_token_id`).
    """
    src = node_value(_arg(c.node, 2, "source"))
    if isinstance(src, torch.Tensor) and c.sym.token_dims(src):
        return _mix("masked_scatter with a token-indexed source")
    return _mix(
        "masked_scatter numbers the positions its mask selects along the token axis (a mask that "
        "is not computed from the input ids alone)"
    )


def _setitem(c: _Call) -> Verdict:
    """`x[idx] = value` (in place): per token when `idx` keeps every token axis of `x` whole, as
    `getitem` (Qwen3-VL's interleaved M-RoPE writes frequency columns: `freqs[..., idx] = ...`)."""
    value = node_value(c.node.args[2]) if len(c.node.args) > 2 and isinstance(c.node.args[2], fx.Node) else None
    if isinstance(value, torch.Tensor) and c.sym.token_dims(value) and not c.x_tok:
        return _mix("setitem writes a token-indexed value into a tensor without a token axis")
    return _getitem(c)


def _getitem(c: _Call) -> Verdict:
    node, sym, sv = c.node, c.sym, c.x
    if not isinstance(sv, torch.Tensor):
        return OK  # picking an element of a tuple output
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tok = set(sym.token_dims(sv))
    if not tok:
        return OK  # a table read at token-indexed positions (GPT-J's sincos[position_ids]): a lookup
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    dim = 0
    for it in items:
        if it is Ellipsis:
            dim += sv.dim() - consumed
            continue
        if it is None:
            continue
        if dim in tok:
            whole = (
                isinstance(it, slice)
                and it.start in (None, 0)
                and it.step in (None, 1)
                and (it.stop is None or _is_full_stop(it.stop, sv.shape[dim], sym))
            )
            if not whole and not (sym.is_seq(sv.shape[dim]) and identity_index(it, sym)):
                return _mix("indexing selects a subset of the token axis")
        elif isinstance(it, fx.Node) and sym.token_dims(node_value(it)):
            return _mix("indexing with a token-indexed tensor")
        dim += 1
    return OK


_PLACEMENT = {"unsqueeze", "expand", "expand_as", "to", "long", "int", "view", "reshape", "contiguous", "clone"}


def identity_index(node: Any, sym: TokenSymbols) -> bool:
    """Whether `node` is `arange(T)` (the token axis' own index), placed on some dim by singleton
    dims and broadcasts: indexing a token axis with it keeps every token where it is
    (`attention_mask[arange(B)[:, None, None, None], arange(T)[None, None, None, :]]`, the padding
    term of transformers' masks)."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return False
        v = node_value(node)
        if node.op == "call_function" and node.target is torch.arange:
            bounds = [a for a in node.args]
            if node.kwargs.get("start", 0) != 0 or node.kwargs.get("step", 1) != 1:
                return False
            if len(bounds) == 2 and bounds[0] == 0:
                bounds = bounds[1:]
            if len(bounds) == 1:
                end = node_value(bounds[0]) if isinstance(bounds[0], fx.Node) else bounds[0]
                return sym.is_seq(end)
            return len(bounds) == 0 and sym.is_seq(node.kwargs.get("end"))
        if not isinstance(v, torch.Tensor) or len(sym.token_dims(v)) != 1 or v.is_floating_point():
            return False
        name = op_name(node)
        if name == "getitem":
            idx = node.args[1]
            items = idx if isinstance(idx, tuple) else (idx,)
            if not all(it is None or it == slice(None) or it is Ellipsis for it in items):
                return False
        elif name == "add" and len(node.args) == 2 and node.args[1] == 0:
            pass  # `arange(T) + kv_offset` with no cache
        elif name not in _PLACEMENT:
            return False
        node = node.args[0]
    return False


def _is_full_stop(stop: Any, size: Any, sym: TokenSymbols) -> bool:
    if isinstance(stop, fx.Node):
        stop = node_value(stop)
    try:
        return sym.canon(stop) == sym.canon(size) or (isinstance(stop, int) and stop >= 2**62)
    except Exception:
        return False


def _names(*names: str) -> tuple[str, ...]:
    return names


Rule = Callable[[_Call], Verdict]

#: op name (aten name, torch function name or tensor method) -> rule along the token axis.
RULES: dict[str, Rule] = {
    # Value-preserving or per-element ops that carry no pointwise tag, or whose tag is per overload.
    **dict.fromkeys(
        _names(
            "to",
            "type",
            "type_as",
            "float",
            "half",
            "bfloat16",
            "double",
            "int",
            "long",
            "bool",
            "clone",
            "detach",
            "contiguous",
            "requires_grad_",
            "dropout",
            "alpha_dropout",
            "feature_alpha_dropout",
            "dropout1d",
            "dropout2d",
            "masked_fill",
            "masked_fill_",
            "copy_",
            "expand",
            # Activations: torch.nn.functional's signatures (inplace=...) differ from aten's schemas.
            "relu",
            "relu_",
            "relu6",
            "gelu",
            "silu",
            "elu",
            "selu",
            "celu",
            "leaky_relu",
            "hardtanh",
            "hardsigmoid",
            "hardswish",
            "mish",
            "softplus",
            "softsign",
            "tanhshrink",
            "threshold",
            "logsigmoid",
            "sigmoid",
            "tanh",
            "expand_as",
            "broadcast_to",
            "polar",  # complex from (abs, angle), per element (Llama4's complex RoPE); no pointwise tag
            # Sizes and constants: their tensors carry no token data.
            "size",
            "dim",
            "numel",
            "sym_size_int",
            "sym_numel",
            "new_zeros",
            "new_ones",
            "new_empty",
            "new_full",
            "zeros_like",
            "ones_like",
            "empty_like",
            "full_like",
            "new_tensor",
            "zeros",
            "ones",
            "empty",
            "full",
            "scalar_tensor",
            # arange(T) along the token axis: the original position of every token (gathered at kept
            # positions it is their original position ids, as the oracle's)
            "arange",
            "_set_grad_enabled",
            "_log_api_usage_once",
        ),
        _token_wise,
    ),
    **dict.fromkeys(_names("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"), _reshape),
    **dict.fromkeys(_names("transpose", "permute", "movedim", "swapaxes", "t", "unsqueeze", "squeeze"), _permute),
    **dict.fromkeys(_names("view_as_complex", "view_as_real"), _view_complex),
    "linear": _linear,
    "embedding": _embedding,
    **dict.fromkeys(_names("gather", "take_along_dim"), _gather),
    **dict.fromkeys(_names("matmul", "bmm", "mm", "addmm", "baddbmm", "addbmm"), _matmul),
    **dict.fromkeys(_names("softmax", "log_softmax", "_softmax"), _softmax),
    "scaled_dot_product_attention": _sdpa,
    **dict.fromkeys(_names("layer_norm", "rms_norm"), _norm),
    **dict.fromkeys(
        _names(
            "mean",
            "sum",
            "amax",
            "amin",
            "var",
            "std",
            "norm",
            "logsumexp",
            "prod",
            "argmax",
            "argmin",
            "all",
            "any",
            "cumsum",
            "cumprod",
            "cummax",
            "cummin",
            "logcumsumexp",
            "sort",
            "argsort",
            "topk",
            "var_mean",
            "std_mean",
            "count_nonzero",
            "nansum",
            "nanmean",
            "normalize",
            "median",
            "max",
            "min",
            "flip",
            "roll",
            "kthvalue",
        ),
        _reduce,
    ),
    **dict.fromkeys(_names("cat", "concat", "concatenate", "stack"), _cat),
    **dict.fromkeys(tuple(_SPLIT_DIM), _split),
    "pad": _pad,
    "repeat": _repeat,
    **dict.fromkeys(_names("tril", "triu"), _tril),
    **dict.fromkeys(_names("masked_scatter", "masked_scatter_"), _masked_scatter),
    "getitem": _getitem,
    "setitem": _setitem,
    "where": _where,
    # Mix neighbouring positions or pool statistics over tokens: refused on a token axis.
    **dict.fromkeys(
        _names(
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_transpose1d",
            "conv_transpose2d",
            "avg_pool1d",
            "max_pool1d",
            "adaptive_avg_pool1d",
            "adaptive_max_pool1d",
            "unfold",
            "fold",
            "pixel_shuffle",
            "interpolate",
            "upsample",
            "batch_norm",
            "group_norm",
            "instance_norm",
        ),
        _always_mixing,
    ),
}


# Tensor factories whose fill value is a number: (position, keyword) of that value.
_FILL_ARG = {
    "full": (1, "fill_value"),
    "new_full": (2, "fill_value"),
    "full_like": (1, "fill_value"),
    "scalar_tensor": (0, "s"),
    "tensor": (0, "data"),
    "as_tensor": (0, "data"),
    "fill_": (1, "value"),
}


def _scalar_has_seq(value: Any, sym: TokenSymbols) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return bool(getattr(sym.seq, "free_symbols", set()) & value.node.expr.free_symbols)
    return False


def length_scalar_problem(node: fx.Node, sym: TokenSymbols) -> Verdict | None:
    """A number derived from the sequence length (`4 / h.size(1)`, a sum divided by T) that enters
    tensor arithmetic. Sizes (view, expand, arange, slicing) are rebuilt for the kept layout, but a
    number in arithmetic would be the layout's length, where the oracle uses each sample's own."""
    if node.op not in ("call_function", "call_method") or not isinstance(node_value(node), torch.Tensor):
        return None
    name = op_name(node)
    if name in _FILL_ARG:
        pos, key = _FILL_ARG[name]
        values = [_arg(node, pos, key)]
    elif name in RULES and RULES[name] is not _token_wise and name not in _ARITHMETIC:
        return None
    else:
        values = [*node.args, *node.kwargs.values()]
    for a in values:
        if isinstance(a, fx.Node) and _scalar_has_seq(node_value(a), sym):
            if name in _FILL_ARG or name in _ARITHMETIC or _is_pointwise(node):
                return Verdict(
                    False,
                    reason=Reason.SYMBOLIC_SIZE,
                    detail=f"{name} uses a number derived from the sequence length ('{a.name}' = "
                    f"{node_value(a)}) as a value: on kept tokens it would be the kept layout's "
                    "length, not each sample's; compute it from a tensor the model is given",
                )
    return None


_ARITHMETIC = frozenset(
    {
        "mul",
        "add",
        "sub",
        "div",
        "truediv",
        "floordiv",
        "pow",
        "rsub",
        "true_divide",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "clamp",
        "clip",
        "masked_fill",
        "masked_fill_",
        "where",
        "lerp",
        "addcmul",
        "addcdiv",
        "remainder",
        "fmod",
        "mod",
    }
)


def role_free(node: fx.Node) -> bool:
    """Whether the node's rule reads no axis in particular (pointwise ops, casts, transposes): its
    verdict along the batch axis is its verdict along the token axis."""
    if node.op not in ("call_function", "call_method"):
        return False
    rule = RULES.get(op_name(node))
    return rule is _token_wise or rule is _permute or (rule is None and _is_pointwise(node))


def classify(node: fx.Node, sym: TokenSymbols) -> Verdict:
    """Classify `node` along the token axis: token-wise, attention, or refused with a reason."""
    problem = length_scalar_problem(node, sym)
    if problem is not None:
        return problem
    value = node_value(node)
    inputs = [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]
    if not any(sym.token_dims(node_value(a)) for a in inputs) and not sym.token_dims(value):
        return OK  # no token axis in or out (sizes, per-sequence constants)
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return Verdict(False, reason=Reason.HIGHER_ORDER_OP, detail=higher_order_detail(node))
    if node.op not in ("call_function", "call_method"):
        return _unsupported(f"{node.op} {node.target}")
    name = op_name(node)
    rule = RULES.get(name)
    if rule is None and _is_pointwise(node):
        rule = _token_wise
    if rule is None:
        return _unsupported(f"'{name}' on a token-indexed tensor")
    if rule is _reduce and name in ("max", "min") and _is_pointwise(node):
        rule = _token_wise  # max(x, y): the elementwise overload
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    xv = node_value(x) if x is not None else None
    nd = xv.dim() if isinstance(xv, torch.Tensor) else 0
    return rule(_Call(node, sym, name, xv, nd, sym.token_dims(xv)))


def higher_order_detail(node: fx.Node) -> str:
    """What a higher-order op is and how to avoid it, for the report."""
    name = getattr(node.target, "__name__", str(node.target))
    if "checkpoint" in name:
        return (
            f"'{name}' (activation checkpointing wraps each layer in an opaque region): call "
            "model.gradient_checkpointing_disable() (sparse steps store activations of the kept "
            "tokens only)"
        )
    return f"'{name}' wraps part of the model in a region the pass does not enter"
