"""Where the token axis and the batch axis lie in memory, and indices that keep every token in place.

A reshape keeps tokens in place when the token axis has the same strides before and after
(`same_place`, from `role_strides`); an index along the token axis keeps them in place when it is
`arange(T)` placed by singleton dims and broadcasts (`identity_index`), or a full slice
(`is_full_stop`). The rules in ops.py and `Judge` ask these questions.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name

__all__ = ["identity_index", "is_full_stop", "role_strides", "same_place", "token_block"]


def role_strides(v: Any, sym: TokenSymbols, role: str) -> list[frozenset | tuple[()]] | None:
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


def _role_strides(v: torch.Tensor, sym: TokenSymbols, role: str) -> list[frozenset | tuple[()]] | None:
    import sympy

    seq, batch = sym.seq, sym.batch
    sizes = [sym.canon(s) for s in v.shape]
    if not any(getattr(s, "free_symbols", None) for s in sizes):
        return [()]  # static shape: neither axis (a tuple: it matches only another static shape)
    role_syms: set = getattr(seq if role == "seq" else batch, "free_symbols", set())
    other_syms: set = getattr(batch if role == "seq" else seq, "free_symbols", set())
    options: list[list] = [[]]
    stride = sympy.Integer(1)
    for size in reversed(sizes):
        free: set = getattr(size, "free_symbols", set())
        block = _block(size, seq, batch)
        if block is not None and block[1] and role_syms:
            # a merged B*T axis, each token a block of `block[0]` rows (MoE's (B*T*k, D) slots)
            c = block[0]
            options = [o + [stride * c] for o in options] + [
                o + [stride * c * (seq if role == "batch" else batch)] for o in options
            ]
        elif role_syms and free & role_syms:
            rest = size / (seq if role == "seq" else batch)  # a product: sympy cancels the factor
            if role == "seq" and rest != 1:
                if block is None:
                    return None
                rest = block[0]  # (B, T*k, D): each token a block of k rows, in token order
            if role == "batch" and (getattr(rest, "free_symbols", set()) & (role_syms | other_syms)):
                return None
            options = [o + [stride * rest] for o in options]
        stride = stride * size
    return [frozenset(Counter(o).items()) for o in options]  # products of symbols: canonical in sympy


def _block(size: Any, seq: Any, batch: Any) -> tuple[int, bool] | None:
    """A token axis of `size` = c*T or c*B*T with c a constant: (c, merged with B), else None.

    c > 1 is a blocked token axis: every token owns c consecutive rows, in token order
    (`repeat_interleave(h, k, dim=0)` over MoE's (B*T, D) rows, or (B*T, k) slots flattened);
    its unit in memory is c rows, which `_role_strides` uses as the token axis' stride."""
    import sympy

    for merged, unit in ((True, batch * seq), (False, seq)):
        c = sympy.simplify(size / unit)
        if c.is_Integer and int(c) >= 1:
            return int(c), merged
    return None


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


def is_full_stop(stop: Any, size: Any, sym: TokenSymbols) -> bool:
    if isinstance(stop, fx.Node):
        stop = node_value(stop)
    try:
        return sym.canon(stop) == sym.canon(size) or (isinstance(stop, int) and stop >= 2**62)
    except Exception:
        return False


def token_block(size: Any, sym: TokenSymbols) -> int | None:
    """How many consecutive rows each token owns along a token axis of `size`: 1 for T and B*T,
    c for c*T and c*B*T (c a constant), None for any other size (a split or a foreign merge)."""
    block = _block(size, sym.seq, sym.batch)
    return None if block is None else block[0]
