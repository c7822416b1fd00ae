"""The correctness oracle of ReGATE (method.md): the dense model on each kept subsequence alone.

Because pruned positions are invisible and unchanged in every layer, a sparsified model at its
kept positions must equal the *dense* model run on the kept subsequence alone, with the original
position ids and an all-ones attention mask. Use it to check `sparsify` on your own model:

    ref_logits, ref_loss = regate_fx.oracle(model, batch, keep)
    out = smodel(**batch, keep_mask=keep)      # out.logits[b, keep[b]] == ref_logits[b]

It is a reference, not a fast path: it runs the model once per sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["oracle"]

IGNORE_INDEX = -100
_TEXT_KEYS = {"input_ids", "attention_mask", "labels", "position_ids"}


def _decoder_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The embeddings entering the decoder (for an MLLM: text and visual features merged)."""
    seen = {}

    def hook(_module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        handle.remove()
    if seen.get("embeds") is None:
        raise ValueError("the decoder of this model was not called with inputs_embeds; the oracle "
                         "cannot isolate its input")
    return seen["embeds"]


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


def oracle(model: torch.nn.Module, batch: dict[str, Any], keep: torch.Tensor, *,
           window: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits and loss of the dense model on each sample's kept subsequence.

    Args:
        model: the unsparsified Hugging Face model (causal LM, or an MLLM whose extra inputs such
            as ``pixel_values`` are merged into the decoder's input embeddings).
        batch: ``input_ids``, ``labels`` (unshifted, -100 = ignore), optionally
            ``attention_mask``, ``position_ids`` and the model's other inputs.
        keep: bool ``[B, T]`` keep mask.
        window: for sliding-window attention, the window in tokens: each kept subsequence then
            gets explicit 4-D masks that measure it in original positions.

    Returns:
        ``(logits, loss)``: ``logits[b]`` is ``(K_b, V)`` at sample b's kept positions in order;
        ``loss`` the mean cross-entropy of the kept predictions whose next label is supervised
        (a zero that still has a graph when there is none).
    """
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label of p + 1
    multimodal = any(k not in _TEXT_KEYS for k in batch)
    embeds = _decoder_inputs(model, batch) if multimodal else None  # (B, T, D)
    pos_ids = batch.get("position_ids")
    logits_out, total, count = [], 0.0, 0
    for b in range(keep.size(0)):
        pos = keep[b].nonzero().flatten()  # (K_b,)
        mask = (torch.ones(1, len(pos), dtype=torch.long, device=pos.device) if window is None
                else _window_masks(model, pos, window))
        p = (pos_ids[b, pos] if pos_ids is not None else pos)[None]  # (1, K_b) original positions
        if embeds is not None:
            hidden = model.get_decoder()(inputs_embeds=embeds[b:b + 1, pos], attention_mask=mask,
                                         position_ids=p, use_cache=False).last_hidden_state
            logits = model.get_output_embeddings()(hidden)[0]  # (K_b, V)
        else:
            logits = model(input_ids=batch["input_ids"][b:b + 1, pos], attention_mask=mask, position_ids=p,
                           use_cache=False).logits[0]  # (K_b, V)
        logits_out.append(logits)
        total = total + 0.0 * logits.sum()  # keeps the loss a graph even when nothing is counted
        t = target[b, pos]
        m = t != IGNORE_INDEX
        if m.any():
            total = total + F.cross_entropy(logits[m].float(), t[m], reduction="sum")
            count += int(m.sum())
    return logits_out, total / max(count, 1)
