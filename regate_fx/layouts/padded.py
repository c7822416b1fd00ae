"""The padded kept layout: every sample's kept tokens in a row of its own, (B, K).

    gather_idx  (B, K)  kept positions of each sample in ascending order, then padding slots that
                        repeat the sample's last kept position (so every row of every mask is a
                        real row and no softmax row is empty)
    scatter_idx (B, K)  the same kept positions, then distinct *pruned* positions for the padding
                        slots: the scatter is a permutation, deterministic and duplicate-free
    valid       (B, K)  True for real kept slots

In the graph: a region's stream is gathered once on entry, side inputs are gathered along each of
their token axes, sizes equal to T become K, attention masks out the padding slots as keys, and
the stream leaving a region is scattered back (`passes/rewrite.py` drives it, `base.py` says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX
from regate_fx.layouts.base import GraphLayout, Layout
from regate_fx.passes.graph import TokenSymbols, is_sdpa, node_value, op_name, sdpa_arg, set_sdpa_arg
from regate_fx.passes.kernels import (
    gather_tokens,
    kept_rows,
    mask_keys_scores,
    mask_keys_weights,
    scatter_tokens,
    sdpa_key_mask,
)
from regate_fx.passes.ops import classify
from regate_fx.passes.sinks import SINK, scores_operand

__all__ = ["KeptLayout", "PADDED", "Padded", "PaddedGraph", "kept_layout"]


@dataclass
class KeptLayout:
    """Kept positions in a padded (B, K) layout (the tensors: see the module doc)."""

    gather_idx: torch.Tensor  # (B, K) long
    scatter_idx: torch.Tensor  # (B, K) long
    valid: torch.Tensor  # (B, K) bool

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.gather_idx, self.scatter_idx, self.valid


def kept_layout(keep: torch.Tensor) -> KeptLayout:
    """Build the padded kept layout of a bool keep mask (B, T); every row must keep >= 1 position."""
    b, t = keep.shape
    counts = keep.sum(1)  # (B,)
    # K >= 2 so dynamo never specialises the kept length to 0/1 (that would recompile).
    k = min(max(int(counts.max()), 2), t)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, each ascending
    scatter_idx = order[:, :k].contiguous()  # (B, K)
    valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]  # (B, K)
    last = scatter_idx.gather(1, (counts - 1).clamp(min=0)[:, None])  # (B, 1) last kept position
    gather_idx = torch.where(valid, scatter_idx, last)  # (B, K)
    return KeptLayout(gather_idx, scatter_idx, valid)


class Padded(Layout):
    """The (B, K) layout: always possible once the pass accepts a graph."""

    name = "padded"
    roles = ("gather_idx", "scatter_idx", "valid")
    dynamic_dims = ((0, 1), (0, 1), (0, 1))

    def build(self, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return kept_layout(keep).tensors()

    def outputs(self, logits, tensors, labels, inputs, return_logits):
        gather_idx, scatter_idx, valid = tensors
        # kept_rows marks the output for the pass: it replays the tail (final norm, LM head) on the
        # kept rows, so the full-length logits are never computed.
        kept_logits = kept_rows(logits, gather_idx)  # (B, K, V); padding slots repeat a kept row
        full_logits = None
        if return_logits:
            seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)  # not logits.size(): keeps (B, T, V) alive
            rows = torch.where(valid, scatter_idx, t)  # (B, K): padding slots go to a spare row T
            full_logits = kept_logits.new_zeros(b, t + 1, v).scatter(
                1, rows.unsqueeze(-1).expand(-1, -1, v), kept_logits
            )[:, :t]  # (B, T, V), zero where pruned
        loss = token_loss = None
        if labels is not None:
            target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).gather(1, gather_idx)  # (B, K)
            counted = valid & (target != IGNORE_INDEX)
            ce = F.cross_entropy(
                kept_logits.flatten(0, 1).float(), target.clamp(min=0).flatten(), reduction="none"
            ).view_as(target)  # (B, K)
            ce = torch.where(counted, ce, 0.0)
            loss = ce.sum() / counted.sum().clamp(min=1)
            token_loss = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).scatter(1, scatter_idx, ce)
        return full_logits, loss, token_loss

    def graph(self, nodes: dict[str, fx.Node]) -> "PaddedGraph":
        return PaddedGraph(*(nodes[r] for r in self.roles))


PADDED = Padded()


@dataclass
class PaddedGraph(GraphLayout):
    """Placeholders carrying the padded layout into the graph, and the rewrite's steps on it."""

    gather_idx: fx.Node
    scatter_idx: fx.Node
    valid: fx.Node

    scatters = frozenset({scatter_tokens})

    def length(self, graph: fx.Graph) -> fx.Node:
        return graph.call_method("size", (self.gather_idx, 1))  # K, the kept length

    def gather_side(self, graph: fx.Graph, a: fx.Node, dims: tuple[int, ...]) -> fx.Node:
        return graph.call_function(gather_tokens, (a, self.gather_idx, dims))  # T -> K

    def gather_stream(self, graph: fx.Graph, start: fx.Node) -> fx.Node:
        return graph.call_function(gather_tokens, (start, self.gather_idx, (1,)))  # (B, K, D)

    def gather_padding(self, graph: fx.Graph, a: fx.Node) -> fx.Node:
        kept = graph.call_function(gather_tokens, (a, self.gather_idx, (1,)))  # (B, K); slots repeat a real token
        return graph.call_function(torch.mul, (kept, self.valid))  # (B, K): zero at the padding slots

    def scatter_stream(self, graph: fx.Graph, start: fx.Node, kept_value: fx.Node) -> fx.Node:
        return graph.call_function(scatter_tokens, (start, kept_value, self.scatter_idx, self.valid))  # (B, T, D)

    def attention(self, graph: fx.Graph, n: fx.Node, new: fx.Node, sym: TokenSymbols, causal_masks: set) -> fx.Node:
        valid = self.valid
        if is_sdpa(n) and sdpa_arg(n, "attn_mask") in causal_masks:
            set_sdpa_arg(new, "attn_mask", None)  # proven "causal AND key is real": masks.py
            set_sdpa_arg(new, "is_causal", True)
        elif is_sdpa(n) and sym.token_dims(node_value(sdpa_arg(n, "key"))):  # not cross-attention
            _mask_sdpa_keys(graph, new, valid)
        else:
            form = classify(n, sym).attention if n.op in ("call_function", "call_method") else None
            if form == "softmax":  # -inf on padding-slot keys before the normalisation
                with graph.inserting_before(new):
                    masked = graph.call_function(mask_keys_scores, (new.args[0], valid))
                new.update_arg(0, masked)
            elif form == SINK and op_name(n) in ("cat", "concat", "concatenate"):
                # Attention with sinks (gpt-oss): -inf on the padding-slot keys of the scores operand
                # before the join, so the row max and the softmax see the oracle's columns only.
                i = scores_operand(n, sym)
                assert i is not None  # sinks.sink_form proved the join
                operands = list(cast(list, new.args[0]))
                with graph.inserting_before(new):
                    operands[i] = graph.call_function(mask_keys_scores, (operands[i], valid))  # (B, H, K, K)
                new.update_arg(0, operands)  # joined: (B, H, K, K + c)
            elif form == "pv" and not _from_softmax(n.args[0], sym):
                # Weights formed without a softmax (sigmoid attention, ...): zero the padding-slot
                # keys where the weights meet the values.
                with graph.inserting_before(new):
                    masked = graph.call_function(mask_keys_weights, (new.args[0], valid))  # (B, ..., K, K)
                new.update_arg(0, masked)
        return new

    def take_rows(self, n: fx.Node) -> None:
        n.target, n.args, n.kwargs = gather_tokens, (n.args[0], self.gather_idx, (1,)), {}


_VALUE_KEEPING = {"dropout", "to", "type_as", "contiguous", "float", "half", "bfloat16", "clone", "detach"}


def _from_softmax(w: fx.node.Argument, sym: TokenSymbols) -> bool:
    """Whether attention weights are a (key-masked) softmax, through dropout and casts only (a sink
    form's slice to the key columns: its scores were masked before the join)."""
    while isinstance(w, fx.Node) and w.op in ("call_function", "call_method") and op_name(w) in _VALUE_KEEPING:
        w = w.args[0]
    return (
        isinstance(w, fx.Node)
        and w.op in ("call_function", "call_method")
        and classify(w, sym).attention in ("softmax", SINK)
    )


def _mask_sdpa_keys(graph: fx.Graph, new: fx.Node, valid: fx.Node) -> None:
    """Padding slots sit after every real slot, so causal attention never sees them as keys."""
    mask = sdpa_arg(new, "attn_mask")
    if mask is None and sdpa_arg(new, "is_causal", False):
        return
    with graph.inserting_before(new):
        set_sdpa_arg(new, "attn_mask", graph.call_function(sdpa_key_mask, (mask, valid)))
