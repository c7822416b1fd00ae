"""`sparsify`: the one-call entry point; `unsparsify`, `sparse_forward`, `is_sparsified`.

The pieces live by job: the options in `config.py`, the forward it installs and its output in
`forward.py`, the captured step in `step.py`, the kept layouts in `layouts/`, the stack checks in
`stacks.py`. Their public names are re-exported here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from regate_fx.compat import check_environment
from regate_fx.config import LAYOUTS, SparsifyConfig
from regate_fx.forward import ReGateOutput, SparseForward, check_keep_mask  # noqa: F401
from regate_fx.layouts.packed import PackedLayout, packed_layout
from regate_fx.layouts.padded import KeptLayout, kept_layout
from regate_fx.stacks import unwrap as _unwrap
from regate_fx.step import counted_predictions

__all__ = [
    "KeptLayout",
    "LAYOUTS",
    "PackedLayout",
    "ReGateOutput",
    "SparseForward",
    "SparsifyConfig",
    "counted_predictions",
    "is_sparsified",
    "kept_layout",
    "packed_layout",
    "sparse_forward",
    "sparsify",
    "unsparsify",
]


def sparse_forward(model: nn.Module) -> SparseForward | None:
    """The :class:`SparseForward` that :func:`sparsify` installed on ``model`` (or a wrapper of it),
    None if the model is not sparsified."""
    return _unwrap(model).__dict__.get("_regate_forward")


def is_sparsified(model: nn.Module) -> bool:
    """Whether :func:`sparsify` was applied to ``model`` (or to the module a wrapper calls)."""
    return sparse_forward(model) is not None


def sparsify(
    model: nn.Module, config: SparsifyConfig | None = None, *, backend: str | Callable = "inductor"
) -> nn.Module:
    """Make a Hugging Face causal LM (or LLaVA-style MLLM) ReGATE-sparse, in place.

    ``model.forward`` gains a ``keep_mask`` argument and nothing else changes: the model keeps its
    class, config, parameters, ``state_dict`` keys, ``save_pretrained``, ``generate`` and
    gradient-checkpointing switches, and a call without ``keep_mask`` is its own forward, run
    directly. A call with ``keep_mask`` is captured with dynamo on first use; a graph pass finds
    the residual stream and its attention / MLP / parallel branches from the graph's structure and
    rewrites them to run on the kept tokens only (gather -> compute -> scatter); the result is
    compiled with ``backend``.

    Args:
        model: the model (or a DDP / torch.compile wrapper of it; the module it wraps is changed).
            Sparsifying it again replaces the configuration.
        config: :class:`SparsifyConfig`; defaults to strict refusal of unrewritable branches.
        backend: the torch.compile backend used after the pass: ``"eager"``, ``"aot_eager"``,
            ``"inductor"`` or a callable backend.

    Returns:
        ``model`` itself. Call it with the model's keyword arguments plus ``keep_mask``; read
        ``model.regate_report`` for what was rewritten. :func:`unsparsify` undoes it.

    Raises:
        UnsupportedEnvironment: torch or transformers outside the tested range, or a torch build
            without torch.compile (:func:`regate_fx.compat.check_environment`).

    Example:
        >>> model = regate_fx.sparsify(model, backend="eager")
        >>> out = model(input_ids=ids, attention_mask=am, labels=labels, keep_mask=keep)
        >>> out.loss.backward()
        >>> print(model.regate_report)
    """
    check_environment()
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    if not (
        callable(backend) or backend in ("eager", "aot_eager", "inductor") or backend in torch._dynamo.list_backends()
    ):
        raise ValueError(f"unknown backend {backend!r}; use 'eager', 'aot_eager', 'inductor' or a callable")
    target = _unwrap(model)
    fwd = sparse_forward(target)
    if fwd is not None:  # again: a new configuration, a fresh capture; wrappers of fwd see it too
        type(fwd).__init__(fwd, fwd.original, config, backend)
    else:
        fwd = SparseForward(target.forward, config, backend)
        target.__dict__["forward"] = fwd
    # Plain attributes (not submodules): state_dict, named_modules and parameters are unchanged.
    target.__dict__["_regate_forward"] = fwd
    target.__dict__["regate_report"] = fwd.report
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify`: the model's forward is the one it had before. Returns ``model``.

    Raises:
        RuntimeError: something replaced ``model.forward`` after :func:`sparsify` (e.g. a trainer's
            patch); restore that first.
    """
    target = _unwrap(model)
    fwd = sparse_forward(target)
    if fwd is None:
        return model
    original = fwd.original
    if target.__dict__.get("forward") is not fwd:
        raise RuntimeError(
            "model.forward was replaced after regate_fx.sparsify (by "
            f"{getattr(target.forward, '__qualname__', target.forward)!r}); undo that first"
        )
    bound_class_forward = (
        getattr(original, "__func__", None) is getattr(type(target), "forward", None)
        and getattr(original, "__self__", None) is target
    )
    for key in ("_regate_forward", "regate_report", "forward"):
        target.__dict__.pop(key, None)
    if not bound_class_forward:  # the model had its own instance forward (e.g. accelerate's autocast)
        target.__dict__["forward"] = original
    return model
