"""The correctness oracle of ReGATE (method.md): the dense model on each kept subsequence alone.

Because pruned positions are invisible and unchanged in every layer, a sparsified model at its
kept positions must equal the *dense* model run on the kept subsequence alone, with the original
position ids and an all-ones attention mask. Use it to check `sparsify` on your own model:

    ref_logits, ref_loss = regate_fx.oracle(model, batch, keep)
    out = smodel(**batch, keep_mask=keep)      # out.logits[b, keep[b]] == ref_logits[b]

It is a reference, not a fast path: it runs the model once per sample (once per packed document).

Multimodal models: the model's forward is run once, eagerly, up to its decoder; the embeddings it
merged (whose graph reaches the vision tower and projector) and the position ids it computed
(M-RoPE's (3, B, T) ones included) are taken at the kept positions, and the model is called on them
per sample, with every other per-token input (``token_type_ids``, ``mm_token_type_ids``, ...) at the
kept positions too, so its own mask logic (bidirectional images, prefix-LM) applies to the kept
subsequence. A decoder that takes token ids (Mllama's cross-attention) gets each sample's own
pixel inputs instead. Packed rows (no ``attention_mask``, position ids restarting inside a row)
are split into documents, each run alone.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX

__all__ = ["oracle"]

_TEXT_KEYS = {"input_ids", "attention_mask", "labels", "position_ids"}


class _Stop(Exception):
    pass


def _decoder_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward passes its decoder: for an MLLM, the embeddings with the visual
    features merged in (their autograd graph reaches the vision tower) and the position ids it
    computed (M-RoPE's (3, B, T) ones included). The run stops there."""
    seen = {}
    decoder = getattr(model, "get_decoder")()  # a transformers model's

    def hook(_module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if seen.get("inputs_embeds") is None and seen.get("input_ids") is None:
        raise ValueError(
            "the decoder of this model was called with neither inputs_embeds nor input_ids; "
            "the oracle cannot isolate its input"
        )
    return seen


def _rows(pos_ids: torch.Tensor | None, b: int, idx: torch.Tensor) -> torch.Tensor:
    """Sample b's position ids at `idx`, as a batch of one: (B, T), (1, T) and (n, B, T) layouts."""
    if pos_ids is None:
        return idx[None]
    if pos_ids.dim() == 3:  # M-RoPE: (3, B, T), or (4, B, T) with the text positions first
        return pos_ids[:, b : b + 1, idx]
    return pos_ids[min(b, pos_ids.size(0) - 1)][idx][None]  # (B, T), or (1, T) shared by the batch


def _documents(batch: dict[str, Any], b: int, pos: torch.Tensor) -> list[torch.Tensor]:
    """The kept positions `pos` of sample b split by packed document.

    Rows are packed (DataCollatorWithFlattening, TRL padding_free) when there is no attention mask
    and the 2-D position ids restart inside a row; a document starts wherever the position id is
    not its predecessor's plus one (transformers' own rule).
    """
    pid = batch.get("position_ids")
    if batch.get("attention_mask") is not None or pid is None or pid.dim() != 2:
        return [pos]
    row = pid[min(b, pid.size(0) - 1)]
    starts = torch.ones_like(row, dtype=torch.bool)
    starts[1:] = row[1:] != row[:-1] + 1
    doc = starts.long().cumsum(0)[pos]  # (K_b,) document of each kept position
    return [pos[doc == d] for d in doc.unique_consecutive()]


def _chunk_positions(batch: dict[str, Any], pos_ids: Any, b: int, pos: torch.Tensor) -> torch.Tensor:
    """The positions sample b's kept slots `pos` have in the full-length model's chunked mask: their
    index less the padding before the sample's first real token (transformers' `left_padding`), or,
    for packed rows (no attention mask), their position ids."""
    am = batch.get("attention_mask")
    if am is not None and am.dim() == 2:
        return pos - int((am[b].cumsum(0) == 0).sum())
    if isinstance(pos_ids, torch.Tensor) and pos_ids.dim() == 2:
        return _rows(pos_ids, b, pos)[0]
    return pos


def _window_masks(model: torch.nn.Module, orig: torch.Tensor, window: int) -> Any:
    """4-D masks whose sliding window is measured in original positions `orig` (the kept tokens'
    indices in the padded batch), as the full-length model measures it."""
    q, k = orig[:, None], orig[None, :]
    neg = torch.tensor(float("-inf"))
    full = torch.where(k <= q, 0.0, neg)[None, None]  # (1, 1, K, K)
    sliding = torch.where((k <= q) & (q - k < window), 0.0, neg)[None, None]  # (1, 1, K, K)
    config = getattr(model, "config", None)
    types = set(getattr(config, "layer_types", None) or [])
    return {"full_attention": full, "sliding_attention": sliding} if "full_attention" in types else sliding


def _chunk_masks(model: torch.nn.Module, orig: torch.Tensor, chunk: int) -> Any:
    """4-D masks whose attention chunks are measured in original positions `orig` (the kept tokens'
    positions from their sample's first real token), as the full-length model measures them: a kept
    query sees the earlier kept keys of its own chunk (Llama 4's `attention_chunk_size`)."""
    q, k = orig[:, None], orig[None, :]
    neg = torch.tensor(float("-inf"))
    full = torch.where(k <= q, 0.0, neg)[None, None]  # (1, 1, K, K)
    chunked = torch.where((k <= q) & (k // chunk == q // chunk), 0.0, neg)[None, None]  # (1, 1, K, K)
    config = getattr(model, "config", None)
    types = set(getattr(config, "layer_types", None) or [])
    return {"full_attention": full, "chunked_attention": chunked} if "full_attention" in types else chunked


def oracle(
    model: torch.nn.Module,
    batch: dict[str, Any],
    keep: torch.Tensor,
    *,
    window: int | None = None,
    chunk: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits and loss of the dense model on each sample's kept subsequence.

    Args:
        model: the unsparsified Hugging Face model (causal LM, or an MLLM whose extra inputs such
            as ``pixel_values`` are merged into the decoder's input embeddings).
        batch: ``input_ids``, ``labels`` (unshifted, -100 = ignore), optionally
            ``attention_mask``, ``position_ids`` and the model's other inputs.
        keep: bool ``[B, T]`` keep mask.
        window: for sliding-window attention, the window in tokens: each kept subsequence then
            gets explicit 4-D masks that measure it in original positions.
        chunk: for chunked attention (Llama 4's ``attention_chunk_size``), the chunk in tokens: each
            kept subsequence then gets explicit 4-D masks whose chunks are those of the kept tokens'
            original positions (counted from the sample's first real token, as the full-length
            model counts them), not of their places in the kept subsequence.

    Returns:
        ``(logits, loss)``: ``logits[b]`` is ``(K_b, V)`` at sample b's kept positions in order;
        ``loss`` the mean cross-entropy of the kept predictions whose next label is supervised
        (a zero that still has a graph when there is none).
    """
    if window is not None and chunk is not None:
        raise ValueError("oracle: give window or chunk, not both")
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label of p + 1
    multimodal = any(k not in _TEXT_KEYS for k in batch)
    dec = _decoder_inputs(model, batch) if multimodal else {}
    embeds = dec.get("inputs_embeds")  # (B, T, D)
    pos_ids = dec.get("position_ids") if dec.get("position_ids") is not None else batch.get("position_ids")
    bsz, seq = keep.shape
    # Other per-token inputs (token_type_ids, ...): the model reads them at the kept positions.
    per_token = {
        k: v
        for k, v in batch.items()
        if k not in _TEXT_KEYS and isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == (bsz, seq)
    }
    # A decoder that takes token ids, not merged embeddings, reads the images some other way
    # (Mllama's cross-attention): the model then runs per sample on that sample's other inputs.
    per_sample = (
        {}
        if embeds is not None or not multimodal
        else {
            k: v
            for k, v in batch.items()
            if k not in _TEXT_KEYS
            and k not in per_token
            and isinstance(v, torch.Tensor)
            and v.dim() >= 1
            and v.size(0) == bsz
        }
    )
    logits_out: list[torch.Tensor] = []
    total: torch.Tensor | float = 0.0
    count = 0
    for b in range(bsz):
        pieces = []
        for pos in _documents(batch, b, keep[b].nonzero().flatten()):  # (K_d,) kept positions
            if window is not None:
                mask = _window_masks(model, pos, window)
            elif chunk is not None:
                mask = _chunk_masks(model, _chunk_positions(batch, pos_ids, b, pos), chunk)
            else:
                mask = torch.ones(1, len(pos), dtype=torch.long, device=pos.device)
            kw = {k: v[b : b + 1, pos] for k, v in per_token.items()}
            kw.update({k: v[b : b + 1] for k, v in per_sample.items()})
            if embeds is not None:
                kw["inputs_embeds"] = embeds[b : b + 1, pos]
            else:
                kw["input_ids"] = batch["input_ids"][b : b + 1, pos]
            pieces.append(
                model(**kw, attention_mask=mask, position_ids=_rows(pos_ids, b, pos), use_cache=False).logits[0]
            )  # (K_d, V)
        logits = torch.cat(pieces)  # (K_b, V)
        logits_out.append(logits)
        pos = keep[b].nonzero().flatten()
        total = total + 0.0 * logits.sum()  # keeps the loss a graph even when nothing is counted
        t = target[b, pos]
        m = t != IGNORE_INDEX
        if m.any():
            total = total + F.cross_entropy(logits[m].float(), t[m], reduction="sum")
            count += int(m.sum())
    return logits_out, cast(torch.Tensor, total) / max(count, 1)  # a tensor once a sample ran
