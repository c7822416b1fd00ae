"""The packed kept layout: every sample's kept tokens in one row, (1, N), attention per sample.

    flat_idx   (N,)    flat position b * T + t of every kept token, ascending
    pad_idx    (B, K)  for attention: sample b's kept tokens as indices into N, then padding
                       slots repeating its last kept token (causal: no real query sees them)
    pack_idx   (N,)    where each packed token sits in the flattened (B * K) padded view
    cu_seqlens (B + 1,) int32 cumulative kept counts (varlen attention)

In the graph: (B, T, ...) values become (1, N, ...), sizes equal to T become N and sizes equal to
B become 1, and every causal SDPA call becomes `packed_attention` (each sample's tokens attend
among themselves). `passes/packed.py` says when a graph allows it; when it does not, `"auto"`
falls back to the padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX
from regate_fx.layouts.base import GraphLayout, Layout
from regate_fx.layouts.padded import PADDED
from regate_fx.passes.graph import TokenSymbols, is_sdpa, sdpa_arg
from regate_fx.passes.kernels import kept_rows_packed, pack_tokens, packed_attention, packed_rows, unpack_tokens
from regate_fx.passes.packed import packed_problem

__all__ = ["PACKED", "Packed", "PackedGraph", "PackedLayout", "packed_layout"]


@dataclass
class PackedLayout:
    """Kept positions packed in one row (the tensors: see the module doc)."""

    flat_idx: torch.Tensor  # (N,) long: b * T + t of every kept token, ascending
    pad_idx: torch.Tensor  # (B, K) long: sample b's tokens as indices into N, padded with its last
    pack_idx: torch.Tensor  # (N,) long: each token's slot in the flattened (B * K) padded view
    cu_seqlens: torch.Tensor  # (B + 1,) int32: cumulative kept counts

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.flat_idx, self.pad_idx, self.pack_idx, self.cu_seqlens


def packed_layout(keep: torch.Tensor) -> PackedLayout:
    """Build the packed kept layout of a bool keep mask (B, T); every row must keep >= 1 position."""
    b, t = keep.shape
    counts = keep.sum(1)  # (B,)
    k = min(max(int(counts.max()), 2), t)  # K >= 2: never specialised by dynamo (as kept_layout)
    flat_idx = keep.flatten().nonzero().squeeze(1)  # (N,)
    ends = counts.cumsum(0)  # (B,)
    offsets = ends - counts  # (B,) first packed index of each sample
    slot = torch.arange(k, device=keep.device)  # (K,)
    pad_idx = offsets[:, None] + torch.minimum(slot[None, :], (counts - 1)[:, None])  # (B, K)
    sample = torch.repeat_interleave(
        torch.arange(b, device=keep.device), counts, output_size=flat_idx.numel()
    )  # (N,) sample of each packed token
    pack_idx = sample * k + torch.arange(flat_idx.numel(), device=keep.device) - offsets[sample]  # (N,)
    cu_seqlens = F.pad(ends, (1, 0)).to(torch.int32)  # (B + 1,)
    return PackedLayout(flat_idx, pad_idx, pack_idx, cu_seqlens)


class Packed(Layout):
    """The (1, N) layout: only where `passes/packed.py` allows it; falls back to padded."""

    name = "packed"
    roles = ("flat_idx", "pad_idx", "pack_idx", "cu_seqlens")
    dynamic_dims = ((0,), (0, 1), (0,), (0,))
    fallback = PADDED

    def build(self, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return packed_layout(keep).tensors()

    def outputs(self, logits, tensors, labels, inputs, return_logits):
        """Logits / loss / token loss from the packed kept rows (N, V)."""
        # kept_rows_packed marks the output for the pass (as kept_rows, padded.py) and brings the
        # packed layout into the graph.
        kept_logits = kept_rows_packed(logits, *tensors)  # (N, V)
        flat_idx = tensors[0]
        seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)
        full_logits = None
        if return_logits:  # (B, T, V), zero where pruned
            full_logits = kept_logits.new_zeros(b * t, v).index_copy(0, flat_idx, kept_logits).view(b, t, v)
        loss = token_loss = None
        if labels is not None:
            target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[flat_idx]  # (N,) label of p+1
            counted = target != IGNORE_INDEX
            ce = F.cross_entropy(kept_logits.float(), target.clamp(min=0), reduction="none")  # (N,)
            ce = torch.where(counted, ce, 0.0)
            loss = ce.sum() / counted.sum().clamp(min=1)
            token_loss = ce.new_zeros(b * t).index_copy(0, flat_idx, ce).view(b, t)  # (B, T)
        return full_logits, loss, token_loss

    def problem(self, analysis) -> str | None:
        return packed_problem(analysis) if analysis.regions else None

    def applies(self, keep: torch.Tensor) -> bool:
        return keep.size(0) >= 2  # one sample: nothing to pack

    def worth(self, keep: torch.Tensor, min_waste: float) -> bool:
        """Whether the padded layout of this step would waste at least `min_waste` of its slots."""
        if not self.applies(keep):
            return False
        counts = keep.sum(1)
        waste = 1.0 - float(counts.sum()) / (keep.size(0) * max(int(counts.max()), 2))  # of the (B, K) slots
        return waste >= min_waste

    def refusal(self, report) -> str:
        return report.packed_refused

    def note_refusal(self, report, why: str) -> None:
        report.packed_refused = why

    def graph(self, nodes: dict[str, fx.Node]) -> "PackedGraph":
        return PackedGraph(*(nodes[r] for r in self.roles))


PACKED = Packed()


@dataclass
class PackedGraph(GraphLayout):
    """Placeholders carrying the packed layout into the graph, and the rewrite's steps on it."""

    flat_idx: fx.Node
    pad_idx: fx.Node
    pack_idx: fx.Node
    cu_seqlens: fx.Node

    scatters = frozenset({unpack_tokens})

    def length(self, graph: fx.Graph) -> fx.Node:
        return graph.call_method("size", (self.flat_idx, 0))  # N, the packed length

    def gather_side(self, graph: fx.Graph, a: fx.Node, dims: tuple[int, ...]) -> fx.Node:
        return graph.call_function(pack_tokens, (a, self.flat_idx, dims[0]))  # T -> N

    def gather_stream(self, graph: fx.Graph, start: fx.Node) -> fx.Node:
        return graph.call_function(pack_tokens, (start, self.flat_idx))  # (1, N, D)

    def scatter_stream(self, graph: fx.Graph, start: fx.Node, kept_value: fx.Node) -> fx.Node:
        return graph.call_function(unpack_tokens, (start, kept_value, self.flat_idx))  # (B, T, D)

    def changes_size(self, sym: TokenSymbols, v) -> bool:
        # The batch axis is gone too (B -> 1); sizes are read with the roles swapped.
        sym_b = self.__dict__.get("_sym_b")
        if sym_b is None:
            sym_b = self._sym_b = TokenSymbols(sym.shape_env, sym.seq, sym.batch)
        return sym.size_has_seq(v) or sym_b.size_has_seq(v)

    def new_size(self, sym: TokenSymbols, v, length: fx.Node):
        if sym.is_seq(v):
            return length
        return 1 if sym.is_batch(v) else None

    def attention(self, graph: fx.Graph, n: fx.Node, new: fx.Node, sym: TokenSymbols, causal_masks: set) -> fx.Node:
        """Replace a replayed causal SDPA call by attention of each sample's packed tokens (packed.py
        proved every SDPA call causal on this graph's tokens, and refused any other attention)."""
        if not is_sdpa(n):
            return new
        q, k, v = (sdpa_arg(new, r) for r in ("query", "key", "value"))
        with graph.inserting_after(new):
            out = graph.call_function(
                packed_attention,
                (q, k, v, self.pad_idx, self.pack_idx, self.cu_seqlens),
                {"scale": sdpa_arg(new, "scale"), "enable_gqa": sdpa_arg(new, "enable_gqa", False)},
            )  # (1, H, N, d)
        new.replace_all_uses_with(out)
        graph.erase_node(new)
        return out

    def take_rows(self, n: fx.Node) -> None:  # tail left dense
        n.target, n.args, n.kwargs = packed_rows, (n.args[0], self.flat_idx), {}

    def tail_rows(self, graph: fx.Graph, rows: fx.Node) -> fx.Node:
        """`kept_rows_packed(x, ...)` asked for (N, V); the replayed x is (1, N, V)."""
        with graph.inserting_after(rows):
            return graph.call_method("squeeze", (rows, 0))  # (N, V); a view: no zero-filled (1, N, V) grad
