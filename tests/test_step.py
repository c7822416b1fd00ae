"""The step function dynamo captures (`regate_fx/step.py`) and how the backend finds its tensors.

Placeholder roles are carried in the graph: each placeholder records where dynamo read it, and
`step_sources` names those places from `_step`'s arguments. These tests pin that contract (a renamed
argument would make every graph look dense) and the negative case: a graph whose placeholders
carry no sources, as a piece of a split graph, is left unchanged.
"""

from __future__ import annotations

import torch

from regate_fx.capture import mark_token_axes
from regate_fx.layouts import PACKED, PADDED, Layout
from regate_fx.passes.backend import PlaceholderRoles, _find_roles, make_backend, placeholder_source, resolve_backend
from regate_fx.report import RewriteReport
from regate_fx.step import own_step_function, step_sources
from tests.helpers import make_batch, random_keep
from tests.models import BY_NAME


def _capture_step(layout: Layout, seq_key: str = "input_ids", strip: bool = False):
    """Capture `_step` on a tiny Llama; (the roles found in the backend, the graph, the roles asked)."""
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 8, pad="right", seed=0)
    keep = random_keep(batch, 0.5, seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if seq_key == "inputs_embeds":
        inputs["inputs_embeds"] = model.get_input_embeddings()(inputs.pop("input_ids")).detach()
    tensors = layout.build(keep)
    by_role = step_sources(layout.roles, seq=seq_key, attention_mask="attention_mask")
    seen = []

    def record(gm, example_inputs):  # dynamo drops the sources once the backend returns: read them here
        seen.append(
            (_find_roles(gm, PlaceholderRoles(by_role)), {n.name: placeholder_source(n) for n in gm.graph.nodes})
        )
        return gm.forward

    torch.compile(own_step_function(), backend=record, fullgraph=True)(model, inputs, {}, layout, tensors, None, True)
    ((found, sources),) = seen
    return found, sources, by_role


def test_step_sources_name_the_step_arguments():
    for layout in (PADDED, PACKED):
        for seq_key in ("input_ids", "inputs_embeds"):
            found, sources, by_role = _capture_step(layout, seq_key)
            assert set(found) == set(by_role), (layout.name, seq_key, sorted(found), sorted(by_role))
            assert all(sources[found[r].name] == by_role[r] for r in found)


def test_a_graph_without_sources_is_not_rewritten():
    """A piece of a graph split before the backend (its placeholders carry no sources) runs unchanged."""
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 8, pad="right", seed=0)
    keep = random_keep(batch, 0.5, seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    tensors = PADDED.build(keep)
    mark_token_axes([inputs], 2, 8)  # as the step does: batch, tokens and kept counts symbolic
    for t, dims in zip(tensors, PADDED.dynamic_dims):
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)
    by_role = step_sources(PADDED.roles, seq="input_ids", attention_mask="attention_mask")
    report = RewriteReport()
    regate = make_backend(resolve_backend("eager"), report, PlaceholderRoles(by_role), strict=True)

    def stripped(gm, example_inputs):  # dynamo reads the sources again afterwards: put them back
        saved = {n: n.meta.pop("grapharg") for n in gm.graph.nodes if "grapharg" in n.meta}
        try:
            return regate(gm, example_inputs)
        finally:
            for n, arg in saved.items():
                n.meta["grapharg"] = arg

    torch.compile(own_step_function(), backend=stripped, fullgraph=True)(model, inputs, {}, PADDED, tensors, None, True)
    assert [g.sparse for g in report.graphs] == [False]
    # the control, the same graph with its sources, finds every role: test_step_sources_name_the_step_arguments


def test_roles_are_not_tensor_identities():
    """The same call with roles naming other arguments: no layout found (a role is a place, not a tensor)."""
    found, _, by_role = _capture_step(PADDED)
    assert set(PADDED.roles) <= set(found)
    shifted = PlaceholderRoles({role: src.replace("L['tensors']", "L['other']") for role, src in by_role.items()})
    assert not (set(_find_roles_of(PADDED, shifted)) & set(PADDED.roles))


def _find_roles_of(layout: Layout, roles: PlaceholderRoles) -> dict:
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 8, pad="right", seed=0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    tensors = layout.build(random_keep(batch, 0.5, seed=1))
    seen = []

    def record(gm, example_inputs):
        seen.append(_find_roles(gm, roles))
        return gm.forward

    torch.compile(own_step_function(), backend=record, fullgraph=True)(model, inputs, {}, layout, tensors, None, True)
    return seen[0]
