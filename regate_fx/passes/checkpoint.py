"""Activation checkpointing inside a captured model: inline the higher-order op, keep its meaning.

With checkpointing on (``model.gradient_checkpointing_enable()``, Trainer's
``gradient_checkpointing=True``, or any ``torch.utils.checkpoint.checkpoint`` call), dynamo
captures each checkpointed call as ``torch.ops.higher_order.tag_activation_checkpoint(body,
*args)``: the layer's ops live in a subgraph ``body``, out of the pass's sight.

:func:`inline_activation_checkpoints` copies every body into the main graph and tags the copies
the way AOTAutograd itself tags them when it traces the op: ``meta["recompute"] =
PREFER_RECOMPUTE`` and one increasing ``meta["ac_graph_id"]`` per call. The graph is then flat
(the pass sees every layer), node copies made by the rewrite keep the tags (``Graph.node_copy``
copies ``meta``), AOTAutograd carries them to the joint graph (``recompute`` and ``ac_graph_id``
are among the meta fields it preserves), and its partitioners (the default one of ``aot_eager``,
the min-cut one of ``inductor``) recompute the tagged ops in the backward instead of saving them:
the same memory behaviour as the checkpointed model, on kept tokens. A backend without a backward
partitioner (plain eager) cannot act on tags; :func:`~regate_fx.passes.backend.make_backend`
compiles tagged graphs with ``aot_eager`` instead.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Iterator, cast

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ["CheckpointError", "carry_recompute_tags", "has_recompute_tags", "inline_activation_checkpoints"]

_TAGS = ("recompute", "ac_graph_id")

_IDS = itertools.count()  # ac_graph_id: increasing in capture order, unique per process


class CheckpointError(RuntimeError):
    """A checkpointed call the pass cannot flatten (selective checkpointing with a policy)."""


def _hop() -> object | None:
    return getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def inline_activation_checkpoints(gm: fx.GraphModule) -> int:
    """Replace every ``tag_activation_checkpoint`` call of ``gm`` by its body, tagged for recompute.

    Nested checkpoints are flattened too (an inner body's ops get the outer call's id).

    Returns:
        The number of checkpointed calls inlined (0: ``gm`` is unchanged).

    Raises:
        CheckpointError: a call carries a selective-checkpointing ``context_fn`` (its save/recompute
            policy runs per op at trace time and cannot be kept by a flat tag).
    """
    hop = _hop()
    if hop is None:
        return 0
    inlined = 0
    while True:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]
        if not calls:
            break
        for node in calls:
            _inline_one(gm, node, next(_IDS))
            inlined += 1
    if inlined:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return inlined


def _inline_one(gm: fx.GraphModule, node: fx.Node, graph_id: int) -> None:
    body_attr = cast(fx.Node, node.args[0])  # the get_attr of the checkpointed body
    body_name = cast(str, body_attr.target)
    body_module = getattr(gm, body_name)
    if node.kwargs.get("context_fn") is not None or body_module.meta.get("_checkpoint_context_fn") is not None:
        raise CheckpointError(
            "regate_fx: a checkpointed call uses selective activation checkpointing (context_fn); its "
            "per-op policy cannot be kept inside a sparsified model. Use plain checkpointing "
            "(model.gradient_checkpointing_enable(), or checkpoint(...) without context_fn)"
        )
    args = node.args[1:]
    body: fx.GraphModule = getattr(gm, body_name)
    env: dict[fx.Node, fx.node.Argument] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise CheckpointError(
            f"regate_fx: checkpointed call {node.name} passes {len(args)} inputs to a body with {len(placeholders)}"
        )
    env.update(zip(placeholders, args))
    outputs: fx.node.Argument = None
    with gm.graph.inserting_before(node):
        for bn in body.graph.nodes:
            if bn.op == "placeholder":
                continue
            if bn.op == "output":
                outputs = fx.node.map_arg(bn.args[0], lambda n: env[n])
                break
            if bn.op == "get_attr":  # a constant or a nested body: move it into gm under a fresh name
                name = _fresh_attr(gm, f"{body_name}_{bn.target}")
                setattr(gm, name, getattr(body, bn.target))
                new = gm.graph.get_attr(name)
                new.meta = dict(bn.meta)
            else:
                new = gm.graph.node_copy(bn, lambda n: env[n])
            new.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            new.meta["ac_graph_id"] = graph_id
            env[bn] = new
    for user in list(node.users):
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(outputs, (tuple, list))):
            raise CheckpointError(
                f"regate_fx: the result of checkpointed call {node.name} is used as a "
                f"whole by {user.name}; expected one getitem per output"
            )
        assert isinstance(outputs, (tuple, list))  # checked just above
        user.replace_all_uses_with(cast(fx.Node, outputs[cast(int, user.args[1])]))
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_attr.users:
        gm.graph.erase_node(body_attr)


def _fresh_attr(gm: fx.GraphModule, base: str) -> str:
    for i in itertools.count():
        name = f"{base}_{i}"
        if not hasattr(gm, name):
            return name
    raise AssertionError("unreachable")


def has_recompute_tags(gm: fx.GraphModule) -> bool:
    """Whether any node of ``gm`` is tagged to be recomputed in the backward."""
    return any(
        n.meta.get("recompute") in (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)
        for n in gm.graph.nodes
    )


@contextlib.contextmanager
def carry_recompute_tags(graph: fx.Graph) -> Iterator[None]:
    """Inside the block, every ``graph.node_copy`` is recorded; on exit each copy gets its original's
    recompute tags back.

    The rewrite replays a region's nodes with ``graph.node_copy`` and starts each copy with empty
    ``meta``; a replayed checkpointed op must keep ``recompute`` / ``ac_graph_id`` to be recomputed
    in the backward. (The copy of the graph's method is an instance attribute, removed on exit.)
    """
    pairs: list[tuple[fx.Node, fx.Node]] = []
    original_copy = graph.node_copy

    def node_copy(node, arg_transform=lambda x: x):
        new = original_copy(node, arg_transform)
        pairs.append((node, new))
        return new

    setattr(graph, "node_copy", node_copy)  # an instance attribute shadowing the method, deleted below
    try:
        yield
    finally:
        del graph.node_copy
    for old, new in pairs:
        for key in _TAGS:
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]
