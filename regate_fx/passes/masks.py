"""Prove that an attention mask is "causal AND key is a real token", so kept tokens can use SDPA's
causal fast path instead of a gathered (B, 1, K, K) mask.

Under torch.compile, transformers (>= 5, `masking_utils.sdpa_mask`) does not skip the mask for SDPA:
every Llama/Qwen/Mistral-style model builds a full (B, 1, T, T) boolean mask from index tensors,

    q_idx  = arange(T)[None, None, :, None]        kv_idx = arange(T)[None, None, None, :]
    mask   = ones & (kv_idx <= q_idx) & attention_mask.bool()[arange(B)[:, None, None, None], kv_idx]

(hand-written decoders often write the last term `attention_mask.bool()[:, None, None, :]`.)

On the kept layout that mask is exactly causal: kept tokens are real (keep_mask never keeps padding,
`check_keep_mask`), they keep their order, and the layout's padding slots come after every real
slot. This module evaluates the mask's subgraph over a tiny abstract domain (index tensors along
the batch / token axes, the padding mask, and conjunctions of "causal" and "key is real") and
accepts only masks that provably are that conjunction. Anything else (a sliding window, a
bidirectional image block, a mask the pass cannot read) is not proven, and the gathered mask is
used as before: a failed proof means "not rewritten", never a crash.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value

__all__ = ["is_causal_key_padding_mask"]

CAUSAL, KEY_REAL = "causal", "key_real"
_KEY_PLACEMENT = (slice(None, None, None), None, None, slice(None, None, None))  # [:, None, None, :]


@dataclass(frozen=True)
class _Index:
    """arange(B) or arange(T) (+ offset), placed on one dim of an `ndim`-d broadcast shape."""

    axis: str  # "batch" | "token"
    offset: int = 0
    size: Any = None  # for "batch": the arange's size (canonical), matched against the padding's rows
    dim: int | None = None  # None: still 1-D
    ndim: int = 1


@dataclass(frozen=True)
class _Padding:
    """The model's (B, T) attention_mask input; `as_bool`: converted to bool (True = real token)."""

    as_bool: bool
    rows: Any  # its batch size (canonical): row b is sample b's padding


@dataclass(frozen=True)
class _Bool:
    """A boolean tensor equal to the conjunction of `terms` (empty = all True)."""

    terms: frozenset[str] = frozenset()


def _placed(idx: Any, index: Any) -> _Index | None:
    """`idx[None, None, :, None]`-style placement of a 1-D index tensor."""
    if not (isinstance(idx, _Index) and idx.dim is None and isinstance(index, tuple)):
        return None
    slices = [i for i, it in enumerate(index) if isinstance(it, slice)]
    full = all(it is None or it == slice(None, None, None) for it in index)
    if len(slices) != 1 or not full:
        return None
    return _Index(idx.axis, idx.offset, idx.size, slices[0], len(index))


def _causal(kv: Any, q: Any) -> bool:
    """kv <= q over the token axis, kv on the last dim and q on the one before, same offset."""
    return (
        isinstance(kv, _Index)
        and isinstance(q, _Index)
        and kv.axis == q.axis == "token"
        and kv.offset == q.offset
        and kv.ndim == q.ndim == 4
        and kv.dim == 3
        and q.dim == 2
    )


def _to_keeps_value(node: fx.Node) -> bool:
    """`.to(device)` / `.to(dtype=torch.bool)`: no change of a boolean value."""
    dtypes = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.dtype)]
    return all(d is torch.bool for d in dtypes)


def _eval(node: fx.Node, sym: TokenSymbols, padding: fx.Node | None, memo: dict) -> Any:
    if node in memo:
        return memo[node]
    memo[node] = None  # cycles cannot happen in an FX graph; this also bounds the recursion
    ev = lambda a: _eval(a, sym, padding, memo) if isinstance(a, fx.Node) else a  # noqa: E731
    out: Any = None
    target, args = node.target, node.args
    if node is padding:
        v = node_value(node)  # (B, T): check_keep_mask holds it to keep_mask's shape
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            out = _Padding(as_bool=v.dtype is torch.bool, rows=sym.canon(v.shape[0]))
    elif node.op == "call_function" and target is torch.arange and len(args) == 1 and isinstance(args[0], fx.Node):
        n = node_value(args[0])
        out = _Index("token") if sym.is_seq(n) else _Index("batch", size=sym.canon(n)) if not sym.has_seq(n) else None
    elif node.op == "call_function" and target is operator.add and len(args) == 2:
        a, c = ev(args[0]), args[1]
        if isinstance(a, _Index) and a.dim is None and isinstance(c, int):
            out = _Index(a.axis, a.offset + c, a.size)
    elif node.op == "call_function" and target is operator.getitem and len(args) == 2:
        src, index = ev(args[0]), args[1]
        if isinstance(src, _Index):
            out = _placed(src, index)
        elif isinstance(src, _Padding) and src.as_bool and index == _KEY_PLACEMENT:
            out = _Bool(frozenset({KEY_REAL}))  # attention_mask.bool()[:, None, None, :]: (B, 1, 1, T)
        elif isinstance(src, _Padding) and src.as_bool and isinstance(index, tuple) and len(index) == 2:
            b, kv = ev(index[0]), ev(index[1])
            rows_ok = isinstance(b, _Index) and (sym.is_batch(b.size) or b.size == src.rows)  # row b: sample b
            if (
                rows_ok
                and b.axis == "batch"
                and b.offset == 0
                and b.dim == 0
                and b.ndim == 4
                and isinstance(kv, _Index)
                and kv.axis == "token"
                and kv.offset == 0
                and kv.dim == 3
            ):
                out = _Bool(frozenset({KEY_REAL}))  # attention_mask[b, kv]: the key is a real token
    elif node.op == "call_function" and target in (operator.le, operator.ge) and len(args) == 2:
        a, b = ev(args[0]), ev(args[1])
        kv, q = (a, b) if target is operator.le else (b, a)
        if _causal(kv, q):
            out = _Bool(frozenset({CAUSAL}))
    elif node.op == "call_function" and target in (operator.and_, torch.logical_and) and len(args) == 2:
        a, b = ev(args[0]), ev(args[1])
        if isinstance(a, _Bool) and isinstance(b, _Bool):
            out = _Bool(a.terms | b.terms)
    elif node.op == "call_method" and target == "to" and _to_keeps_value(node):
        src = ev(args[0])
        if isinstance(src, _Padding):  # attention_mask.to(torch.bool): nonzero = real token
            out = _Padding(src.as_bool or torch.bool in (*args[1:], *node.kwargs.values()), src.rows)
        elif isinstance(src, _Bool):
            out = src
    elif node.op == "call_method" and target == "bool" and len(args) == 1:
        src = ev(args[0])
        if isinstance(src, _Padding):  # attention_mask.bool(): nonzero = real token
            out = _Padding(True, src.rows)
        elif isinstance(src, _Bool):
            out = src
    elif node.op == "call_method" and target == "expand":
        src = ev(args[0])
        out = src if isinstance(src, _Bool) else None
    elif node.op == "call_method" and target == "new_ones" and node.kwargs.get("dtype") is torch.bool:
        out = _Bool()
    memo[node] = out
    return out


def is_causal_key_padding_mask(mask: Any, sym: TokenSymbols, padding: fx.Node | None) -> bool:
    """Whether `mask` (an SDPA attn_mask argument) provably is causal AND "key is a real token".

    Args:
        mask: the attn_mask argument of an SDPA node.
        sym: the graph's batch / token symbols.
        padding: the placeholder of the model's (B, T) attention_mask input (None if not given).
    """
    if not isinstance(mask, fx.Node):
        return False
    value = _eval(mask, sym, padding, {})
    return isinstance(value, _Bool) and CAUSAL in value.terms and value.terms <= {CAUSAL, KEY_REAL}
