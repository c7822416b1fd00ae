"""Samples and batches as the runtime reads them.

A *sample* is a mapping with ``input_ids`` (1-D, its real tokens), and optionally ``labels``
(same length, -100 = ignore; default: every token supervised), ``attention_mask`` (1 = real; only
those tokens are used), ``visual_mask`` (bool, visual positions beyond the configured visual ids)
and ``sample_id`` (default: its index in the dataset). A *batch* is the Hugging Face dict
``input_ids``/``attention_mask``/``labels`` ``[B, T]`` plus ``sample_id`` ``[B]`` and optionally
``visual_mask``/``protected_mask`` ``[B, T]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from regate_fx.runtime.selection import IGNORE_INDEX

__all__ = ["collate", "read_sample"]


def _vec(x: Any, dtype: torch.dtype, what: str, index: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"sample {index}: {what} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(dtype)


def read_sample(
    sample: Mapping[str, Any], index: int
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Normalise one sample to ``(sample_id, input_ids, labels, visual_mask)`` (1-D, CPU).

    Args:
        sample: see the module docstring.
        index: the sample's index in its dataset (its id when it has no ``sample_id``).
    """
    if not isinstance(sample, Mapping) or "input_ids" not in sample:
        raise ValueError(f"sample {index}: expected a mapping with 'input_ids', got {type(sample).__name__}")
    ids = _vec(sample["input_ids"], torch.long, "input_ids", index)
    labels = sample.get("labels")
    labels = ids.clone() if labels is None else _vec(labels, torch.long, "labels", index)
    vis = sample.get("visual_mask")
    vis = None if vis is None else _vec(vis, torch.bool, "visual_mask", index)
    for name, t in (("labels", labels), ("visual_mask", vis)):
        if t is not None and t.shape != ids.shape:
            raise ValueError(
                f"sample {index}: {name} has length {t.shape[0]} but input_ids has {ids.shape[0]}"
            )
    am = sample.get("attention_mask")
    if am is not None:
        real = _vec(am, torch.bool, "attention_mask", index)
        if real.shape != ids.shape:
            raise ValueError(f"sample {index}: attention_mask length differs from input_ids")
        ids, labels = ids[real], labels[real]
        vis = None if vis is None else vis[real]
    sid = sample.get("sample_id", index)
    sid = int(sid.item() if isinstance(sid, torch.Tensor) else sid)
    return sid, ids, labels, vis


def collate(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
    sample_id_key: str = "sample_id",
    indices: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad samples into a batch (``input_ids``, ``attention_mask``, ``labels``, sample ids).

    Args:
        samples: see the module docstring.
        pad_token_id: id written at padding (masked out by ``attention_mask``).
        padding_side: ``"right"`` or ``"left"``.
        sample_id_key: key of the sample ids in the batch.
        indices: dataset indices of ``samples`` (default 0..n-1), used as ids when a sample has
            no ``sample_id``.

    Returns:
        The batch; ``visual_mask`` is included when any sample has one.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    idx = list(range(len(samples))) if indices is None else list(indices)
    rows = [read_sample(s, i) for s, i in zip(samples, idx)]
    B = len(rows)
    T = max((r[1].numel() for r in rows), default=0)
    ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    vis = torch.zeros((B, T), dtype=torch.bool)
    for b, (_, x, y, v) in enumerate(rows):
        n = x.numel()
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[b, sl], labels[b, sl], am[b, sl] = x, y, 1
        if v is not None:
            vis[b, sl] = v
    batch = {
        "input_ids": ids,
        "attention_mask": am,
        "labels": labels,
        sample_id_key: torch.tensor([r[0] for r in rows], dtype=torch.long),
    }
    if any(r[3] is not None for r in rows):
        batch["visual_mask"] = vis
    return batch
