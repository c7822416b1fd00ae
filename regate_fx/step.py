"""The step function dynamo captures: the model's forward, then logits and loss at kept positions.

Also what the loss counts (`counted_predictions`) and the per-model copy of the step
(`own_step_function`, so each sparsified model has its own dynamo cache).
"""

from __future__ import annotations

import itertools
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX
from regate_fx.passes.kernels import kept_rows, kept_rows_packed

__all__ = ["counted_predictions", "own_step_function"]


def counted_predictions(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The predictions a sparse step counts in its loss: kept positions whose next label is supervised.

    Bool ``[B, T]``. Its sum over the micro-batches of an optimizer step is the normaliser of
    gradient accumulation: ``(out.token_loss.sum() / n).backward()`` per micro-batch, with ``n`` the
    sum over all of them, equals one step on the whole batch.
    """
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the label of p + 1
    return keep & (target != IGNORE_INDEX)



def _packed_loss(kept_logits, packed, labels, inputs, return_logits):
    """Logits / loss / token loss from the packed kept rows (N, V)."""
    flat_idx = packed[0]
    seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)
    full_logits = None
    if return_logits:  # (B, T, V), zero where pruned
        full_logits = kept_logits.new_zeros(b * t, v).index_copy(0, flat_idx, kept_logits).view(b, t, v)
    loss = token_loss = None
    if labels is not None:
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[flat_idx]  # (N,) label of p+1
        counted = target != IGNORE_INDEX
        ce = F.cross_entropy(kept_logits.float(), target.clamp(min=0), reduction="none")  # (N,)
        ce = torch.where(counted, ce, 0.0)
        loss = ce.sum() / counted.sum().clamp(min=1)
        token_loss = ce.new_zeros(b * t).index_copy(0, flat_idx, ce).view(b, t)  # (B, T)
    return full_logits, loss, token_loss


def _step(model: nn.Module, inputs: dict, use_cache_kw: dict, gather_idx, scatter_idx, valid, labels,
          return_logits: bool = True, packed: tuple | None = None):
    """The function dynamo captures: the model's forward, then logits/loss at kept positions."""
    logits = model(**inputs, **use_cache_kw).logits  # (B, T, V)
    if packed is not None:
        # kept_rows_packed marks the output for the pass (as kept_rows below) and brings the
        # packed layout into the graph.
        return _packed_loss(kept_rows_packed(logits, *packed), packed, labels, inputs, return_logits)  # (N, V)
    if gather_idx is None:
        loss = token_loss = None
        if labels is not None:
            target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label of p+1
            counted = target != IGNORE_INDEX
            if inputs.get("attention_mask") is not None:  # a padding position predicts nothing
                counted = counted & (inputs["attention_mask"] != 0)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), target.clamp(min=0).flatten(),
                                 reduction="none").view_as(target)
            token_loss = torch.where(counted, ce, 0.0)  # (B, T)
            loss = token_loss.sum() / counted.sum().clamp(min=1)
        return logits, loss, token_loss
    # kept_rows marks the output for the pass: it replays the tail (final norm, LM head) on the
    # kept rows, so the full-length logits are never computed.
    kept_logits = kept_rows(logits, gather_idx)  # (B, K, V); padding slots repeat a kept row
    full_logits = None
    if return_logits:
        seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)  # not logits.size(): keeps (B, T, V) alive
        rows = torch.where(valid, scatter_idx, t)  # (B, K): padding slots go to a spare row T
        full_logits = kept_logits.new_zeros(b, t + 1, v).scatter(
            1, rows.unsqueeze(-1).expand(-1, -1, v), kept_logits)[:, :t]  # (B, T, V), zero where pruned
    loss = token_loss = None
    if labels is not None:
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).gather(1, gather_idx)  # (B, K)
        counted = valid & (target != IGNORE_INDEX)
        ce = F.cross_entropy(kept_logits.flatten(0, 1).float(), target.clamp(min=0).flatten(),
                             reduction="none").view_as(target)  # (B, K)
        ce = torch.where(counted, ce, 0.0)
        loss = ce.sum() / counted.sum().clamp(min=1)
        token_loss = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).scatter(1, scatter_idx, ce)
    return full_logits, loss, token_loss



_INSTANCES = itertools.count()


def own_step_function() -> Callable:
    """A copy of `_step` with its own code object: dynamo caches (and counts recompiles) per code
    object, so each sparsified model gets its own cache instead of sharing one across models."""
    code = _step.__code__.replace(co_name=f"regate_step_{next(_INSTANCES)}")
    return types.FunctionType(code, _step.__globals__, code.co_name, _step.__defaults__, _step.__closure__)
