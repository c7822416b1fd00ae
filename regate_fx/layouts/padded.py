"""The padded kept layout: every sample's kept tokens in a row of its own, (B, K)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KeptLayout", "kept_layout"]


@dataclass
class KeptLayout:
    """Kept positions in a padded (B, K) layout; see `regate_fx.passes.rewrite` for the contract."""

    gather_idx: torch.Tensor  # (B, K) long
    scatter_idx: torch.Tensor  # (B, K) long
    valid: torch.Tensor  # (B, K) bool


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
