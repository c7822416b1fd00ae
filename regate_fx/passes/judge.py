"""Every node's verdict along the token axis and the batch axis (`Judge`).

The op table (ops.py) judges each op by itself; `Judge` adds what is exact only because of where a
value comes from, proven from the graph's data provenance (`Ancestry(data_only=True)`): the padding
mask's cumsum as position ids, the count of leading padding subtracted from `arange(T)` (Llama 4's
chunked mask), an image-placeholder masked_scatter whose mask comes from the ids alone, document ids
from position restarts compared only for equality. Nodes of a proven MoE dispatch (dispatch.py) or
expert-major tiling (tiling.py) are per (token, expert) row. And it judges the batch axis
with the same table, since the oracle runs each sample alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from regate_fx.passes.dispatch import expert_dispatch
from regate_fx.passes.graph import Ancestry, TokenSymbols, node_value, op_name
from regate_fx.passes.ops import OK, Verdict, classify, length_scalar_problem, role_free
from regate_fx.passes.placement import identity_index, same_place
from regate_fx.passes.tiling import expert_tiling
from regate_fx.report import Reason

__all__ = ["Judge"]

_VIEW_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_PLACEMENTS = {"getitem", "unsqueeze", "expand", "view", "reshape", "to", "long", "int"}


class Judge:
    """Every node's verdict along the token axis *and* the batch axis, from the op table (ops.py)
    plus the constructs that are exact only because of where their values come from.

    - The token axis: `ops.classify`, for floating-point and integer/boolean tensors alike (a hash
      of neighbouring ids or a position delta mixes tokens as much as a convolution does).
    - The batch axis: the oracle runs each sample alone, so an op that reads other samples
      (`h.mean(0)`, a batch norm, a reshape that moves samples, a number derived from B) has no
      per-sample result: `BATCH_MIXING`, in either layout.
    - Recognised constructs, proven from the graph: the cumsum of the padding mask along the
      tokens (position ids; kept positions keep their original ids), a masked_scatter whose mask
      is computed from the input ids alone (image placeholders, which the runtime protects), and
      document ids from position restarts compared only for equality (`_document_ids`).
    """

    def __init__(self, graph: fx.Graph, sym: TokenSymbols, anc: Ancestry, seq: fx.Node, padding: fx.Node | None):
        self.sym, self.anc = sym, anc
        b_syms: set = getattr(sym.batch, "free_symbols", set())
        self.sym_b = (
            TokenSymbols(sym.shape_env, sym.seq, sym.batch) if b_syms and not (b_syms & sym.seq.free_symbols) else None
        )
        tokened = [n for n in graph.nodes if isinstance(node_value(n), torch.Tensor) and sym.token_dims(node_value(n))]
        content = [n for n in tokened if node_value(n).is_floating_point() or node_value(n).is_complex()]
        # provenance follows values, not shapes: `image_mask.expand_as(embeds)` is still the ids' mask
        self.data = data = Ancestry(graph, data_only=True)
        self.content = data.descendants_of_any(content) | sum(data.bit(n) for n in content)
        sources = [
            n
            for n in tokened
            if n.op == "placeholder"
            or not any(
                isinstance(node_value(a), torch.Tensor) and sym.token_dims(node_value(a)) for a in n.all_input_nodes
            )
        ]
        self.seq, self.padding = seq, padding
        self.not_ids = sum(data.bit(n) for n in sources if n is not seq)  # positions, masks, arange(T), ...
        self.not_padding = sum(data.bit(n) for n in sources if n is not padding)
        self._memo: dict[fx.Node, Verdict] = {}
        self.documents = self._document_ids(graph)
        self.dispatch = expert_dispatch(graph, sym)  # sorted MoE dispatch, proven per token (dispatch.py)
        self.tiling = expert_tiling(graph, sym)  # expert-major tiled MoE, proven per token (tiling.py)
        self.per_token = self.dispatch | self.tiling  # proven per (token, expert) row: per sample too

    def _document_ids(self, graph: fx.Graph) -> set[fx.Node]:
        """Document ids from position restarts, compared only for equality (transformers'
        `find_packed_sequence_indices`: `(diff(position_ids, prepend=...) != 1).cumsum(-1)`, then
        `docs[b, q] == docs[b, kv]`). Computed at full length from the position ids alone, the ids
        are every token's true document; gathered, a kept pair compares equal exactly when its
        tokens share a document. The nodes of such a construct, or an empty set."""
        data = self.data
        forbidden = self.content | data.bit(self.seq) | (data.bit(self.padding) if self.padding is not None else 0)
        out: set[fx.Node] = set()
        for c in graph.nodes:
            if op_name(c) != "cumsum" or (data.ancestors(c) | data.bit(c)) & forbidden:
                continue
            placed, stack, ok = {c}, [c], True
            while stack and ok:  # every use: placements of c ending in an equality of two of them
                for u in stack.pop().users:
                    name = op_name(u)
                    if name in _PLACEMENTS and u.args[0] in placed:
                        if u not in placed:
                            placed.add(u)
                            stack.append(u)
                    elif name in ("eq", "ne") and len(u.args) == 2 and all(a in placed for a in u.args):
                        continue
                    else:
                        ok = False
                        break
            if not ok:
                continue
            members = set(placed)
            for n in reversed(self.anc.members(data.ancestors(c))):
                if (
                    n.op in ("call_function", "call_method")
                    and n.users
                    and all(u in members for u in n.users)
                    and not (data.ancestors(n) | data.bit(n)) & forbidden
                ):
                    members.add(n)
            out |= (members - placed) | {c}  # placements of the ids are judged as any getitem
        return out

    def _from_only(self, n: fx.node.Argument, source: fx.Node | None, others: int) -> bool:
        if source is None or not isinstance(n, fx.Node):
            return False
        bits = self.data.ancestors(n) | self.data.bit(n)
        return bool(bits & self.data.bit(source)) and not bits & (others | self.content)

    def _construct(self, n: fx.Node) -> bool:
        name = op_name(n)
        if name in ("masked_scatter", "masked_scatter_"):
            src = node_value(n.args[2]) if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
            mask = n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")
            return not (isinstance(src, torch.Tensor) and self.sym.token_dims(src)) and self._from_only(
                mask, self.seq, self.not_ids
            )
        if name == "cumsum":  # position ids from the padding mask: cumsum(attention_mask) - 1
            return self._from_only(n.args[0] if n.args else None, self.padding, self.not_padding)
        if name == "sum":
            return self._leading_padding(n)
        return False

    def _leading_padding(self, n: fx.Node) -> bool:
        """`(cumsum(attention_mask) == 0).sum(-1)`: each sample's count of leading padding slots
        (transformers' chunked mask, `left_padding_tokens`), used only as `arange(T)[...] - count`.

        That difference is every token's position counted from its sample's first real token (at
        real tokens it equals the position ids `cumsum(attention_mask) - 1`): computed at full length
        and gathered at kept positions, it is their original position, as `arange(T)` is theirs
        (Llama 4's chunk of a position, `(kv_idx - left_padding) // chunk`). Any other use of the
        count (a length, a scale) would be a number the kept subsequence does not have: refused."""
        x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if x is None or op_name(x) != "eq" or len(x.args) != 2:
            return False
        xv = node_value(x)
        raw = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        if not isinstance(xv, torch.Tensor) or not all(isinstance(d, int) for d in raw):
            return False
        tok = self.sym.token_dims(xv)
        if len(tok) != 1 or [d % xv.dim() for d in raw] != list(tok) or self.sym.token_dims(node_value(n)):
            return False
        c, z = x.args
        if not (isinstance(c, fx.Node) and op_name(c) == "cumsum"):
            c, z = z, c
        if not (isinstance(c, fx.Node) and op_name(c) == "cumsum" and self._construct(c)):
            return False
        if not (z == 0 or (isinstance(z, fx.Node) and op_name(z) == "zeros_like")):
            return False
        placed, stack = {n}, [n]
        while stack:  # every use: placements (indexed by the batch), ending as `arange(T) - count`
            for u in stack.pop().users:
                name = op_name(u)
                if name in _PLACEMENTS and u.args[0] in placed:
                    if name == "getitem" and any(
                        isinstance(a, fx.Node) and self.sym.token_dims(node_value(a))
                        for a in (u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],))
                    ):
                        return False
                    if u not in placed:
                        placed.add(u)
                        stack.append(u)
                elif (
                    name == "sub"
                    and len(u.args) == 2
                    and u.args[1] in placed
                    and u.args[0] not in placed
                    and identity_index(u.args[0], self.sym)
                ):
                    continue
                else:
                    return False
        return True

    def verdict(self, n: fx.Node) -> Verdict:
        v = self._memo.get(n)
        if v is None:
            v = self._memo[n] = self._verdict(n)
        return v

    def _verdict(self, n: fx.Node) -> Verdict:
        if n in self.documents or n in self.per_token:
            return OK
        v = classify(n, self.sym)
        if not v.ok and v.reason is Reason.TOKEN_MIXING and self._construct(n):
            v = OK
        elif not v.ok and op_name(n) in ("masked_scatter", "masked_scatter_"):
            mask = n.args[1] if len(n.args) > 1 else n.kwargs.get("mask")
            if isinstance(mask, fx.Node) and not (self.data.ancestors(mask) | self.data.bit(mask)) & self.content:
                return Verdict(
                    False,
                    reason=Reason.BATCH_MIXING,
                    detail=(
                        "masked_scatter numbers the positions its mask selects across the whole batch, with a mask "
                        "that is not computed from the input ids alone"
                    ),
                )
        if not v.ok or v.attention is not None or self.sym_b is None or n.op not in ("call_function", "call_method"):
            return v
        if op_name(n) in _VIEW_RESHAPES:
            x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if x is not None and same_place(node_value(x), node_value(n), self.sym, "batch"):
                return v
            vb: Verdict | None = Verdict(False, reason=Reason.TOKEN_MIXING, detail=f"{op_name(n)} moves samples")
        elif self._construct(n):
            return v
        elif role_free(n):  # same rule on either axis; only a number derived from B differs
            vb = length_scalar_problem(n, self.sym_b)
            if vb is None:
                return v
        else:
            vb = classify(n, self.sym_b)
            if vb.token_wise:
                return v
        assert vb is not None  # each branch above returned or set it
        return Verdict(
            False,
            reason=Reason.BATCH_MIXING,
            detail=f"{vb.detail or 'attention'} along the batch axis: it couples samples (the oracle, "
            "and any per-sample result, runs each sample alone)",
        )
