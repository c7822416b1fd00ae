"""Rewrite accepted regions into gather -> compute on kept tokens -> scatter form.

Layout of the kept tokens (built outside the graph, see `regate_fx.sparse.kept_layout`):

    gather_idx  (B, K)  kept positions of each sample in ascending order, then padding slots that
                        repeat the sample's last kept position (so every row of every mask is a
                        real row and no softmax row is empty)
    scatter_idx (B, K)  the same kept positions, then distinct *pruned* positions for the padding
                        slots: the scatter is a permutation, deterministic and duplicate-free
    valid       (B, K)  True for real kept slots

A region's stream is gathered once on entry, every node of the region is replayed on (B, K, ...)
tensors, every token-indexed side input (rotary tables, 4-D masks, position ids, earlier stream
values) is gathered along each of its token axes, sizes equal to T become K, and attention masks
out the padding slots as keys. The stream value leaving the region is scattered back into the
stream value that entered it: pruned positions are carried unchanged, as the method requires.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from regate_fx.passes.analyse import Analysis, Region
from regate_fx.passes.graph import TokenSymbols, node_value

__all__ = ["KeptInputs", "gather_tokens", "mask_keys_scores", "scatter_tokens", "sdpa_key_mask", "rewrite"]


# --- functions the rewritten graph calls (traced through by aot_autograd / inductor) -----------

def gather_tokens(x: torch.Tensor, gather_idx: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Gather `x` at the kept positions along each token axis in `dims` (batch axis first)."""
    b, k = gather_idx.shape
    if x.size(0) != b:
        x = x.expand(b, *x.shape[1:])  # (1, ...) broadcast over the batch -> (B, ...)
    for d in dims:
        shape = [1] * x.dim()
        shape[0], shape[d] = b, k
        sizes = list(x.shape)
        sizes[d] = k
        x = x.gather(d, gather_idx.view(shape).expand(sizes))  # token axis d: T -> K
    return x


def scatter_tokens(base: torch.Tensor, kept: torch.Tensor, scatter_idx: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """Write `kept` (B, K, D) back into `base` (B, T, D); padding slots rewrite pruned rows unchanged."""
    idx = scatter_idx.unsqueeze(-1).expand(-1, -1, base.size(-1))  # (B, K, D)
    src = torch.where(valid.unsqueeze(-1), kept.to(base.dtype), base.gather(1, idx))  # (B, K, D)
    return base.scatter(1, idx, src)  # (B, T, D)


def sdpa_key_mask(mask: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Combine an SDPA attention mask with the key validity of the padded kept layout."""
    keys = valid[:, None, None, :]  # (B, 1, 1, K)
    if mask is None:
        return keys
    if mask.dtype == torch.bool:
        return mask & keys  # (B, H|1, K, K)
    return mask.masked_fill(~keys, float("-inf"))


def mask_keys_scores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask padding-slot keys in eager attention scores (B, H, K, K) before the softmax."""
    return scores.masked_fill(~valid[:, None, None, :], float("-inf"))


# --- the rewrite --------------------------------------------------------------------------------

@dataclass
class KeptInputs:
    """Placeholders carrying the kept layout into the graph."""

    gather_idx: fx.Node
    scatter_idx: fx.Node
    valid: fx.Node


def _sdpa_is_causal(node: fx.Node) -> bool:
    return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))


def rewrite(gm: fx.GraphModule, analysis: Analysis, kept: KeptInputs) -> list[str]:
    """Rewrite every region of `analysis` in place. Returns the names of gathered side inputs."""
    graph = gm.graph
    sym = analysis.sym
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        k_node = graph.call_method("size", (kept.gather_idx, 1))  # K, the kept length
    gathered: dict[fx.Node, fx.Node] = {}

    def gathered_side(a: fx.Node) -> fx.Node:
        if a not in gathered:
            dims = sym.token_dims(node_value(a))
            with graph.inserting_after(a if a.op != "placeholder" else k_node):
                gathered[a] = graph.call_function(gather_tokens, (a, kept.gather_idx, dims))
        return gathered[a]

    for region in analysis.regions:
        _rewrite_region(graph, region, sym, kept, k_node, gathered_side)
    gm.recompile()
    return [a.name for a in gathered]


def _rewrite_region(graph: fx.Graph, region: Region, sym: TokenSymbols, kept: KeptInputs,
                    k_node: fx.Node, gathered_side) -> None:
    members = set(region.nodes)
    env: dict[fx.Node, fx.Node] = {}
    start = region.start
    with graph.inserting_after(start):
        env[start] = graph.call_function(gather_tokens, (start, kept.gather_idx, (1,)))  # (B, K, D)

    def sym_k(a: fx.Node, before: fx.Node) -> fx.Node:
        """Rebuild a size expression (analyse._sym_derivable said it can be) with T replaced by K."""
        if sym.is_seq(node_value(a)):
            return k_node
        with graph.inserting_before(before):
            new = graph.node_copy(a, lambda x: lookup(x, before))
        new.meta = {}
        return new

    def lookup(a: fx.Node, at: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        v = node_value(a)
        if isinstance(v, torch.Tensor) and sym.token_dims(v):
            return gathered_side(a)
        if not isinstance(v, torch.Tensor) and sym.size_has_seq(v):
            return sym_k(a, at)
        return a

    for n in region.nodes:
        with graph.inserting_after(n):
            new = graph.node_copy(n, lambda a, n=n: lookup(a, n))
        new.meta = {}
        env[n] = new
        if n.op == "call_function" and "scaled_dot_product_attention" in getattr(n.target, "__name__", ""):
            _mask_sdpa_keys(graph, new, kept.valid, causal=_sdpa_is_causal(n))
        elif _is_attention_softmax(n, sym):
            with graph.inserting_before(new):
                masked = graph.call_function(mask_keys_scores, (new.args[0], kept.valid))
            new.update_arg(0, masked)

    # Stream values leaving the region (its end, and any stream value used after it).
    for n in region.nodes:
        outside = [u for u in n.users if u not in members and u not in env.values()]
        if not outside:
            continue
        with graph.inserting_after(env[n]):
            full = graph.call_function(scatter_tokens, (start, env[n], kept.scatter_idx, kept.valid))
        for u in outside:
            u.replace_input_with(n, full)
    for n in reversed(region.nodes):
        if not n.users:
            graph.erase_node(n)


def _is_attention_softmax(n: fx.Node, sym: TokenSymbols) -> bool:
    from regate_fx.passes.ops import classify

    return n.op in ("call_function", "call_method") and classify(n, sym).attention == "softmax"


def _mask_sdpa_keys(graph: fx.Graph, new: fx.Node, valid: fx.Node, causal: bool) -> None:
    """Padding slots sit after every real slot, so causal attention never sees them as keys."""
    mask = new.args[3] if len(new.args) > 3 else new.kwargs.get("attn_mask")
    if mask is None and causal:
        return
    with graph.inserting_before(new):
        combined = graph.call_function(sdpa_key_mask, (mask, valid))
    if len(new.args) > 3:
        new.update_arg(3, combined)
    else:
        new.update_kwarg("attn_mask", combined)


_ = operator
