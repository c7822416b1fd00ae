"""The packed kept layout: every sample's kept tokens in one row, (1, N), attention per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PackedLayout", "packed_layout"]


@dataclass
class PackedLayout:
    """Kept positions packed in one row; see `regate_fx.passes.kernels` (packed layout)."""

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
    sample = torch.repeat_interleave(torch.arange(b, device=keep.device), counts,
                                     output_size=flat_idx.numel())  # (N,) sample of each packed token
    pack_idx = sample * k + torch.arange(flat_idx.numel(), device=keep.device) - offsets[sample]  # (N,)
    cu_seqlens = F.pad(ends, (1, 0)).to(torch.int32)  # (B + 1,)
    return PackedLayout(flat_idx, pad_idx, pack_idx, cu_seqlens)
