"""The step function dynamo captures: the model's forward, then logits and loss at kept positions.

Also what the loss counts (`counted_predictions`), the per-model copy of the step
(`own_step_function`, so each sparsified model has its own dynamo cache), and where in the captured
graph the step's tensors arrive (`step_sources`: the placeholder roles the backend reads).
"""

from __future__ import annotations

import itertools
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from regate_fx.constants import IGNORE_INDEX
from regate_fx.layouts.base import Layout

__all__ = ["counted_predictions", "no_token_loss", "own_step_function", "step_sources"]


def counted_predictions(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The predictions a sparse step counts in its loss: kept positions whose next label is supervised.

    Bool ``[B, T]``. Its sum over the micro-batches of an optimizer step is the normaliser of
    gradient accumulation: ``(out.token_loss.sum() / n).backward()`` per micro-batch, with ``n`` the
    sum over all of them, equals one step on the whole batch.
    """
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the label of p + 1
    return keep & (target != IGNORE_INDEX)


def no_token_loss(logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The model's ``loss_function`` during a sparse step that asks for its router auxiliary loss:
    zero, so that the model's own ``loss = loss_function(...) + coef * aux_loss`` leaves its aux term
    alone (whatever it names the coefficient), and the full-length cross-entropy is never computed
    (the step computes it on the kept positions). Reads only the logits' device, not their values."""
    return torch.zeros((), dtype=torch.float32, device=logits.device)


def _step(
    model: nn.Module,
    inputs: dict,
    use_cache_kw: dict,
    layout: Layout,
    tensors: tuple,
    labels,
    return_logits: bool = True,
    aux: bool = False,
):
    """The function dynamo captures: the model's forward, then logits / loss at kept positions, as
    the kept `layout` computes them from its `tensors` (its marker there brings them into the graph).

    With `aux` (the model computes its router auxiliary loss, a batch-level reduction of the router
    logits that the pass runs on the kept tokens: passes/reductions.py) and labels, the model gets the
    labels and `no_token_loss` as its loss function (set by `SparseForward`): its ``loss`` is then its
    own aux term, which the caller adds to the kept positions' cross-entropy.
    """
    aux_term = aux and labels is not None
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        # The padding mask is (B, T) like the ids (check_keep_mask): one batch and one token symbol
        # for both. Dynamo may otherwise give the mask its own (nothing in a model need tie them),
        # and a value computed from it (`mask.shape[1] - mask.sum(-1)`, a length) would not be on
        # the token axis, so the pass would not judge it. The aux loss flattens the mask with the
        # router logits ((B*T,) against (B*T, E)).
        seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        torch._check(mask.size(0) == seq.size(0))
        torch._check(mask.size(1) == seq.size(1))
    out = model(**inputs, **use_cache_kw, **({"labels": labels} if aux_term else {}))
    logits, loss, token_loss = layout.outputs(out.logits, tensors, labels, inputs, return_logits)
    # the model's `coef * aux_loss` (its loss on top of our zero), added to `loss` by the caller:
    # kept apart from the step's own kept-layout code, so the pass judges it as the model's
    return logits, loss, token_loss, getattr(out, "aux_loss", None), out.loss if aux_term else None


def step_sources(layout_roles: tuple[str, ...], **input_keys: str | None) -> dict[str, str]:
    """Role -> the source dynamo records for the step argument that plays it.

    The captured graph's placeholders carry where dynamo read them (``node.meta["grapharg"].source``),
    and `_step` reads the model's inputs from ``inputs`` and the kept layout from ``tensors``, so a
    role is named by a path, not by the identity of a tensor: ``input_keys`` maps roles to keys of
    ``inputs`` (``seq="input_ids"``; None: the role is absent), the layout's roles are its tensors in
    order. Must match `_step`'s parameter names (a test captures the step and checks them).
    """
    sources = {role: f"L['inputs'][{key!r}]" for role, key in input_keys.items() if key is not None}
    sources.update({role: f"L['tensors'][{i}]" for i, role in enumerate(layout_roles)})
    return sources


_INSTANCES = itertools.count()


def own_step_function() -> Callable:
    """A copy of `_step` with its own code object: dynamo caches (and counts recompiles) per code
    object, so each sparsified model gets its own cache instead of sharing one across models."""
    code = _step.__code__.replace(co_name=f"regate_step_{next(_INSTANCES)}")
    return types.FunctionType(code, _step.__globals__, code.co_name, _step.__defaults__, _step.__closure__)
