"""Gather and scatter helpers of the gathered execution (``SparsifyConfig(execution="gathered")``).

The kept tokens are laid out padded, (B, K), exactly as the rewrite's padded layout does
(``layouts/padded.py``): each sample's kept positions in ascending order, then padding slots that
repeat its last kept position; ``valid`` marks the real slots. The padding slots sit after every
real slot, so a causal attention with ``valid`` as its (B, K) padding mask never lets a real
token see them, and their own outputs are dropped.

Everything here works on eager tensors (no graph): the gathered step calls the model's own,
unmodified modules on the results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX

__all__ = [
    "gather_decoder_kwargs",
    "gather_positions",
    "gather_tokens",
    "kept_outputs",
    "scatter_logits",
]


def gather_tokens(x: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """The kept rows of a (B, T, ...) tensor: (B, K, ...). Differentiable (an index gather)."""
    idx = gather_idx.view(*gather_idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])  # (B, K, ...)
    return x.gather(1, idx)  # (B, K, ...)


def gather_positions(pos: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """Original position ids at the kept positions, in every layout transformers uses.

    (B, T) -> (B, K); (1, T) shared by the batch -> (B, K); (T,) -> (B, K);
    (n, B, T) M-RoPE (Qwen2-VL's (3, B, T), (4, B, T) with text positions first) -> (n, B, K);
    (n, 1, T) -> (n, B, K).
    """
    b, k = gather_idx.shape
    if pos.dim() == 1:  # (T,)
        return pos[gather_idx]  # (B, K)
    if pos.dim() == 2:  # (B, T) or (1, T)
        return pos.expand(b, -1).gather(1, gather_idx)  # (B, K)
    if pos.dim() == 3:  # (n, B, T) or (n, 1, T)
        full = pos.expand(-1, b, -1)  # (n, B, T)
        return full.gather(2, gather_idx[None].expand(pos.size(0), -1, -1))  # (n, B, K)
    raise ValueError(f"position ids of shape {tuple(pos.shape)}: expected (T,), (B, T), (1, T) or (n, B, T)")


def gather_decoder_kwargs(
    kwargs: dict, seq_name: str, gather_idx: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor
) -> dict:
    """The decoder's keyword arguments at the kept tokens.

    Args:
        kwargs: what the decoder was called with at full length (already checked by the proof:
            only the sequence, a 2-D padding mask, position ids and per-sample inputs).
        seq_name: ``"inputs_embeds"`` (B, T, D) or ``"input_ids"`` (B, T).
        gather_idx: (B, K) kept positions, padding slots repeating the last kept one.
        valid: (B, K) True at real kept slots.
        positions: the full-length original position ids (see :func:`gather_positions`).
    """
    out = dict(kwargs)
    out[seq_name] = gather_tokens(kwargs[seq_name], gather_idx)  # (B, K, D) or (B, K)
    out["position_ids"] = gather_positions(positions, gather_idx)  # (B, K) or (n, B, K)
    out["attention_mask"] = valid.to(torch.long)  # (B, K): the padding mask of the kept layout
    if isinstance(out.get("cache_position"), torch.Tensor):  # (T,) -> (K,): indices of the kept layout
        out["cache_position"] = torch.arange(gather_idx.size(1), device=gather_idx.device)
    return out


def kept_outputs(
    kept_logits: torch.Tensor,
    gather_idx: torch.Tensor,
    scatter_idx: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    seq_len: int,
    return_logits: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(full logits or None, loss, token loss) from the kept-layout logits (B, K, V), as the
    oracle defines them: the prediction at kept position p is scored on the label of p + 1."""
    full = scatter_logits(kept_logits, scatter_idx, valid, seq_len) if return_logits else None
    if labels is None:
        return full, None, None
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).gather(1, gather_idx)  # (B, K): label of p + 1
    counted = valid & (target != IGNORE_INDEX)  # (B, K)
    ce = F.cross_entropy(kept_logits.flatten(0, 1).float(), target.clamp(min=0).flatten(), reduction="none").view_as(
        target
    )  # (B, K)
    ce = torch.where(counted, ce, 0.0)
    loss = ce.sum() / counted.sum().clamp(min=1)
    token_loss = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).scatter(1, scatter_idx, ce)  # (B, T)
    return full, loss, token_loss


def scatter_logits(
    kept_logits: torch.Tensor, scatter_idx: torch.Tensor, valid: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """(B, K, V) kept-layout logits -> (B, T, V), zero at pruned positions."""
    b, _, v = kept_logits.shape
    rows = torch.where(valid, scatter_idx, seq_len)  # (B, K): padding slots go to a spare row T
    full = kept_logits.new_zeros(b, seq_len + 1, v)  # (B, T + 1, V)
    return full.scatter(1, rows.unsqueeze(-1).expand(-1, -1, v), kept_logits)[:, :seq_len]  # (B, T, V)
