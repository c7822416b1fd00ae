"""What `regate-fx inspect` says of one model: the verdict, the reasons, the branches and FLOPs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["BranchInfo", "InspectResult", "ReasonInfo"]

VERDICTS = ("exact-sparse", "refused", "error")
EXIT_CODES = {"exact-sparse": 0, "refused": 1, "error": 2}


# --- the result ----------------------------------------------------------------------------------


@dataclass
class ReasonInfo:
    """One reason from the rewrite report: ``reason`` is a :class:`~regate_fx.Reason` name."""

    reason: str
    text: str
    where: str = ""


@dataclass
class BranchInfo:
    index: int
    layer: str
    module: str
    kind: str
    rewritten: bool
    reason: str | None = None
    flops: int | None = None


@dataclass
class InspectResult:
    """What :func:`inspect_model` found. ``verdict`` is ``"exact-sparse"``, ``"refused"`` or ``"error"``."""

    target: str
    family: str | None = None
    config_class: str | None = None
    model_class: str | None = None
    auto_class: str | None = None
    verdict: str = "error"
    reasons: list[ReasonInfo] = field(default_factory=list)
    error: str = ""
    branches: list[BranchInfo] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """What runs on kept tokens: branch modules, plus the tail when it does."""
    dense: list[str] = field(default_factory=list)
    """What stays dense (full length), each with why."""
    kept_flop_fraction: float | None = None
    """Share of the decoder layers' FLOPs in branches that run on kept tokens (module docstring)."""
    kept_flop_fraction_model: float | None = None
    """The same over the whole forward's FLOPs (embeddings, LM head, ...): the tail counts as kept
    when it runs on kept tokens."""
    branches_rewritten: int = 0
    tail_on_kept: bool | None = None
    oracle_max_diff: float | None = None
    oracle_loss_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return asdict(self)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        style = {"exact-sparse": "bold green", "refused": "bold yellow", "error": "bold red"}[self.verdict]
        head = Text.assemble(
            ("verdict: ", "bold"),
            (self.verdict, style),
            f"   {self.family or '?'} -> {self.model_class or '?'} ({self.seconds:.1f} s)",
        )
        parts: list = [head]
        if self.kept_flop_fraction is not None:
            whole = (
                ""
                if self.kept_flop_fraction_model is None
                else f"; {self.kept_flop_fraction_model:.0%} of the whole forward's"
            )
            parts.append(
                Text(
                    f"layer FLOPs on kept tokens: {self.kept_flop_fraction:.0%}{whole} "
                    f"({self.branches_rewritten}/{len(self.branches)} branches; tail on kept tokens: "
                    f"{'yes' if self.tail_on_kept else 'no'})"
                )
            )
        if self.branches:
            t = Table(title="residual branches")
            for col in ("#", "module", "kind", "runs", "why not", "FLOPs"):
                t.add_column(col)
            for b in self.branches:
                t.add_row(
                    str(b.index),
                    b.module,
                    b.kind,
                    Text("kept tokens", style="green") if b.rewritten else Text("dense", style="red"),
                    b.reason or "",
                    "-" if b.flops is None else f"{b.flops:,}",
                )
            parts.append(t)
        if self.reasons:
            t = Table(title="why refused")
            for col in ("reason", "where", "detail"):
                t.add_column(col)
            for r in self.reasons:
                t.add_row(r.reason, r.where, r.text)
            parts.append(t)
        if self.dense:
            parts.append(Text("stays dense:\n" + "\n".join(f"  - {d}" for d in self.dense)))
        if self.error:
            parts.append(Text(self.error, style="red"))
        for n in self.notes:
            parts.append(Text(f"note: {n}", style="dim"))
        return Group(*parts)
