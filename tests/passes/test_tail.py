"""The tail (final norm, LM head, loss) runs on kept rows only: no (B, T, V) product is computed."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import SparsifyConfig
from tests.helpers import assert_close, check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME, VOCAB


def _recording_backend(shapes: list):
    """A backend that runs the rewritten graph node by node, recording every vocab-sized output."""

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-1] == VOCAB:
                shapes.append((n.op, str(n.target), tuple(out.shape)))
            return out

    return lambda gm, example_inputs: (lambda *args: Recorder(gm).run(*args))


@pytest.mark.parametrize("name", ["llama", "gemma", "opt", "llava"])
@pytest.mark.parametrize("return_logits", [None, True, False])
def test_lm_head_runs_on_kept_rows_only(name, return_logits):
    tm = BY_NAME[name]
    model = tm("sdpa")
    shapes: list = []
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=return_logits, layout="padded"),
                                backend=_recording_backend(shapes))
    batch = make_batch(tm, 2, 16, pad="left", seed=4)
    keep = random_keep(batch, 0.4, seed=3)
    k = int(keep.sum(1).max())
    out = smodel(**batch, keep_mask=keep)
    report = smodel.regate_report.sparse_graph
    assert report.tail_on_kept, report.tail_detail
    output = [s for s in shapes if s[2][1] in (16, 17)]  # the (B, T, V) output, when asked for
    computed = [s for s in shapes if s not in output]
    assert computed and all(s[2] == (2, k, VOCAB) for s in computed), computed
    # new_zeros (B, T + 1, V), scatter into it, slice to (B, T, V): nothing else at full length
    # return_logits=None (default) with labels: a training step, no (B, T, V) tensor at all
    assert [s[2][1] for s in output] == ([17, 17, 16] if return_logits else []), output
    assert (out.logits is None) is (not return_logits)
    assert out.loss is not None and out.token_loss is not None
    assert "final norm / LM head / loss on kept tokens only: yes" in str(smodel.regate_report)


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_packed_lm_head_runs_on_the_packed_rows_only(name):
    """Packed layout: every vocab-sized value is (1, N, V); no (B, T, V) or (B, K, V) product."""
    tm = BY_NAME[name]
    model = tm("sdpa")
    shapes: list = []
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout="packed"), backend=_recording_backend(shapes))
    batch = make_batch(tm, 3, 16, pad="right", seed=4)
    keep = random_keep(batch, 0.4, seed=3)
    out = smodel(**batch, keep_mask=keep)
    assert smodel.regate_report.sparse_graph.layout == "packed" and smodel.regate_report.sparse_graph.tail_on_kept
    assert shapes and all(s[2] == (1, int(keep.sum()), VOCAB) for s in shapes), shapes
    assert out.logits is None and out.loss is not None


def test_return_logits_false_gives_the_same_loss_and_grads():
    tm = BY_NAME["qwen2"]
    model = tm("eager")
    batch = make_batch(tm, 3, 12, pad="right", seed=6)
    keep = random_keep(batch, 0.5, seed=1)
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=False), backend="eager")
    check_against_oracle(smodel, model, batch, keep)
    out = smodel(**batch, keep_mask=keep)
    ref = regate_fx.sparsify(model, backend="eager")(**batch, keep_mask=keep)
    assert out.logits is None
    assert_close(out.loss, ref.loss, "loss")
    assert_close(out.token_loss, ref.token_loss, "token_loss")


def test_default_returns_logits_exactly_when_the_call_has_no_labels():
    """Liger's convention: logits only without labels; the loss and token_loss never depend on it."""
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    batch = make_batch(tm, 3, 12, pad="left", seed=2)
    keep = random_keep(batch, 0.5, seed=4)
    smodel = regate_fx.sparsify(model, backend="eager")
    assert smodel._regate_forward.config.return_logits is None  # the SparsifyConfig (in place)
    train = smodel(**batch, keep_mask=keep)
    assert train.logits is None and train.loss is not None
    infer = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep)
    assert infer.loss is None and infer.token_loss is None
    assert infer.logits is not None and infer.logits.shape == (3, 12, VOCAB)
    ref_logits, _ = regate_fx.oracle(model, batch, keep)
    for b, ref in enumerate(ref_logits):
        assert_close(infer.logits[b, keep[b]].detach(), ref.detach(), f"sample {b}")
        assert float(infer.logits[b, ~keep[b]].detach().abs().sum()) == 0.0
    always = regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")(**batch, keep_mask=keep)
    assert_close(always.logits, infer.logits, "logits with labels (return_logits=True)")
    assert_close(always.loss, train.loss, "loss")
    assert_close(always.token_loss, train.token_loss, "token_loss")
    with pytest.raises(ValueError, match="return_logits must be a bool or None"):
        SparsifyConfig(return_logits="yes")


def test_tail_stays_full_length_when_the_last_branch_is_dense():
    from tests.toy import ToyLM

    model = ToyLM([None, "cumsum"]).eval()
    smodel = regate_fx.sparsify(model, SparsifyConfig(strict=False), backend="eager")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning):
        smodel(input_ids=ids, keep_mask=torch.ones(2, 10, dtype=torch.bool))
    g = smodel.regate_report.sparse_graph
    assert not g.tail_on_kept and "last branch" in g.tail_detail
