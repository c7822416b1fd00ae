"""Classify one graph node by what it does along the token axis.

The rewrite replays a branch on the kept tokens only. That is exact when every op in the branch
either treats tokens independently (pointwise ops, linears over the hidden axis, norms over the
hidden axis, reshapes) or is attention, whose key axis the rewrite masks for the padded kept layout.
Anything else that touches the token axis (a convolution or cumsum along the sequence, a slice of
it, an op this table does not know) is refused: the branch stays dense and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.report import Reason

__all__ = ["Verdict", "classify", "higher_order_detail"]


@dataclass(frozen=True)
class Verdict:
    """Result of classifying a node. `attention` is 'sdpa', 'softmax' or 'pv' for attention pieces."""

    ok: bool
    attention: str | None = None
    reason: Reason | None = None
    detail: str = ""


OK = Verdict(True)

# Python operators dynamo records, mapped to the aten op whose tags we read.
_OPERATOR_ALIASES = {
    "truediv": "div", "itruediv": "div", "floordiv": "floor_divide", "ifloordiv": "floor_divide",
    "iadd": "add", "isub": "sub", "imul": "mul", "and_": "bitwise_and", "or_": "bitwise_or",
    "xor": "bitwise_xor", "invert": "bitwise_not", "inv": "bitwise_not", "mod": "remainder",
    "ipow": "pow", "iand": "bitwise_and", "ior": "bitwise_or", "pos": "positive",
}
# Value-preserving or per-element ops without a pointwise aten tag.
_ELEMENTWISE = {
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "int", "long", "bool",
    "clone", "detach", "contiguous", "requires_grad_", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "embedding", "masked_fill_", "copy_",
}
# Ops that only move or reinterpret data; a token axis stays a token axis.
_SHAPE = {
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
    "flatten", "unflatten", "view_as", "reshape_as", "movedim", "swapaxes", "t", "broadcast_to",
}
# Ops that produce sizes or constants (their tensors carry no token data).
_META = {
    "size", "dim", "numel", "sym_size_int", "sym_numel", "new_zeros", "new_ones", "new_empty",
    "new_full", "zeros_like", "ones_like", "empty_like", "full_like", "new_tensor",
    "_set_grad_enabled", "_log_api_usage_once",
}
# Reductions / scans whose `dim` argument must not be a token axis.
_DIM_REDUCE = {
    "mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "prod", "argmax", "argmin",
    "all", "any", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort",
    "topk", "var_mean", "std_mean", "count_nonzero", "nansum", "nanmean", "normalize", "median",
    "max", "min", "flip", "roll", "kthvalue",
}
# Where each reduction takes its dim (position, keyword, default); unlisted: (1, "dim", None = all).
_DIM_ARG = {
    "topk": (2, "dim", -1), "sort": (1, "dim", -1), "argsort": (1, "dim", -1), "norm": (2, "dim", None),
    "normalize": (2, "dim", 1), "roll": (2, "dims", None), "kthvalue": (2, "dim", -1),
}
# Ops that split or join along `dim`: fine on hidden axes, a token mix on the token axis.
_DIM_SPLIT = {
    "chunk", "split", "unbind", "narrow", "select", "split_with_sizes", "tensor_split", "cat",
    "concat", "concatenate", "stack", "repeat_interleave", "index_select",
}
_CONV = ("conv", "pool", "unfold", "fold", "pixel_shuffle", "interpolate", "upsample")
_NORMS = {"layer_norm", "rms_norm"}
_MIXING_NORMS = {"batch_norm", "group_norm", "instance_norm"}


@lru_cache(maxsize=None)
def _is_pointwise(name: str) -> bool:
    name = _OPERATOR_ALIASES.get(name, name)
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    try:
        overloads = [getattr(packet, o) for o in packet.overloads()]
    except Exception:  # pragma: no cover - defensive against odd packets
        return False
    return any(torch.Tag.pointwise in o.tags for o in overloads)


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


def _mix(detail: str) -> Verdict:
    return Verdict(False, reason=Reason.TOKEN_MIXING, detail=detail)


def classify(node: fx.Node, sym: TokenSymbols) -> Verdict:
    """Classify `node`, which depends on the residual stream, along the token axis."""
    name = op_name(node)
    value = node_value(node)
    inputs = [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]
    in_tok = {a: sym.token_dims(node_value(a)) for a in inputs}
    if not any(in_tok.values()) and not sym.token_dims(value):
        return OK  # no token axis in or out (sizes, per-sequence constants)
    if name in _META or name in _ELEMENTWISE or name in _SHAPE or _is_pointwise(name):
        return OK
    if name == "getitem":
        return _classify_getitem(node, sym)
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return Verdict(False, reason=Reason.HIGHER_ORDER_OP, detail=higher_order_detail(node))
    if node.op not in ("call_function", "call_method"):
        return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail=f"{node.op} {node.target}")

    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    xv = node_value(x) if x is not None else None
    x_tok = sym.token_dims(xv)
    nd = xv.dim() if isinstance(xv, torch.Tensor) else 0

    if name == "linear":
        if nd and (nd - 1) in x_tok:
            return _mix("linear contracts the token axis")
        return OK
    if name in ("matmul", "bmm", "mm"):
        return _classify_matmul(node, node.args[0], node.args[1], sym)
    if name in ("addmm", "baddbmm", "addbmm"):
        # bias + a @ b: GPT-2's Conv1D projection (addmm), Bloom's ALiBi scores (baddbmm).
        return _classify_matmul(node, _arg(node, 1, "mat1" if name == "addmm" else "batch1"),
                                _arg(node, 2, "mat2" if name == "addmm" else "batch2"), sym)
    if name in ("softmax", "log_softmax", "_softmax"):
        dims = _dims(_arg(node, 1, "dim"), nd)
        if dims is None:
            return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail=f"{name} with an implicit dim")
        if not set(dims) & set(x_tok):
            return OK
        if len(x_tok) >= 2 and nd == 4 and dims == [nd - 1] and x_tok[-1] == nd - 1:
            return Verdict(True, attention="softmax")
        return _mix(f"{name} over the token axis outside an attention score matrix")
    if name == "scaled_dot_product_attention":
        q = node_value(node.args[0])
        k = node_value(_arg(node, 1, "key"))
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and sym.token_dims(q) == (2,)):
            return Verdict(False, reason=Reason.ATTENTION_FORM,
                           detail="sdpa query is not (batch, heads, tokens, head_dim)")
        if not (isinstance(k, torch.Tensor) and k.dim() == 4 and sym.token_dims(k) == (2,)):
            return Verdict(False, reason=Reason.ATTENTION_FORM,
                           detail="sdpa key is not (batch, heads, tokens, head_dim)")
        return Verdict(True, attention="sdpa")
    if name in _NORMS:
        shape = _arg(node, 1, "normalized_shape")
        n = len(shape) if isinstance(shape, (list, tuple)) else 1
        if set(range(nd - n, nd)) & set(x_tok):
            return _mix(f"{name} normalises over the token axis")
        return OK
    if name in _MIXING_NORMS:
        return _mix(f"{name} pools statistics over tokens")
    if name in _DIM_REDUCE:
        pos, key, default = _DIM_ARG.get(name, (1, "dim", None))
        second = _arg(node, pos, key, default)
        if name in ("max", "min") and isinstance(second, fx.Node):
            return OK  # elementwise max/min of two tensors
        dims = _dims(second, nd) if second is not None else list(range(nd))  # None: all dims
        if dims is None:
            return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail=f"{name} with a symbolic dim")
        if set(dims) & set(x_tok):
            return _mix(f"{name} along the token axis")
        return OK
    if name in _DIM_SPLIT:
        return _classify_dim_split(node, name, sym)
    if name == "pad":
        pad = _arg(node, 1, "pad")
        if isinstance(pad, (list, tuple)):
            for i in range(len(pad) // 2):
                d = nd - 1 - i
                if d in x_tok and (pad[2 * i] != 0 or pad[2 * i + 1] != 0):
                    return _mix("pad shifts the token axis")
            return OK
        return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail="pad with symbolic padding")
    if name == "repeat":
        reps = list(node.args[1:]) if len(node.args) > 2 else list(_arg(node, 1, "sizes") or [])
        lead = len(reps) - nd
        if any(reps[lead + d] != 1 for d in x_tok if 0 <= lead + d < len(reps)):
            return _mix("repeat tiles the token axis")
        return OK
    if name in ("tril", "triu"):
        if nd >= 2 and {nd - 2, nd - 1} <= set(x_tok):
            return OK  # a causal mask on a (query, key) matrix: order is preserved by the gather
        return _mix(f"{name} over a token axis")
    if any(c in name for c in _CONV):
        return _mix(f"{name} mixes neighbouring positions along the token axis")
    return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail=f"'{name}' on a token-indexed tensor")


def higher_order_detail(node: fx.Node) -> str:
    """What a higher-order op is and how to avoid it, for the report."""
    name = getattr(node.target, "__name__", str(node.target))
    if "checkpoint" in name:
        return (f"'{name}' (activation checkpointing wraps each layer in an opaque region): call "
                "model.gradient_checkpointing_disable() (sparse steps store activations of the kept "
                "tokens only)")
    return f"'{name}' wraps part of the model in a region the pass does not enter"


def _classify_matmul(node: fx.Node, a: Any, b: Any, sym: TokenSymbols) -> Verdict:
    av, bv = node_value(a), node_value(b)
    if not (isinstance(av, torch.Tensor) and isinstance(bv, torch.Tensor)):
        return Verdict(False, reason=Reason.UNSUPPORTED_OP, detail="matmul with a non-tensor operand")
    a_tok, b_tok = sym.token_dims(av), sym.token_dims(bv)
    contract_a = av.dim() - 1
    contract_b = bv.dim() - 2 if bv.dim() >= 2 else 0
    if contract_a not in a_tok and contract_b not in b_tok:
        return OK  # q @ k^T, or x @ W: the contraction runs over a hidden axis
    if len(a_tok) >= 2 and contract_a in a_tok and contract_b in b_tok:
        return Verdict(True, attention="pv")  # probabilities @ values: the attention read-out
    return _mix("matmul contracts the token axis outside attention")


def _classify_dim_split(node: fx.Node, name: str, sym: TokenSymbols) -> Verdict:
    if name in ("cat", "concat", "concatenate", "stack"):
        seq = node.args[0] if node.args else node.kwargs.get("tensors")
        first = seq[0] if isinstance(seq, (list, tuple)) and seq else None
        fv = node_value(first) if isinstance(first, fx.Node) else None
        nd = fv.dim() if isinstance(fv, torch.Tensor) else 0
        dim = _arg(node, 1, "dim", 0)
        if name == "stack":
            return OK if isinstance(dim, int) else Verdict(False, reason=Reason.UNSUPPORTED_OP, detail="stack")
        dims = _dims(dim, nd)
        toks = set()
        for t in seq or ():
            if isinstance(t, fx.Node):
                toks |= set(sym.token_dims(node_value(t)))
        if dims is None or set(dims) & toks:
            return _mix(f"{name} along the token axis")
        return OK
    x = node.args[0]
    xv = node_value(x)
    nd = xv.dim() if isinstance(xv, torch.Tensor) else 0
    if name in ("chunk", "split", "split_with_sizes", "tensor_split"):
        dim = _arg(node, 2, "dim", 0)
    elif name in ("narrow", "select", "index_select"):
        dim = _arg(node, 1, "dim")
    elif name == "repeat_interleave":
        dim = _arg(node, 2, "dim")
        if dim is None:
            return _mix("repeat_interleave flattens the token axis")
    else:  # unbind
        dim = _arg(node, 1, "dim", 0)
    dims = _dims(dim, nd)
    if dims is None or set(dims) & set(sym.token_dims(xv)):
        return _mix(f"{name} along the token axis")
    return OK


def _classify_getitem(node: fx.Node, sym: TokenSymbols) -> Verdict:
    src = node.args[0]
    sv = node_value(src)
    if not isinstance(sv, torch.Tensor):
        return OK  # picking an element of a tuple output
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tok = set(sym.token_dims(sv))
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    dim = 0
    for it in items:
        if it is Ellipsis:
            dim += sv.dim() - consumed
            continue
        if it is None:
            continue
        if dim in tok:
            if isinstance(it, slice) and it.start in (None, 0) and it.step in (None, 1) and (
                it.stop is None or _is_full_stop(it.stop, sv.shape[dim], sym)
            ):
                pass
            else:
                return _mix("indexing selects a subset of the token axis")
        elif isinstance(it, fx.Node) and sym.token_dims(node_value(it)):
            return _mix("indexing with a token-indexed tensor")
        dim += 1
    return OK


def _is_full_stop(stop: Any, size: Any, sym: TokenSymbols) -> bool:
    if isinstance(stop, fx.Node):
        stop = node_value(stop)
    try:
        return sym.canon(stop) == sym.canon(size) or (isinstance(stop, int) and stop >= 2**62)
    except Exception:
        return False
