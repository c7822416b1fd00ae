"""The kept layouts: how a sparse step lays out the kept tokens (padded (B, K), packed (1, N))."""

from regate_fx.layouts.packed import PackedLayout, packed_layout
from regate_fx.layouts.padded import KeptLayout, kept_layout

__all__ = ["KeptLayout", "PackedLayout", "kept_layout", "packed_layout"]
