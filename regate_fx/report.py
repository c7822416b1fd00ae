"""The structured rewrite report: what the ReGATE pass rewrote, what it left dense, and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import IO, cast

__all__ = ["BranchKind", "BranchRecord", "GraphReport", "OutsideRecord", "Reason", "RewriteReport", "group_outside"]


class Reason(str, enum.Enum):
    """Why a region of the graph was not rewritten. Tests assert on these."""

    TOKEN_MIXING = "token_mixing"
    """An op other than attention mixes positions along the token axis (conv, cumsum, ...)."""
    BATCH_MIXING = "batch_mixing"
    """An op mixes samples along the batch axis (a reduction over the batch, a scatter numbered
    across it): no per-sample result exists, even dense."""
    UNSUPPORTED_OP = "unsupported_op"
    """An op the pass does not know how to classify touches a token-indexed tensor."""
    ATTENTION_FORM = "attention_form"
    """Attention in a layout the rewrite cannot mask (not 4-D, batch not first, ...)."""
    ESCAPING_VALUE = "escaping_value"
    """An intermediate of the branch is used outside it (e.g. returned attention weights)."""
    NO_BATCH_AXIS = "no_batch_axis"
    """A token-indexed side input has no batch axis to gather per sample along."""
    SYMBOLIC_SIZE = "symbolic_size"
    """A size expression involving the sequence length cannot be re-derived for kept tokens."""
    HIGHER_ORDER_OP = "higher_order_op"
    """The computation is wrapped in a higher-order op whose body the pass does not enter
    (activation checkpointing, ``torch.cond``, ...)."""
    NO_STREAM = "no_stream"
    """No residual stream over (batch, tokens, hidden) was found in the graph."""
    SEQ_SPECIALIZED = "seq_specialized"
    """The sequence length was specialised to a constant while tracing."""
    REFUSED_NEIGHBOUR = "refused_neighbour"
    """Left dense because a branch it shares nodes with was refused."""


class BranchKind(str, enum.Enum):
    ATTENTION = "attention"
    MLP = "mlp"
    PARALLEL = "attention+mlp"
    OTHER = "other"


@dataclass
class BranchRecord:
    """One residual branch of the decoder stream.

    Attributes:
        index: position of the branch along the residual stream (0-based).
        layer: the decoder layer's module path, e.g. ``model.layers.3`` (from parameter names;
            display only, the pass never matches names).
        module: the branch's module path, e.g. ``model.layers.3.self_attn``.
        kind: attention, MLP, parallel attention+MLP, or other.
        attention: ``"sdpa"`` or ``"eager"`` when the branch contains attention.
        rewritten: True when the branch runs on kept tokens only.
        reason: why not, when ``rewritten`` is False.
        detail: human-readable explanation of ``reason``.
        num_ops: number of graph nodes in the branch.
    """

    index: int
    layer: str
    module: str
    kind: BranchKind
    attention: str | None
    rewritten: bool
    reason: Reason | None = None
    detail: str = ""
    num_ops: int = 0


@dataclass
class OutsideRecord:
    """A node outside every rewritten branch that mixes tokens, so the graph cannot run exact.

    Attributes:
        node: the graph node's name.
        module: the module path that made it (dynamo's ``nn_module_stack``), e.g. ``model.stem``.
        reason: why it mixes tokens.
        detail: human-readable explanation of ``reason``.
    """

    node: str
    module: str
    reason: Reason
    detail: str


def group_outside(outside: list[OutsideRecord]) -> list[tuple[str, OutsideRecord, int]]:
    """(module, first record, how many more) per module, in graph order: one line per module."""
    groups: dict[str, list[OutsideRecord]] = {}
    for o in outside:
        groups.setdefault(o.module, []).append(o)
    return [(m, rs[0], len(rs) - 1) for m, rs in groups.items()]


@dataclass
class GraphReport:
    """What happened to one captured graph."""

    name: str
    sparse: bool
    branches: list[BranchRecord] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)
    """Runs of consecutive rewritten branches (first, last index): the stream stays gathered inside."""
    gathered_inputs: list[str] = field(default_factory=list)
    """Token-indexed side inputs (rotary tables, masks, ...) gathered for the kept tokens."""
    tail_on_kept: bool = False
    """True when the final norm, LM head and loss run on kept positions only."""
    tail_detail: str = ""
    """Why the tail runs at full length, when it does."""
    causal_masks: int = 0
    """Attention masks proven causal on kept tokens: those SDPA calls use is_causal=True."""
    outside: list[OutsideRecord] = field(default_factory=list)
    """Token-mixing nodes outside every rewritten branch (each one is a refusal of the graph)."""
    layout: str = "padded"
    """How the kept tokens are laid out: ``"padded"`` (B, K) or ``"packed"`` (1, N), see
    :class:`~regate_fx.SparsifyConfig`'s ``layout``."""
    reason: Reason | None = None
    detail: str = ""
    static_sizes: dict[str, int] = field(default_factory=dict)
    """Sizes this graph was compiled for (``SparsifyConfig(dynamic=None)``'s first graph): symbol
    -> value, guarded; empty when every size is symbolic."""

    @property
    def refused(self) -> list[BranchRecord]:
        return [b for b in self.branches if not b.rewritten]

    @property
    def exact(self) -> bool:
        """True when the graph runs exact on kept tokens: nothing refused, nothing mixing outside."""
        return bool(self.branches) and not self.refused and not self.outside and self.reason is None


@dataclass
class RewriteReport:
    """All graphs captured by one sparsified model, newest last. Renders as a rich table."""

    graphs: list[GraphReport] = field(default_factory=list)
    packed_refused: str = ""
    """Why this model's graph cannot use the packed layout (empty: it can, or it was not tried)."""

    @property
    def sparse_graph(self) -> GraphReport | None:
        """The newest graph captured with a keep mask, if any."""
        for g in reversed(self.graphs):
            if g.sparse:
                return g
        return None

    @property
    def branches(self) -> list[BranchRecord]:
        g = self.sparse_graph
        return g.branches if g else []

    @property
    def num_rewritten(self) -> int:
        return sum(b.rewritten for b in self.branches)

    @property
    def refused(self) -> list[BranchRecord]:
        return [b for b in self.branches if not b.rewritten]

    @property
    def outside(self) -> list[OutsideRecord]:
        g = self.sparse_graph
        return g.outside if g else []

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        g = self.sparse_graph
        if g is None:
            return Text("regate_fx: no graph captured with a keep mask yet (call the model once).")
        if g.reason is not None and not g.branches:
            return Text(f"regate_fx: graph not rewritten: {g.reason.value}: {g.detail}", style="red")
        table = Table(title=f"ReGATE rewrite report ({self.num_rewritten}/{len(g.branches)} branches on kept tokens)")
        for col in ("#", "layer", "branch", "kind", "attention", "status", "why not"):
            table.add_column(col)
        for b in g.branches:
            status = Text("kept-only", style="green") if b.rewritten else Text("DENSE", style="bold red")
            why = f"{b.reason.value}: {b.detail}" if b.reason else ""
            table.add_row(str(b.index), b.layer, b.module, b.kind.value, b.attention or "-", status, why)
        for module, first, more in group_outside(g.outside):  # mixing outside every branch: refused
            extra = f" (+{more} more ops)" if more else ""
            table.add_row(
                "-",
                "-",
                module,
                "outside branches",
                "-",
                Text("REFUSED", style="bold red"),
                f"{first.reason.value}: {first.detail}{extra}",
            )
        notes = [
            f"regions (stream stays gathered inside): {', '.join(f'{a}-{b}' for a, b in g.regions) or 'none'}",
            f"gathered side inputs: {len(g.gathered_inputs)}",
            f"attention masks proven causal on kept tokens (SDPA is_causal fast path): {g.causal_masks}",
            f"kept layout: {g.layout}"
            + (f" (packed layout not possible: {self.packed_refused})" if self.packed_refused else ""),
            "final norm / LM head / loss on kept tokens only: "
            + ("yes" if g.tail_on_kept else f"no ({g.tail_detail})"),
            "sizes: "
            + (
                f"static ({', '.join(f'{k}={v}' for k, v in g.static_sizes.items())}; a call with other "
                "sizes recompiles once, symbolic)"
                if g.static_sizes
                else "symbolic (every batch size, length and kept count)"
            ),
        ]
        return Group(table, Text("\n".join(notes)))

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=cast(IO[str], _Null()))  # write and flush are all it uses
        console.print(self)
        return console.export_text()

    __repr__ = __str__


class _Null:
    def write(self, *_):
        pass

    def flush(self):
        pass
