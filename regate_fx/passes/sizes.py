"""Which sizes and side inputs a piece replayed on kept tokens can take from outside.

A replayed branch may read values computed at full length: tensors with a leading batch axis are
gathered to the kept layout, and sizes that involve the sequence length are rebuilt with the kept
length K when they are size arithmetic (`T * H`, `torch.Size([B, T, D])`). Anything else is refused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from regate_fx.passes.graph import TokenSymbols, node_value
from regate_fx.report import Reason

__all__ = ["side_input_problem", "sym_derivable"]


def side_input_problem(a: fx.Node, sym: TokenSymbols) -> tuple[Reason, str] | None:
    """Why a value computed outside a replayed piece cannot be brought to kept tokens, if it can't."""
    v = node_value(a)
    if isinstance(v, torch.Tensor):
        toks = sym.token_dims(v)
        if toks and (0 in toks or not (sym.is_batch(v.shape[0]) or sym.canon(v.shape[0]) == 1)):
            return (
                Reason.NO_BATCH_AXIS,
                f"side input '{a.name}' {tuple(v.shape)} has a token axis but no leading batch axis",
            )
    elif sym.size_has_seq(v) and not sym_derivable(a, sym):
        return Reason.SYMBOLIC_SIZE, f"size '{a.name}' = {v} cannot be re-derived for kept tokens"
    return None


# Size arithmetic the rewrite can replay with K in place of T: `T * H`, `torch.Size([B, T, D])`
# (GPT-2's Conv1D builds its output shape that way), `x.size()[:-1] + (D,)`.
_SYM_OPS = {
    operator.mul,
    operator.add,
    operator.sub,
    operator.floordiv,
    operator.neg,
    operator.mod,
    operator.getitem,
    torch.Size,
}


def sym_derivable(a: fx.Node, sym: TokenSymbols) -> bool:
    """Whether a size (or tuple of sizes) that involves the sequence length can be rebuilt with K."""
    v = node_value(a)
    if isinstance(v, torch.Tensor) or not sym.size_has_seq(v) or sym.is_seq(v):
        return True  # tensors are gathered; sizes without T are kept as they are
    if (a.op == "call_function" and a.target in _SYM_OPS) or (a.op == "call_method" and a.target == "size"):
        return all(sym_derivable(x, sym) for x in a.all_input_nodes)
    return False
