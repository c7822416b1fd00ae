"""Gradient checkpointing inside a sparse step (exact against the oracle, fewer saved activations) and
a sparsified model called from code the user compiles."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx.passes.backend import counters
from tests.helpers import (LOSS_ATOL, assert_close, assert_grads_close, check_against_oracle, grads, make_batch,
                           random_keep)
from tests.mm_models import MM_FAMILIES, keep_visual, make_mm_batch, model_inputs
from tests.models import BY_NAME
from tests.toy import Selected, SelectedState, Tripled, selecting


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs (the activations)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


# LLaVA: decoder capture (regate_fx/capture.py) runs the vision tower eagerly, so only its 2 LM layers
# are checkpointed inside the sparse graph.
# These left-padded batches are packed under the default "auto" (the backward then recomputes the
# CPU varlen attention op, a custom op); the reentrant case pins the padded layout.
@pytest.mark.parametrize("name,reentrant,layers,layout", [
    pytest.param("llama", False, 2, "auto", marks=pytest.mark.slow),  # CI time: llava covers "auto"
    ("llava", False, 2, "auto"), ("llama", True, 2, "padded")])
def test_gradient_checkpointing_matches_the_oracle(name, reentrant, layers, layout):
    tm = BY_NAME[name]
    model = tm("sdpa").train()
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout=layout), backend="eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    before = counters["checkpoints_inlined"]
    batch = make_batch(tm, 3, 16, pad="left", seed=3)
    check_against_oracle(model, model, batch, random_keep(batch, 0.5, seed=4))
    # one per checkpointed layer inside each sparse graph: the step with labels, and the call
    # without labels that check_against_oracle makes for the logits
    assert counters["checkpoints_inlined"] - before == 2 * layers
    assert model.regate_report.refused == []
    assert {g.layout for g in model.regate_report.graphs if g.sparse} == {"packed" if layout == "auto" else layout}


def test_gradient_checkpointing_saves_fewer_activations_with_the_same_gradients():
    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False), backend="aot_eager")
    batch = make_batch(tm, 2, 64, seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    plain_bytes, out = saved_bytes(lambda: model(**batch, keep_mask=keep))
    out.loss.backward()
    g_plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    ckpt_bytes, out = saved_bytes(lambda: model(**batch, keep_mask=keep))
    out.loss.backward()
    assert_grads_close(grads(model), g_plain)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


def _step(model, batch, keep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, keep_mask=keep)
    out.loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), g


def _enable_checkpointing(model, reentrant: bool = False) -> None:
    """transformers 5.25's name for it, or the older one (deprecated there, removed in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def _same_steps_with_and_without_checkpointing(model, batch, keep) -> None:
    """The same sparse step with checkpointing on equals it with checkpointing off: loss (1e-5) and
    every gradient; and the checkpointed layers were really captured as checkpoints (then inlined)."""
    model.gradient_checkpointing_disable()
    want_loss, want = _step(model, batch, keep)
    _enable_checkpointing(model)
    before = counters["checkpoints_inlined"]
    got_loss, got = _step(model, batch, keep)
    assert counters["checkpoints_inlined"] > before, "no checkpointed layer reached the pass"
    assert_close(got_loss, want_loss, "loss", atol=LOSS_ATOL, rtol=0)
    assert_grads_close(got, want)


def test_checkpointing_of_forward_wrappers_that_set_python_state():
    """A checkpointed layer whose forward wrapper selects what runs through Python state (the `kernels`
    pattern, made to change the output): equal to the same step without checkpointing, and to the
    oracle, which runs the wrappers eagerly (and checkpointed: eager recomputation re-runs them)."""
    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    batch = make_batch(tm, 3, 16, pad="left", seed=3)
    keep = random_keep(batch, 0.5, seed=4)
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout="padded", return_logits=False), backend="eager")
    plain_loss, _ = _step(model, batch, keep)
    for layer in model.model.layers:  # each MLP selects a tripled SiLU for its act_fn (tests/toy.py)
        layer.mlp.__class__ = selecting(type(layer.mlp))
        layer.mlp.choice = Tripled()
        layer.mlp.act_fn = Selected()
    _same_steps_with_and_without_checkpointing(model, batch, keep)
    assert SelectedState.act is None  # the wrapper's change was undone after the step, as in eager
    loss, _ = _step(model, batch, keep)
    assert abs(float(loss) - float(plain_loss)) > 1e-3, "the state does not change the output: the test proves nothing"
    check_against_oracle(model, model, batch, keep)  # the oracle runs the wrappers eagerly, checkpointed too


def _carries_hub_kernel_wrappers(model) -> bool:
    return any("_kernel_funcs" in vars(m) for m in model.modules())


# Llama with the wrappers is also test_gradient_checkpointing_matches_the_oracle (against the oracle): slow here.
@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "qwen2_vl"])
def test_checkpointing_of_layers_with_hub_kernel_wrappers(name):
    """transformers >= 5.25 wraps attention modules with the `kernels` package (forward wrappers that
    set a context variable): every checkpointed decoder layer carries them."""
    import transformers
    from packaging.version import Version

    if name == "llama":
        tm = BY_NAME["llama"]
        model = tm("sdpa").train()
        batch = make_batch(tm, 3, 16, pad="left", seed=3)
        keep = random_keep(batch, 0.5, seed=4)
    else:
        fam = next(f for f in MM_FAMILIES if f.name == name)
        model = fam("sdpa").train()
        full = make_mm_batch(fam, model, [["image"], ["image"]], seed=5)
        keep = keep_visual(full, 0.5, seed=6)
        batch = model_inputs(full)
    if Version(transformers.__version__) >= Version("5.25"):
        assert _carries_hub_kernel_wrappers(model), "expected the kernels package's wrappers on this model"
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False), backend="eager")
    _same_steps_with_and_without_checkpointing(model, batch, keep)


def test_selective_checkpointing_policies_are_refused():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    policy = lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE  # noqa: E731
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": lambda: create_selective_checkpoint_contexts(policy)})
    regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 2, 10)
    with pytest.raises(regate_fx.RewriteError, match="selective activation checkpointing"):
        model(**batch, keep_mask=random_keep(batch, 0.5))


def test_a_compiled_train_step_calling_the_sparsified_model_gives_the_same_loss():
    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 2, 12, pad="right", seed=5)
    keep = random_keep(batch, 0.5, seed=6)

    def train_step(batch, keep):
        out = model(**batch, keep_mask=keep)
        return out.loss * 1.0  # user code around the call is compiled by the outer torch.compile

    want = train_step(batch, keep)
    want.backward()
    g_want = grads(model)
    model.zero_grad(set_to_none=True)
    got = torch.compile(train_step, backend="eager")(batch, keep)
    got.backward()
    assert_close(got, want, "loss")
    assert_grads_close(grads(model), g_want)
    assert sum(g.sparse for g in model.regate_report.graphs) == 1  # the inner capture ran (and was reused)

    def whole_graph(batch, keep):
        return model(**batch, keep_mask=keep).loss

    with pytest.raises(Exception, match="regate_fx: a sparse step"):
        torch.compile(whole_graph, backend="eager", fullgraph=True)(batch, keep)


def test_a_compiled_model_runs_dense_calls_compiled_and_sparse_calls_sparse():
    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    regate_fx.sparsify(model, backend="eager")
    compiled = torch.compile(model, backend="eager")  # what Trainer's torch_compile=True does
    batch = make_batch(tm, 2, 12, seed=7)
    keep = random_keep(batch, 0.5, seed=8)
    assert_close(compiled(**batch, keep_mask=keep).loss, model(**batch, keep_mask=keep).loss, "sparse loss")
    assert_close(compiled(**batch).loss, model(**batch).loss, "dense loss")


@pytest.mark.slow
@pytest.mark.inductor
def test_gradient_checkpointing_with_inductor_matches_the_oracle():
    tm = BY_NAME["llama"]
    model = tm("sdpa").train()
    regate_fx.sparsify(model, backend="inductor")
    model.gradient_checkpointing_enable()
    batch = make_batch(tm, 2, 16, pad="left", seed=3)
    check_against_oracle(model, model, batch, random_keep(batch, 0.5, seed=4))
