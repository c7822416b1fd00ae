"""The sparsified model is the user's model: in place, the same class, keys, config, save_pretrained /
from_pretrained, generate, deepcopy, PEFT on top, dense calls untouched; and the errors that replace
silent failures (no labels, a resumed run without its ReGate state)."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import regate_fx
from regate_fx.passes.backend import counters
from tests.helpers import assert_close, check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME

LLAMA = BY_NAME["llama"]


def test_sparsify_is_in_place_and_keeps_the_model_intact():
    model = LLAMA("sdpa")
    keys = list(model.state_dict())
    cls = type(model)
    out = regate_fx.sparsify(model, backend="eager")
    assert out is model and type(model) is cls and regate_fx.is_sparsified(model)
    assert list(model.state_dict()) == keys  # no "model." prefix, no extra entries
    assert dict(model.named_modules()).keys() == dict(LLAMA("sdpa").named_modules()).keys()
    assert model.config.model_type == "llama" and model.can_generate()
    import inspect

    assert "keep_mask" in inspect.signature(model.forward).parameters
    regate_fx.unsparsify(model)
    assert "forward" not in model.__dict__ and not regate_fx.is_sparsified(model)


def test_a_call_without_keep_mask_is_the_plain_model():
    model = LLAMA("sdpa").train()
    plain = copy.deepcopy(model)
    regate_fx.sparsify(model, backend="eager")
    batch = make_batch(LLAMA, 2, 10, pad="left")
    graphs = counters["graphs"]
    out, ref = model(**batch), plain(**batch)
    assert counters["graphs"] == graphs  # nothing captured, nothing compiled
    assert type(out) is type(ref)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    for (n, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), n
    # positional inputs work as on the plain model
    assert torch.equal(model(batch["input_ids"]).logits, plain(batch["input_ids"]).logits)


def test_dense_call_overhead_is_microseconds():
    """The dense path adds one Python call: min over repeats of the per-call overhead, in seconds."""

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x

    plain, wrapped = Tiny(), regate_fx.sparsify(Tiny(), backend="eager")
    x = torch.ones(1)

    def per_call(m, n=2000):
        t0 = time.perf_counter()
        for _ in range(n):
            m(x)
        return (time.perf_counter() - t0) / n

    overhead = min(per_call(wrapped) - per_call(plain) for _ in range(5))
    assert overhead < 20e-6  # a tiny Llama forward takes milliseconds: far below 3%


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = regate_fx.sparsify(LLAMA("sdpa"), backend="eager")
    batch = make_batch(LLAMA, 2, 10)
    model(**batch, keep_mask=random_keep(batch, 0.5))  # captured once
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path)
    assert not regate_fx.is_sparsified(again)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    import json

    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_generate_is_the_plain_models():
    model = LLAMA("sdpa")
    plain = copy.deepcopy(model)
    regate_fx.sparsify(model, backend="eager")
    ids = make_batch(LLAMA, 1, 6)["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), plain.generate(ids, **kw))


def test_deepcopy_is_a_sparsified_model_of_its_own():
    model = regate_fx.sparsify(LLAMA("sdpa").train(), backend="eager")
    batch = make_batch(LLAMA, 2, 12, pad="right")
    keep = random_keep(batch, 0.5)
    want = model(**batch, keep_mask=keep).loss
    twin = copy.deepcopy(model)
    assert regate_fx.sparse_forward(twin) is not regate_fx.sparse_forward(model)
    assert regate_fx.sparse_forward(twin).original.__self__ is twin
    assert_close(twin(**batch, keep_mask=keep).loss, want, "loss of the copy")
    twin.zero_grad()
    twin(**batch, keep_mask=keep).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the copy trains its own weights
    assert len(twin.regate_report.graphs) == len(model.regate_report.graphs) + 1


def test_peft_on_top_of_a_sparsified_model():
    peft = pytest.importorskip("peft")
    model = regate_fx.sparsify(LLAMA("sdpa"), backend="eager")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = make_batch(LLAMA, 2, 12, pad="left", seed=1)
    check_against_oracle(pm, pm, batch, random_keep(batch, 0.5, seed=2))
    assert all("lora_" in n for n, p in pm.named_parameters() if p.grad is not None)


def test_wrappers_are_sparsified_through():
    model = LLAMA("sdpa")
    compiled = torch.compile(model, backend="eager")
    assert regate_fx.sparsify(compiled, backend="eager") is compiled and regate_fx.is_sparsified(model)
    batch = make_batch(LLAMA, 2, 10)
    keep = random_keep(batch, 0.5)
    assert isinstance(compiled(**batch, keep_mask=keep), regate_fx.ReGateOutput)


def test_a_sparse_step_without_labels_returns_no_loss_and_update_says_why():
    model = regate_fx.sparsify(LLAMA("sdpa"), backend="eager")
    batch = make_batch(LLAMA, 2, 10)
    keep = random_keep(batch, 0.5)
    labels = batch.pop("labels")
    out = model(**batch, keep_mask=keep)
    assert out.loss is None and out.token_loss is None and out.logits is not None
    rg = regate_fx.ReGate(regate_fx.ReGateConfig(lam=0.0), num_samples=2)
    with pytest.raises(ValueError, match="ran without labels.*labels="):
        rg.update({**batch, "labels": labels, "sample_id": torch.arange(2)}, out.token_loss, keep)


def test_a_resumed_run_without_its_regate_state_is_refused():
    cfg = regate_fx.ReGateConfig(lam=0.0, warmup_steps=2, cycle_steps=4, dense_steps=1)
    batch = regate_fx.collate([{"input_ids": torch.arange(3, 12), "sample_id": 0}])
    with pytest.raises(regate_fx.ReGateStateError, match="load_state_dict.*start_at"):
        regate_fx.ReGate(cfg, 1).keep_mask(batch, 500)
    fresh = regate_fx.ReGate(cfg, 1)
    fresh.keep_mask(batch, 0)  # a run from the start
    fresh.keep_mask(batch, 500)
    late = regate_fx.ReGate(cfg, 1)
    late.start_at(500)  # ReGATE switched on mid-training, on purpose
    late.keep_mask(batch, 500)
    restored = regate_fx.ReGate(cfg, 1)
    restored.load_state_dict(fresh.state_dict())
    restored.keep_mask(batch, 501)
