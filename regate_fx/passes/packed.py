"""When a graph may run on the packed layout: every sample's kept tokens in one row (1, N).

Packing removes the batch axis from everything replayed on kept tokens, so beyond what the padded
layout needs (`analyse.py`), every replayed op must treat samples independently and the only
place samples meet tokens of their own is attention:

- every attention in a region is SDPA, causal on the kept tokens (no mask, or a mask proven
  "causal AND key is real" by `masks.py`) and without dropout: `packed_attention` replaces it;
- every other replayed op is token-wise along the *batch* axis too: the op table (`ops.py`) is
  asked again with the batch axis in the role of the token axis (a reduction over the batch, a
  reshape that splits it, an op the table does not know: not packable);
- token-indexed side inputs are (B or 1, T, ...): packed by flat position; a side input with a
  batch axis but no token axis (a per-sample scalar) has no packed form;
- sizes that involve B can be re-derived (B -> 1), as sizes that involve T are (T -> N);
- B is symbolic and distinct from T (a batch size fixed while tracing could hide in literals).

`packed_problem` returns why not, or None; a "no" means the padded layout, never a crash.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from regate_fx.passes.analyse import Analysis
from regate_fx.passes.graph import TokenSymbols, is_sdpa, module_path, node_value, sdpa_arg
from regate_fx.passes.ops import classify
from regate_fx.passes.sinks import SINK
from regate_fx.passes.sizes import sym_derivable

__all__ = ["packed_problem"]


def _where(n: fx.Node) -> str:
    m = module_path(n)
    return f"'{n.name}'" + (f" ({m})" if m else "")


def _attention_problem(n: fx.Node, analysis: Analysis) -> str | None:
    sym = analysis.sym
    assert sym is not None  # packed_problem checked it
    mask = sdpa_arg(n, "attn_mask")
    key = node_value(sdpa_arg(n, "key"))
    if not (isinstance(key, torch.Tensor) and sym.token_dims(key)):
        return f"attention {_where(n)} reads another sequence's keys (cross-attention)"
    causal = mask in analysis.causal_masks if mask is not None else sdpa_arg(n, "is_causal", False) is True
    if not causal:
        return (
            f"attention {_where(n)} has a mask that is not causal on the kept tokens (sliding window, image block, ...)"
        )
    dropout = sdpa_arg(n, "dropout_p", 0.0)
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        return f"attention {_where(n)} uses dropout"
    return None


def _side_problem(a: fx.Node, analysis: Analysis, sym_b: TokenSymbols) -> str | None:
    sym, v = analysis.sym, node_value(a)
    assert sym is not None  # packed_problem checked it
    if isinstance(v, torch.Tensor):
        if a in analysis.causal_masks:
            return None  # dropped: attention is causal on the packed tokens
        toks = sym.token_dims(v)
        if len(toks) > 1 or toks == (0,):
            return f"side input {_where(a)} {tuple(v.shape)} has token axes {toks}, not one after the batch axis"
        if not toks and sym_b.token_dims(v):
            return f"side input {_where(a)} {tuple(v.shape)} is per sample without a token axis"
        return None
    if sym_b.size_has_seq(v) and not sym_derivable(a, sym_b):
        return f"size {_where(a)} = {v} cannot be re-derived without the batch axis"
    return None


def packed_problem(analysis: Analysis) -> str | None:
    """Why the graph of `analysis` cannot run on the packed layout, or None when it can."""
    sym = analysis.sym
    assert sym is not None  # asked only of an analysis that found the token axis
    batch_syms: set = getattr(sym.batch, "free_symbols", set())
    if not batch_syms:
        return f"the batch size was specialised to {sym.batch} while tracing"
    if batch_syms & sym.seq.free_symbols:
        return "the batch and token sizes share a symbol"
    sym_b = TokenSymbols(sym.shape_env, sym.seq, sym.batch)  # the batch axis as the "token" axis
    pieces = [(r.nodes, r.side_inputs) for r in analysis.regions]
    if analysis.tail is not None:
        tail = set(analysis.tail.nodes)
        tail_sides = {a: None for n in analysis.tail.nodes for a in n.all_input_nodes if a not in tail}
        pieces.append((analysis.tail.nodes, [a for a in tail_sides if a is not analysis.tail.end]))
    # a proven expert dispatch or tiling is per (token, expert) row, so per sample too (dispatch.py, tiling.py)
    dispatch = analysis.judge.per_token if analysis.judge is not None else set()
    for nodes, sides in pieces:
        for n in nodes:
            if n.op not in ("call_function", "call_method") or n in dispatch:
                continue
            if is_sdpa(n):
                why = _attention_problem(n, analysis)
                if why:
                    return why
                continue
            form = classify(n, sym).attention
            if form == SINK:
                return (
                    f"attention {_where(n)} joins sink logits to its scores (attention sinks, gpt-oss's eager "
                    "attention): the packed layout runs SDPA attention only; the padded layout runs it exactly"
                )
            if form:
                return f"attention {_where(n)} is not SDPA (eager softmax or weights @ values)"
            verdict = classify(n, sym_b)
            if not verdict.token_wise:
                detail = verdict.detail or "attention outside SDPA"
                return f"{_where(n)} is not independent per sample: {detail} (batch axis)"
        for a in sides:
            why = _side_problem(a, analysis, sym_b)
            if why:
                return why
    return None
