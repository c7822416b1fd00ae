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

from typing import Any, Callable

import torch
import torch.fx as fx

from regate_fx.passes import rules
from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.passes.overloads import called_overloads, is_pointwise
from regate_fx.passes.placement import identity_index, role_strides, same_place
from regate_fx.passes.rules import OK, Call, Verdict
from regate_fx.report import Reason

__all__ = [
    "OK",
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


def _names(names: str) -> tuple[str, ...]:
    return tuple(names.split())


Rule = Callable[[Call], Verdict]

#: op name (aten name, torch function name or tensor method) -> rule along the token axis.
RULES: dict[str, Rule] = {
    # Value-preserving or per-element ops that carry no pointwise tag, or whose tag is per overload.
    **dict.fromkeys(
        _names(
            "to type type_as float half bfloat16 double int long bool clone detach contiguous requires_grad_"
            " dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d masked_fill masked_fill_ copy_ expand"
            # Activations: torch.nn.functional's signatures (inplace=...) differ from aten's schemas.
            " relu relu_ relu6 gelu silu elu selu celu leaky_relu hardtanh hardsigmoid hardswish mish softplus"
            " softsign tanhshrink threshold logsigmoid sigmoid tanh expand_as broadcast_to"
            # polar: complex from (abs, angle), per element (Llama4's complex RoPE); no pointwise tag
            " polar"
            # a // b per element (Llama 4's chunk of a position, `(kv_idx - left_padding) // chunk`);
            # aten's floor_divide carries no pointwise tag
            " floordiv floor_divide floor_divide_"
            # Sizes and constants: their tensors carry no token data.
            " size dim numel sym_size_int sym_numel new_zeros new_ones new_empty new_full zeros_like ones_like"
            " empty_like full_like new_tensor zeros ones empty full scalar_tensor"
            # arange(T) along the token axis: the original position of every token (gathered at kept
            # positions it is their original position ids, as the oracle's)
            " arange _set_grad_enabled _log_api_usage_once"
        ),
        rules.token_wise,
    ),
    **dict.fromkeys(_names("view reshape flatten unflatten view_as reshape_as"), rules.reshape),
    **dict.fromkeys(_names("transpose permute movedim swapaxes t unsqueeze squeeze"), rules.permute),
    **dict.fromkeys(_names("view_as_complex view_as_real"), rules.view_complex),
    "linear": rules.linear,
    "embedding": rules.embedding,
    **dict.fromkeys(_names("gather take_along_dim"), rules.gather),
    **dict.fromkeys(_names("matmul bmm mm addmm baddbmm addbmm"), rules.matmul),
    **dict.fromkeys(_names("softmax log_softmax _softmax"), rules.softmax),
    "scaled_dot_product_attention": rules.sdpa,
    **dict.fromkeys(_names("layer_norm rms_norm"), rules.norm),
    **dict.fromkeys(
        _names(
            "mean sum amax amin var std norm logsumexp prod argmax argmin all any cumsum cumprod cummax cummin"
            " logcumsumexp sort argsort topk var_mean std_mean count_nonzero nansum nanmean normalize median max min"
            " flip roll kthvalue"
        ),
        rules.reduce,
    ),
    **dict.fromkeys(_names("cat concat concatenate stack"), rules.cat),
    **dict.fromkeys(tuple(rules.SPLIT_DIM), rules.split),
    "pad": rules.pad,
    "batch_norm": rules.batch_norm,
    "repeat": rules.repeat,
    **dict.fromkeys(_names("tril triu"), rules.tril),
    **dict.fromkeys(_names("masked_scatter masked_scatter_"), rules.masked_scatter),
    **dict.fromkeys(_names("scatter scatter_ scatter_add scatter_add_ scatter_reduce scatter_reduce_"), rules.scatter),
    "getitem": rules.getitem,
    "setitem": rules.setitem,
    "where": rules.where,
    # Mix neighbouring positions or pool statistics over tokens: refused on a token axis.
    **dict.fromkeys(
        _names(
            "conv1d conv2d conv3d conv_transpose1d conv_transpose2d avg_pool1d max_pool1d adaptive_avg_pool1d"
            " adaptive_max_pool1d unfold fold pixel_shuffle interpolate upsample group_norm instance_norm"
        ),
        rules.always_mixing,
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
        values = [rules.arg(node, pos, key)]
    elif name in RULES and RULES[name] is not rules.token_wise and name not in _ARITHMETIC:
        return None
    else:
        values = [*node.args, *node.kwargs.values()]
    for a in values:
        if isinstance(a, fx.Node) and _scalar_has_seq(node_value(a), sym):
            if name in _FILL_ARG or name in _ARITHMETIC or is_pointwise(node):
                return Verdict(
                    False,
                    reason=Reason.SYMBOLIC_SIZE,
                    detail=f"{name} uses a number derived from the sequence length ('{a.name}' = "
                    f"{node_value(a)}) as a value: on kept tokens it would be the kept layout's "
                    "length, not each sample's; compute it from a tensor the model is given",
                )
    return None


_ARITHMETIC = frozenset(
    _names(
        "mul add sub div truediv floordiv pow rsub true_divide mul_ add_ sub_ div_ clamp"
        " clip masked_fill masked_fill_ where lerp addcmul addcdiv remainder fmod mod"
    )
)


def role_free(node: fx.Node) -> bool:
    """Whether the node's rule reads no axis in particular (pointwise ops, casts, transposes): its
    verdict along the batch axis is its verdict along the token axis."""
    if node.op not in ("call_function", "call_method"):
        return False
    rule = RULES.get(op_name(node))
    return rule is rules.token_wise or rule is rules.permute or (rule is None and is_pointwise(node))


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
        return rules.unsupported(f"{node.op} {node.target}")
    name = op_name(node)
    rule = RULES.get(name)
    if rule is None and is_pointwise(node):
        rule = rules.token_wise
    if rule is None:
        return rules.unsupported(f"'{name}' on a token-indexed tensor")
    if rule is rules.reduce and name in ("max", "min") and is_pointwise(node):
        rule = rules.token_wise  # max(x, y): the elementwise overload
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    xv = node_value(x) if x is not None else None
    nd = xv.dim() if isinstance(xv, torch.Tensor) else 0
    return rule(Call(node, sym, name, xv, nd, sym.token_dims(xv)))


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
