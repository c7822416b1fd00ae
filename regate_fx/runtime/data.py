"""Samples and batches as the runtime reads them.

A *sample* is a mapping with ``input_ids`` (1-D, its real tokens), and optionally ``labels``
(same length, -100 = ignore; default: every token supervised), ``attention_mask`` (1 = real; only
those tokens are used), ``visual_mask`` (bool, visual positions beyond the configured visual ids)
and ``sample_id`` (default: its index in the dataset). Any other key (``pixel_values``,
``image_sizes``, ``image_grid_thw``, ...) is a per-sample model input that :func:`collate` passes
through. A *batch* is the Hugging Face dict ``input_ids``/``attention_mask``/``labels`` ``[B, T]``
plus ``sample_id`` ``[B]``, optionally ``visual_mask``/``protected_mask`` ``[B, T]``, and the
per-sample inputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from regate_fx.runtime.selection import IGNORE_INDEX

__all__ = ["PER_SAMPLE_MODES", "RUNTIME_KEYS", "ReGateCollator", "TOKEN_KEYS", "collate", "model_inputs", "read_sample"]

# Keys collate reads itself; every other key of a sample is passed through.
_OWN_KEYS = ("input_ids", "labels", "attention_mask", "visual_mask")
# Per-token inputs other than the ids: padded like input_ids (with 0 / False).
TOKEN_KEYS = ("protected_mask", "token_type_ids", "mm_token_type_ids")
PER_SAMPLE_MODES = ("stack", "cat", "list")
# Batch keys only the runtime reads (the model must not receive them).
RUNTIME_KEYS = ("visual_mask", "protected_mask", "keep_mask")


def model_inputs(batch: Mapping[str, Any], sample_id_key: str = "sample_id") -> dict[str, Any]:
    """The model's inputs of a batch: everything but the runtime's keys (sample ids, visual and
    protected masks, a keep mask). ``model(**model_inputs(batch), keep_mask=keep)``."""
    drop = {sample_id_key, *RUNTIME_KEYS}
    return {k: v for k, v in batch.items() if k not in drop}


def _vec(x: Any, dtype: torch.dtype, what: str, index: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"sample {index}: {what} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(dtype)


def read_sample(sample: Mapping[str, Any], index: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
            raise ValueError(f"sample {index}: {name} has length {t.shape[0]} but input_ids has {ids.shape[0]}")
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


def _per_sample(key: str, values: list, mode: str | None) -> Any:
    """Batch one per-sample input (see :func:`collate`)."""
    if mode is not None and mode not in PER_SAMPLE_MODES:
        raise ValueError(f"per_sample[{key!r}] must be one of {PER_SAMPLE_MODES}, got {mode!r}")
    if mode == "list" or any(v is None or isinstance(v, (str, bytes)) for v in values):
        return list(values)
    try:
        ts = [torch.as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError):
        return list(values)  # not numeric (PIL images, dicts, ...): a list, for the model's own processing
    if mode is None:
        same = all(t.shape == ts[0].shape for t in ts)
        if same and (ts[0].dim() == 0 or ts[0].shape[0] != 1):
            mode = "stack"
        else:  # a leading axis of 1 (what a processor returns for one sample) or ragged: concatenate
            mode = "cat"
    if mode == "stack":
        if any(t.shape != ts[0].shape for t in ts):
            raise ValueError(
                f"cannot stack {key!r}: the samples have shapes {sorted({tuple(t.shape) for t in ts})}; "
                f"pass per_sample={{{key!r}: 'cat'}} to concatenate along dim 0"
            )
        return torch.stack(ts)
    if any(t.dim() == 0 or t.shape[1:] != ts[0].shape[1:] for t in ts):
        raise ValueError(
            f"cannot concatenate {key!r} along dim 0: the samples have shapes {sorted({tuple(t.shape) for t in ts})}"
        )
    return torch.cat(ts)


def collate(
    samples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
    sample_id_key: str = "sample_id",
    indices: Sequence[int] | None = None,
    per_sample: Mapping[str, str] | None = None,
    token_keys: Sequence[str] = TOKEN_KEYS,
) -> dict[str, Any]:
    """Pad samples into a batch (``input_ids``, ``attention_mask``, ``labels``, sample ids), passing
    every other key through (``pixel_values``, ``image_sizes``, ...).

    Per-sample inputs are batched as Hugging Face processors batch them: tensors of one shape are
    stacked (``pixel_values`` (3, H, W) each -> (B, 3, H, W)); tensors whose leading axis is 1 (what
    a processor returns for one sample: (1, 3, H, W), ``image_sizes`` (1, 2)) or whose leading axes
    differ (Qwen2-VL's patches (P_b, D), ``image_grid_thw`` (n_b, 3)) are concatenated along dim 0;
    strings and other objects become a list. ``per_sample`` overrides this per key (``"stack"``,
    ``"cat"``, ``"list"``): e.g. Qwen2-VL images of equal size need ``{"pixel_values": "cat"}``.

    Args:
        samples: see the module docstring.
        pad_token_id: id written at padding (masked out by ``attention_mask``).
        padding_side: ``"right"`` or ``"left"``.
        sample_id_key: key of the sample ids in the batch.
        indices: dataset indices of ``samples`` (default 0..n-1), used as ids when a sample has
            no ``sample_id``.
        per_sample: how to batch a per-sample key (see above).
        token_keys: per-token keys padded like ``input_ids`` (with 0 / False), e.g.
            ``protected_mask`` and ``token_type_ids``.

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
    extra = sorted({k for s in samples for k in s} - {*_OWN_KEYS, sample_id_key})
    for key in extra:
        missing = [i for s, i in zip(samples, idx) if key not in s]
        if missing:
            raise ValueError(f"sample {missing[0]} has no {key!r} but other samples of the batch have one")
        if key in token_keys:
            batch[key] = _pad_tokens(key, samples, rows, idx, T, padding_side)
        else:
            batch[key] = _per_sample(key, [s[key] for s in samples], (per_sample or {}).get(key))
    return batch


def _pad_tokens(key: str, samples, rows, idx, T: int, padding_side: str) -> torch.Tensor:
    """A per-token key, cut to the real tokens and padded like ``input_ids``: ``[B, T]``."""
    vals = []
    for s, r, i in zip(samples, rows, idx):
        v = torch.as_tensor(s[key])
        v = v[0] if v.dim() == 2 and v.shape[0] == 1 else v
        am = s.get("attention_mask")
        if am is not None:
            v = v[_vec(am, torch.bool, "attention_mask", i)] if v.shape[0] == len(am) else v
        if v.dim() != 1 or v.shape[0] != r[1].numel():
            raise ValueError(
                f"sample {i}: {key} must be 1-D with one entry per token ({r[1].numel()}), got shape {tuple(v.shape)}"
            )
        vals.append(v)
    dtype = vals[0].dtype if vals else torch.long
    out = torch.zeros((len(vals), T), dtype=dtype)
    for b, v in enumerate(vals):
        n = v.numel()
        out[b, slice(0, n) if padding_side == "right" else slice(T - n, T)] = v
    return out


class ReGateCollator:
    """A ``data_collator`` for Hugging Face ``Trainer`` / TRL: :func:`collate` with fixed options.

    Training samples must carry their ``sample_id`` (the dataset index the teacher cache and the
    difficulty state are keyed by); :class:`~regate_fx.ReGateTrainer` adds one to a training set that
    has none. A batch in which no sample has one (an evaluation set) gets no ``sample_id``.

    Args:
        pad_token_id: id written at padding.
        padding_side: ``"right"`` or ``"left"``.
        sample_id_key: key of the sample ids.
        per_sample: see :func:`collate`.
        token_keys: see :func:`collate`.
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        padding_side: str = "right",
        sample_id_key: str = "sample_id",
        per_sample: Mapping[str, str] | None = None,
        token_keys: Sequence[str] = TOKEN_KEYS,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.sample_id_key = sample_id_key
        self.per_sample = dict(per_sample or {})
        self.token_keys = tuple(token_keys)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        missing = [i for i, f in enumerate(features) if self.sample_id_key not in f]
        if len(missing) == len(features):  # e.g. evaluation: no ids, and none made up
            batch = collate(
                features,
                pad_token_id=self.pad_token_id,
                padding_side=self.padding_side,
                sample_id_key=self.sample_id_key,
                per_sample=self.per_sample,
                token_keys=self.token_keys,
            )
            del batch[self.sample_id_key]
            return batch
        if missing:
            raise ValueError(
                f"sample {missing[0]} of the batch has no {self.sample_id_key!r}: ReGATE keys its state by "
                f"dataset index; add it (ds.map(lambda ex, i: {{{self.sample_id_key!r}: i}}, with_indices=True)) "
                f"or train with ReGateTrainer, which adds it"
            )
        return collate(
            features,
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
            sample_id_key=self.sample_id_key,
            per_sample=self.per_sample,
            token_keys=self.token_keys,
        )

    def __repr__(self) -> str:
        return (
            f"ReGateCollator(pad_token_id={self.pad_token_id}, padding_side={self.padding_side!r}, "
            f"sample_id_key={self.sample_id_key!r})"
        )
