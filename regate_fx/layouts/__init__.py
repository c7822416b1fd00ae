"""The kept layouts: how a sparse step lays out the kept tokens, and which one a step runs on.

    base.py     the interface (`Layout`, its graph half `GraphLayout`, `LayoutRefused`)
    padded.py   (B, K): each sample's kept tokens in a row of its own, padded to the longest
    packed.py   (1, N): every sample's kept tokens in one row, attention per sample

A third layout (varlen for flash-attn, a sharded one) is a third file, listed in `LAYOUT_KINDS`
and `BY_NAME`; the step, the backend and the rewrite ask the layout and never which one it is.
"""

from __future__ import annotations

import torch

from regate_fx.layouts.base import GraphLayout, Layout, LayoutRefused
from regate_fx.layouts.packed import PACKED, PackedLayout, packed_layout
from regate_fx.layouts.padded import PADDED, KeptLayout, kept_layout

__all__ = [
    "BY_NAME",
    "GraphLayout",
    "KeptLayout",
    "LAYOUT_KINDS",
    "Layout",
    "LayoutRefused",
    "PACKED",
    "PADDED",
    "PackedLayout",
    "choose_layout",
    "kept_layout",
    "packed_layout",
]

LAYOUT_KINDS: tuple[Layout, ...] = (PADDED, PACKED)
BY_NAME: dict[str, Layout] = {k.name: k for k in LAYOUT_KINDS}


def choose_layout(setting: str, keep: torch.Tensor, min_waste: float, report) -> Layout:
    """The layout a step with bool (B, T) `keep` runs on, for ``SparsifyConfig.layout`` `setting`.

    ``"auto"``: packed when it would save at least `min_waste` of the padded layout's slots and
    this model's graph has not refused it (`report`), padded otherwise. A named layout: that one,
    or its fallback where it does not apply to the step (packing a single sample).
    """
    if setting == "auto":
        return PACKED if not PACKED.refusal(report) and PACKED.worth(keep, min_waste) else PADDED
    kind = BY_NAME[setting]
    if kind.applies(keep):
        return kind
    assert kind.fallback is not None, f"the {kind.name} layout may not apply, so it names a fallback"
    return kind.fallback
