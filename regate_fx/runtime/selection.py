"""Which positions a step keeps: candidates, protected positions, batched top-k, random baseline.

Everything here is batched tensor code on the batch's device; nothing loops over samples.

Position semantics (``docs/runtime.md``): ``keep[b, p]`` means position ``p`` is computed and the
prediction made at ``p`` (of token ``p + 1``) is counted. A position is a *candidate* when it is a
real token, the next token is a real token, its label is supervised (``labels[p + 1] != -100``),
and ``p`` is not protected.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterable

import torch

from regate_fx.constants import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "budget",
    "candidate_mask",
    "default_labels",
    "hash32",
    "keep_from_scores",
    "protected_mask",
    "random_scores",
    "real_mask",
    "sample_positions",
    "select_topk",
    "supervised_mask",
]

_M32 = 0xFFFFFFFF


def real_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B, T]``: True at real tokens (``attention_mask == 1``), all True without a mask."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; ReGATE needs a 2-D [B, T] padding mask"
        )
    return attention_mask.to(torch.bool)


def sample_positions(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each real token within its sample, and each sample's length.

    Stores are keyed by these in-sample indices, so the same sample can be padded on the left or
    the right, or to different lengths, in different batches.

    Args:
        real: bool ``[B, T]``, True at real tokens.

    Returns:
        ``(positions, lengths)``: long ``[B, T]`` (-1 at padding) and long ``[B]``.
    """
    csum = real.long().cumsum(dim=1)  # (B, T)
    positions = torch.where(real, csum - 1, torch.full_like(csum, -1))  # (B, T)
    return positions, csum[:, -1] if real.shape[1] else csum.sum(dim=1)


def default_labels(input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Labels when a batch has none: every real token is supervised (``-100`` at padding)."""
    return torch.where(real, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def supervised_mask(labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: positions ``p`` whose prediction is supervised.

    True where ``p`` and ``p + 1`` are real and ``labels[p + 1] != -100``; the last position is
    never supervised.
    """
    out = torch.zeros_like(real)  # (B, T)
    out[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & real[:, 1:] & real[:, :-1]
    return out


def protected_mask(
    input_ids: torch.Tensor,
    real: torch.Tensor,
    token_ids: Iterable[int] = (),
    masks: Iterable[torch.Tensor | None] = (),
) -> torch.Tensor:
    """Bool ``[B, T]``: real positions that are always kept.

    Args:
        input_ids: long ``[B, T]``.
        real: bool ``[B, T]``; padding is never protected.
        token_ids: protected token ids (visual placeholders, special markers).
        masks: explicit bool ``[B, T]`` masks (e.g. the batch's ``visual_mask``); None entries are
            skipped.
    """
    out = torch.zeros_like(real)  # (B, T)
    ids = sorted(set(int(t) for t in token_ids))
    if ids:
        out |= torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
    for m in masks:
        if m is None:
            continue
        if m.shape != real.shape:
            raise ValueError(
                f"a protected/visual mask has shape {tuple(m.shape)} but the batch is "
                f"{tuple(real.shape)}; pass a bool [B, T] mask aligned with input_ids"
            )
        out |= m.to(device=real.device, dtype=torch.bool)
    return out & real


def candidate_mask(supervised: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: the candidate set V, supervised positions that are not protected."""
    return supervised & ~protected


def budget(rho: float, n: torch.Tensor) -> torch.Tensor:
    """``ceil(rho * n)`` per sample, in exact integer arithmetic.

    ``rho`` is read as the nearest fraction with denominator <= 10**6, so that e.g. 0.7 * 10 is 7
    (floating point would give 7.000000000000001 and a ceiling of 8).

    Args:
        rho: keep fraction in (0, 1].
        n: long ``[B]`` candidate counts.

    Returns:
        Long ``[B]``.
    """
    if not (0.0 < float(rho) <= 1.0):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    frac = Fraction(float(rho)).limit_denominator(1_000_000)
    p, q = frac.numerator, frac.denominator
    return (n.long() * p + (q - 1)) // q


def select_topk(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[b]`` candidates with the highest score.

    Ties go to the lower position (stable sort). NaN scores rank lowest among candidates,
    +inf highest; non-candidates are never selected.

    Args:
        scores: float ``[B, T]``.
        candidates: bool ``[B, T]``.
        k: long ``[B]``, at most the number of candidates of each row.

    Returns:
        Bool ``[B, T]`` with exactly ``min(k[b], |candidates[b]|)`` True per row.
    """
    B, T = scores.shape
    s = scores.float()
    big = torch.finfo(s.dtype).max
    s = torch.nan_to_num(s, nan=-big, posinf=big, neginf=-big)  # (B, T), finite
    key = torch.where(candidates, s, torch.full_like(s, float("-inf")))  # (B, T)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # (B, T)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(T, device=s.device).expand(B, T))  # (B, T)
    return (ranks < k.to(s.device).view(B, 1)) & candidates


def keep_from_scores(
    scores: torch.Tensor,
    real: torch.Tensor,
    protected: torch.Tensor,
    candidates: torch.Tensor,
    rho: float,
) -> torch.Tensor:
    """The keep mask: protected + top ``ceil(rho * |V|)`` candidates; all real tokens at rho = 1.

    A sample that would keep nothing (no candidate and nothing protected, e.g. a prompt-only
    sample whose answer was truncated away) keeps its first real position instead: the sparse
    model needs at least one position per sample, and that position predicts no supervised token,
    so the loss is unchanged.

    Args:
        scores: float ``[B, T]`` (only read at candidates).
        real: bool ``[B, T]``; padding is never kept.
        protected: bool ``[B, T]``; always kept where real.
        candidates: bool ``[B, T]``, disjoint from ``protected``.
        rho: keep fraction in (0, 1].

    Returns:
        Bool ``[B, T]`` on the scores' device.
    """
    if not (0.0 < float(rho) <= 1.0):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if rho == 1.0:
        return real.clone()
    k = budget(rho, candidates.sum(dim=1))  # (B,)
    keep = (select_topk(scores, candidates, k) | protected) & real  # (B, T)
    first = real & (real.long().cumsum(dim=1) == 1)  # (B, T), the first real position
    return keep | (first & ~keep.any(dim=1, keepdim=True))


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 in, int64 in ``[0, 2**32)`` out); no overflow in int64."""
    x = x.long() & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def random_scores(seed: int, step: int, sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniform pseudo-random scores in [0, 1), a pure function of (seed, step, sample, position).

    Args:
        seed: the run's seed.
        step: global step.
        sample_ids: long ``[B]``.
        positions: long ``[B, T]`` in-sample positions.

    Returns:
        Float32 ``[B, T]`` (24-bit values, exactly representable).
    """
    dev = positions.device
    h = hash32(torch.tensor([seed & _M32], device=dev)) ^ (step & _M32)  # (1,)
    h = hash32(h.view(1, 1) ^ hash32(sample_ids.to(dev).long()).view(-1, 1))  # (B, 1)
    h = hash32(h ^ hash32(positions.long() + 0x9E3779B9))  # (B, T)
    return (h >> 8).float() / float(1 << 24)
