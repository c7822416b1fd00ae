"""What a sparse step needs from the stack around the model: wrappers (DDP, DataParallel,
torch.compile) seen through, FSDP2 / ZeRO-3 below the model refused, transformers' input
require-grads hooks lifted, the garbage collector kept off compiling calls, and what the model's
forward accepts."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
from typing import cast

import torch
import torch.nn as nn

from regate_fx.errors import RewriteError

__all__ = [
    "accepts",
    "check_no_inner_fsdp",
    "per_module_sharding",
    "gc_frozen",
    "unwrap",
    "with_keep_mask",
    "without_input_require_grads",
]


@contextlib.contextmanager
def gc_frozen():
    """Keep the garbage collector's full collections off the objects that exist before the call.

    A compiling call (capture, pass, inner compile) allocates enough to trigger many full
    collections, and each one walks the whole heap, model and libraries included (0.1-0.2 s each
    for a 24-layer model on the CPU: 0.7 s of a warm-cache first step). ``gc.freeze()`` sets the
    objects that exist now aside for the call's length; new garbage is still collected. Costs
    nothing measurable on a call that does not compile. Left alone when the caller has frozen
    objects or disabled the collector itself.
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(getattr(cls, "forward")).parameters


def accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward names the keyword argument `name` (not merely **kwargs)."""
    return _forward_accepts(cast(type, type(model)), name)  # a class is hashable; the stubs say Module's may not be


_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def without_input_require_grads(model: nn.Module | None):
    """Lift transformers' ``enable_input_require_grads()`` hooks for the sparse call.

    The hook calls ``requires_grad_()`` on the input embeddings' output so that *reentrant*
    checkpointing of frozen-embedding models (PEFT, TRL with gradient checkpointing) has an input
    that requires grad. Dynamo cannot capture it, and a sparse step does not need it: checkpointed
    layers are inlined and recomputed by AOTAutograd (``passes/checkpoint.py``), whose backward
    reaches every trainable weight regardless.
    """
    lifted = []
    for m in model.modules() if model is not None else ():
        for key, fn in list(m._forward_hooks.items()):
            # transformers' enable_input_require_grads and PEFT's fallback; possibly registered twice
            if getattr(fn, "__name__", "") in _REQUIRE_GRADS_HOOKS:
                lifted.append((m._forward_hooks, key, m._forward_hooks.pop(key)))
    try:
        yield
    finally:
        for hooks, key, fn in lifted:
            hooks[key] = fn


def per_module_sharding(model: nn.Module | None) -> str | None:
    """What shards the model's parameters in per-module hooks, or None: ``"zero3"`` (DeepSpeed ZeRO
    stage 3 partitions the weights) or ``"fsdp2:<path>"`` (``fully_shard`` on a submodule)."""
    if model is None:
        return None
    if any(hasattr(p, "ds_status") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitions weights
        return "zero3"
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    inner = [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]
    return f"fsdp2:{inner[0]}:{len(inner)}" if inner else None


def check_no_inner_fsdp(model: nn.Module | None) -> None:
    """Refuse FSDP2 below the sparsified module and ZeRO-3 for the rewrite execution: their
    per-module hooks (all-gather before, reduce-scatter after) run outside any graph, so the
    decoder could not be captured as one. ``SparsifyConfig(execution="gathered")`` runs them."""
    what = per_module_sharding(model)
    if what is None:
        return
    todo = (
        "Use regate_fx.sparsify(model, SparsifyConfig(execution='gathered')) (or execution='auto'): it proves "
        "the model exact once and runs its own modules on the kept tokens, with every hook in place"
    )
    if what == "zero3":
        raise RewriteError(
            "regate_fx: this model's parameters are partitioned by DeepSpeed ZeRO stage 3, whose per-module "
            "hooks gather each weight just before its module runs; they cannot run inside the one graph the "
            f"rewrite execution captures. {todo}; or use ZeRO stage 1 or 2 with the rewrite"
        )
    _, first, count = what.split(":")
    raise RewriteError(
        f"regate_fx: {count} submodules of the sparsified model are sharded with fully_shard (e.g. "
        f"{first!r}); FSDP2's per-module hooks cannot run inside the one graph the rewrite execution "
        f"captures. {todo}; or shard the model as a whole (fully_shard(model) only; the FSDP2 plugin "
        "of accelerate 1.16 shards the input embedding and the LM head in groups of their own with every "
        "auto_wrap_policy, NO_WRAP included)"
    )


def with_keep_mask(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` plus a keyword-only ``keep_mask=None`` (before any ``**kwargs``)."""
    params = [p for p in sig.parameters.values() if p.name != "keep_mask"]
    keep = inspect.Parameter("keep_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], keep, *params[at:]])


def unwrap(model: nn.Module) -> nn.Module:
    """The module a wrapper calls: DDP / DataParallel (``.module``), torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model
