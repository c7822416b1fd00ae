"""The public API: bad input, configuration, parameter sharing, the report, recompilation."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import KeepMaskError, SparsifyConfig
from regate_fx.layouts.padded import kept_layout
from tests.helpers import make_batch, random_keep
from tests.models import BY_NAME

LLAMA = BY_NAME["llama"]


@pytest.fixture(scope="module")
def llama():
    model = LLAMA("sdpa")
    return model, regate_fx.sparsify(model, backend="eager")


@pytest.mark.parametrize("bad,match", [
    (lambda k: k[:, :-1], r"shape \(2, 9\).*\(2, 10\)"),
    (lambda k: k.long(), "dtype torch.bool"),
    (lambda k: k.to("meta"), "is on meta"),
    (lambda k: k.tolist(), "torch.Tensor"),
])
def test_malformed_keep_mask_is_a_clear_value_error(llama, bad, match):
    _, smodel = llama
    batch = make_batch(LLAMA, 2, 10)
    with pytest.raises(ValueError, match=match):
        smodel(**batch, keep_mask=bad(random_keep(batch, 0.5)))


def test_kept_padding_is_refused(llama):
    _, smodel = llama
    batch = make_batch(LLAMA, 2, 10, pad="left", lengths=[6, 10])
    keep = torch.ones(2, 10, dtype=torch.bool)
    with pytest.raises(KeepMaskError, match=r"keeps padding: sample 0, position 0.*attention_mask"):
        smodel(**batch, keep_mask=keep)


def test_attention_mask_of_another_shape_is_refused(llama):
    _, smodel = llama
    batch = make_batch(LLAMA, 2, 10)
    keep = random_keep(batch, 0.5)
    batch["attention_mask"] = batch["attention_mask"][:, None, :]
    with pytest.raises(KeepMaskError, match=r"attention_mask has shape \(2, 1, 10\) but keep_mask has \(2, 10\)"):
        smodel(**batch, keep_mask=keep)


def test_sample_with_no_kept_position_is_refused(llama):
    _, smodel = llama
    batch = make_batch(LLAMA, 3, 10)
    keep = random_keep(batch, 0.5)
    keep[1] = False
    with pytest.raises(KeepMaskError, match=r"no position in sample\(s\) \[1\]"):
        smodel(**batch, keep_mask=keep)


def test_missing_inputs_and_bad_arguments():
    model = LLAMA("sdpa")
    keep = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        regate_fx.sparsify(model, backend="eager")(attention_mask=torch.ones(1, 4), keep_mask=keep)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        regate_fx.sparsify(model, backend="nope")
    with pytest.raises(ValueError, match="SparsifyConfig.strict must be a bool, got 'yes'"):
        SparsifyConfig(strict="yes")
    with pytest.raises(ValueError, match="dynamic=False is not supported.*kept count K changes"):
        SparsifyConfig(dynamic=False)
    with pytest.raises(ValueError, match="SparsifyConfig.dynamic must be None or True, got 'auto'"):
        SparsifyConfig(dynamic="auto")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        regate_fx.sparsify("model")
    with pytest.raises(TypeError, match="keyword arguments only"):
        regate_fx.sparsify(model, backend="eager")(torch.ones(1, 4, dtype=torch.long), keep_mask=keep)


def test_optimizer_over_model_parameters_trains_the_sparse_model():
    model = LLAMA("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = make_batch(LLAMA, 2, 12, seed=3)
    keep = random_keep(batch, 0.6, seed=1)
    losses = []
    for _ in range(5):
        out = smodel(**batch, keep_mask=keep)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]


def test_keeping_every_real_token_is_the_models_own_loss(llama):
    model, smodel = llama
    batch = make_batch(LLAMA, 2, 10, pad="right", lengths=[7, 10])
    dense = smodel(**batch)  # no keep_mask: the model's own forward and loss
    keep_all = smodel(**batch, keep_mask=batch["attention_mask"].bool())
    torch.testing.assert_close(dense.loss, keep_all.loss)
    real = batch["attention_mask"].bool()
    assert keep_all.logits is None  # a step with labels builds no (B, T, V) logits by default
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    keep_all_logits = smodel(**no_labels, keep_mask=batch["attention_mask"].bool()).logits
    torch.testing.assert_close(dense.logits[real], keep_all_logits[real])
    counted = real & (torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100)
    torch.testing.assert_close(keep_all.token_loss[counted].mean(), dense.loss)


def test_kept_layout_contract():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    lay = kept_layout(keep)
    assert lay.gather_idx.tolist() == [[0, 2, 3], [3, 3, 3]]
    assert lay.valid.tolist() == [[True, True, True], [True, False, False]]
    assert lay.scatter_idx[0].tolist() == [0, 2, 3]
    assert lay.scatter_idx[1, 0] == 3 and sorted(lay.scatter_idx[1].tolist()) == [0, 1, 3]  # distinct
    one = kept_layout(torch.tensor([[0, 1, 0, 0]], dtype=torch.bool))
    assert one.gather_idx.shape == (1, 2)  # K >= 2: dynamo never specialises it to 1


def test_report_renders_as_rich_table(llama):
    _, smodel = llama
    batch = make_batch(LLAMA, 2, 10)
    smodel(**batch, keep_mask=random_keep(batch, 0.5))
    text = str(smodel.regate_report)
    assert "ReGATE rewrite report (4/4 branches on kept tokens)" in text
    assert "model.layers.1.self_attn" in text and "kept-only" in text
    from rich.console import Console
    console = Console(record=True, width=160)
    console.print(smodel.regate_report)
    assert "model.layers.0.mlp" in console.export_text()


@pytest.mark.parametrize("name,layout", [("llama", "auto"), ("llava", "auto"), ("llama", "padded"), ("llava", "packed")])
def test_no_recompilation_storm_with_varying_masks(name, layout):
    """After warm-up, 50 steps with random masks at varying rho (and so a different kept length K
    every step) recompile nothing: B, T and K are symbolic from the first capture. "auto" compiles
    each layout once, at its first use (its choice follows each step's padding waste)."""
    from torch._dynamo.utils import counters

    tm = BY_NAME[name]
    model = tm("sdpa")
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout=layout), backend="eager")
    batch = make_batch(tm, 3, 24, pad="left", seed=0)
    smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=0)).loss.backward()  # warm-up
    graphs_before = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    ks = set()
    for step in range(50):
        rho = float(torch.empty(()).uniform_(0.1, 1.0, generator=gen))
        keep = random_keep(batch, rho, seed=step + 1)
        ks.add(int(keep.sum(1).max()))
        smodel(**batch, keep_mask=keep).loss.backward()
    model.zero_grad()
    assert len(ks) > 5  # the kept length really varied
    layouts = [g.layout for g in smodel.regate_report.graphs if g.sparse]
    assert len(layouts) == len(set(layouts)), layouts  # one graph per layout, never a recompile
    assert counters["stats"]["unique_graphs"] - graphs_before == len(layouts) - 1
    assert layouts == ([layout] if layout != "auto" else layouts)


def test_inputs_embeds_instead_of_input_ids():
    """The token axis can come from inputs_embeds (B, T, D) as well."""
    from tests.helpers import assert_close

    model = LLAMA("sdpa")
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")
    batch = make_batch(LLAMA, 2, 10, pad="right", seed=4)
    keep = random_keep(batch, 0.5, seed=5)
    by_ids = smodel(**batch, keep_mask=keep)
    embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    by_embeds = smodel(**batch, inputs_embeds=embeds, keep_mask=keep)
    assert_close(by_embeds.logits, by_ids.logits, "logits")
    assert_close(by_embeds.loss, by_ids.loss, "loss")
    assert smodel.regate_report.sparse_graph.refused == []


def test_a_sparse_call_leaves_the_garbage_collector_as_it_found_it(llama):
    # The call freezes the heap it finds (full collections then skip the model and libraries)
    # and unfreezes it afterwards, also when it raises; a caller's own freeze is left alone.
    import gc

    _, smodel = llama
    batch = make_batch(LLAMA, 2, 10)
    keep = random_keep(batch, 0.5)
    assert gc.get_freeze_count() == 0
    seen = []
    fwd = regate_fx.sparse_forward(smodel)
    compiled = fwd._compiled

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return compiled(*args, **kwargs)

    fwd._compiled = spy
    try:
        smodel(**batch, keep_mask=keep)
        assert seen[-1] > 0 and gc.get_freeze_count() == 0  # frozen during the call only
        fwd._compiled = lambda *a, **k: 1 / 0
        with pytest.raises(ZeroDivisionError):
            smodel(**batch, keep_mask=keep)
        assert gc.get_freeze_count() == 0
        fwd._compiled = spy
        gc.freeze()  # the caller's own freeze: still in place after the call
        smodel(**batch, keep_mask=keep)
        assert seen[-1] > 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        fwd._compiled = compiled
