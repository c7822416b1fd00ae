"""Attention with sinks: scores joined with per-head logit columns, proven an attention form (`sink_form`).

gpt-oss's eager attention (transformers `GptOssAttention`) joins a learned per-head sink logit to
every row of the scores along the key axis, softmaxes over the joined row and drops the sink
column before the read-out:

    w = q @ k^T * scaling + mask                                # (B, H, T, T)
    sinks = module.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, -1)   # (B, H, T, 1)
    joined = cat([w, sinks], dim=-1)                            # (B, H, T, T + 1)
    joined = joined - joined.max(dim=-1, keepdim=True).values   # optional shift by the row max
    probs = softmax(joined, dim=-1)[..., :-1]                   # (B, H, T, T): the key columns
    out = probs @ v

On the kept layout the joined row is the kept keys plus the same sink columns, so the form is
exact exactly as plain eager attention is, once the padding-slot keys are masked (-inf) in the
scores operand *before* the join (the row max then sees the oracle's columns too). The proof
accepts only this shape, from the graph alone:

- the join is a `cat` along the last dim of 4-D (batch, heads, queries, keys + c) values: one
  operand is the scores (its keys are the tokens themselves), every other operand is a value
  without a token axis, looked through `expand` / `broadcast_to` / casts (a per-head constant
  spread over the queries): a joined column with a token axis is refused;
- every use of the join is the softmax over the last dim, a row max over the last dim
  (`keepdim=True`) used only to shift the join, or that shift, whose only use is the softmax;
- every use of the softmax (through casts) is a slice of the last dim that keeps exactly the
  scores' columns: the sink columns never reach the read-out, and no key column is dropped.

Anything else (the softmax read unsliced, a slice that keeps a sink column, the max used for
something besides the shift) is not the form, and its nodes are refused by the op table as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name

__all__ = ["SINK", "scores_operand", "sink_form"]

#: the attention label of every node of a proven form (rules.py); the layout masks at the join
SINK = "sink"

_SPREAD = frozenset({"expand", "expand_as", "broadcast_to"})
_CAST = frozenset({"to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach"})
_JOIN = frozenset({"cat", "concat", "concatenate"})
_SOFTMAX = frozenset({"softmax", "_softmax"})
_ROWMAX = frozenset({"max", "amax"})


def _arg(node: fx.Node, pos: int, key: str, default: Any = None) -> Any:
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)


def _last_dim(node: fx.Node, pos: int, key: str, nd: int = 4) -> bool:
    dim = _arg(node, pos, key)
    return isinstance(dim, int) and dim % nd == nd - 1


def _operands(join: fx.Node) -> list | None:
    seq = join.args[0] if join.args else join.kwargs.get("tensors")
    if not isinstance(seq, (list, tuple)) or not all(isinstance(t, fx.Node) for t in seq):
        return None
    return list(seq)


def scores_operand(join: fx.Node, sym: TokenSymbols) -> int | None:
    """Index of the scores among the join's operands: (B, H, Tq, T), its keys the tokens themselves.
    None unless exactly one operand is."""
    found = []
    for i, t in enumerate(_operands(join) or ()):
        v = node_value(t)
        if (
            isinstance(v, torch.Tensor)
            and v.dim() == 4
            and sym.is_batch(v.shape[0])
            and len(sym.token_dims(v)) >= 2
            and sym.token_dims(v)[-1] == 3
            and sym.is_seq(v.shape[3])
        ):
            found.append(i)
    return found[0] if len(found) == 1 else None


def _token_free(t: fx.Node, sym: TokenSymbols) -> bool:
    """A per-head (or per-sample) constant spread over the queries: no token axis before the spread,
    and none along the joined axis after it (columns spread to T would follow K, not each sample's
    keys)."""
    if 3 in sym.token_dims(node_value(t)):
        return False
    while t.op in ("call_function", "call_method") and op_name(t) in _SPREAD | _CAST and t.args:
        if not isinstance(t.args[0], fx.Node):
            return False
        t = t.args[0]
    v = node_value(t)
    return isinstance(v, torch.Tensor) and not sym.token_dims(v)


def _join_of(n: fx.Node) -> fx.Node | None:
    """The candidate join a node of the form hangs off (walked back, not yet proven)."""
    for _ in range(8):
        name = op_name(n) if n.op in ("call_function", "call_method") else ""
        if name in _JOIN:
            return n
        if name in _SOFTMAX | _ROWMAX | _CAST or name in ("getitem", "sub"):
            x = n.args[0] if n.args else None
            if not isinstance(x, fx.Node):
                return None
            n = x
            continue
        return None
    return None


def _rowmax_uses(m: fx.Node, join: fx.Node) -> list[fx.Node] | None:
    """The values of a row max of `join` (`max(dim=-1, keepdim=True)` then `[0]`, or `amax`),
    or None when the max is anything else."""
    if not (m.args and m.args[0] is join and _last_dim(m, 1, "dim") and _arg(m, 2, "keepdim", False) is True):
        return None
    if op_name(m) == "amax":
        return [m]
    values = []
    for u in m.users:  # max(dim) returns (values, indices): only the values, only for the shift
        if not (op_name(u) == "getitem" and u.args[1] == 0):
            return None
        values.append(u)
    return values


def _slices_scores(s: fx.Node, join: fx.Node, idx: int, sym: TokenSymbols) -> bool:
    """Whether `s` indexes the softmax's last dim to exactly the scores' columns of the join."""
    if op_name(s) != "getitem":
        return False
    items = s.args[1] if isinstance(s.args[1], tuple) else (s.args[1],)
    if items and items[0] is Ellipsis:
        items = items[1:]
        last = items[0] if len(items) == 1 else None
    elif len(items) == 4 and all(it == slice(None) for it in items[:3]):
        last = items[3]
    else:
        return False
    if not isinstance(last, slice) or last.step not in (None, 1):
        return False
    operands = _operands(join) or []
    size = sym.canon(node_value(join).shape[3])  # T + c
    offset = sum(sym.canon(node_value(t).shape[3]) for t in operands[:idx])
    width = sym.canon(node_value(operands[idx]).shape[3])  # T

    def bound(b: Any, default: Any) -> Any:
        if b is None:
            return default
        b = node_value(b) if isinstance(b, fx.Node) else b
        if isinstance(b, int) and b < 0:
            return size + b
        return sym.canon(b) if isinstance(b, (int, torch.SymInt)) else None

    start, stop = bound(last.start, 0), bound(last.stop, size)
    return start is not None and stop is not None and start == offset and stop == offset + width


def sink_form(n: fx.Node, sym: TokenSymbols) -> set[fx.Node]:
    """The nodes of the sink-attention form `n` belongs to (join, row max, its values, softmax,
    slices, casts between them), proven as the module docstring says; empty when it is not one."""
    join = _join_of(n)
    if join is None:
        return set()
    v = node_value(join)
    operands = _operands(join)
    if not (isinstance(v, torch.Tensor) and v.dim() == 4 and operands and _last_dim(join, 1, "dim")):
        return set()
    idx = scores_operand(join, sym)
    if idx is None or not all(_token_free(t, sym) for i, t in enumerate(operands) if i != idx):
        return set()
    members = {join}
    softmaxes, shifts = [], []
    rowmax_values: set[fx.Node] = set()
    for u in join.users:
        name = op_name(u)
        if name in _SOFTMAX:
            softmaxes.append(u)
        elif name in _ROWMAX:
            values = _rowmax_uses(u, join)
            if values is None:
                return set()
            members.add(u)
            rowmax_values |= set(values)
        elif name == "sub" and len(u.args) == 2 and u.args[0] is join:
            shifts.append(u)
        else:
            return set()
    for m in rowmax_values:  # the row max shifts the join, nothing else
        if not all(w in shifts for w in m.users):
            return set()
        members.add(m)
    for s in shifts:
        if s.args[1] not in rowmax_values or not all(op_name(w) in _SOFTMAX for w in s.users):
            return set()
        members.add(s)
        softmaxes.extend(s.users)
    if len(softmaxes) != 1:
        return set()
    sm = softmaxes[0]
    if not _last_dim(sm, 1, "dim"):
        return set()
    members.add(sm)
    frontier = list(sm.users)
    while frontier:  # every use of the probabilities: casts, then a slice to the scores' columns
        u = frontier.pop()
        if op_name(u) in _CAST:
            members.add(u)
            frontier.extend(u.users)
        elif _slices_scores(u, join, idx, sym):
            members.add(u)
        else:
            return set()
    return members if n in members else set()
