"""Which aten overload a captured call actually binds to, and whether it is pointwise.

dynamo records `torch.max(x, 1)` and `torch.max(x, y)` as the same target; only the overload tells
a reduction from an elementwise op. `called_overloads` binds the call's argument kinds to aten's
schemas (memoised), and `is_pointwise` reads aten's pointwise tag on every overload it can bind to.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.graph import node_value, op_name

__all__ = ["arg_kind", "called_overloads", "is_pointwise"]

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


def arg_kind(value: Any) -> str:
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
    """Whether a call with arguments of these kinds (`arg_kind`) binds to `schema` (arity, names and
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
    kinds = tuple(arg_kind(a) for a in node.args)
    if getattr(node.target, "__module__", None) == "_operator" and len(kinds) == 2 and kinds[0] != "tensor":
        kinds = kinds[::-1]  # `0.5 * x` is recorded as mul(0.5, x): aten's schemas take the tensor first
    kwarg_kinds = tuple((k, arg_kind(v)) for k, v in node.kwargs.items() if k != "inplace")  # functional API only
    return list(_overloads(name, kinds, kwarg_kinds))


@lru_cache(maxsize=None)
def _tagged_pointwise(op: torch._ops.OpOverload) -> bool:
    return torch.Tag.pointwise in op.tags


def is_pointwise(node: fx.Node) -> bool:
    """Pointwise when every overload the call can bind to carries aten's pointwise tag."""
    ops = called_overloads(node)
    return bool(ops) and all(_tagged_pointwise(o) for o in ops)
