"""ReGateTrainer driving transformers.Trainer.train(): gradient accumulation, resume, evaluation,
logs, gradient checkpointing, torch_compile, multimodal batches and the errors that replace silence."""

from __future__ import annotations

import os

import pytest
import torch

import regate_fx
from regate_fx.integrations.trainer import REGATE_STATE_NAME
from tests.helpers import assert_grads_close
from tests.runtime.test_regate import assert_same_store
from tests.stacks.common import args as training_args
from tests.stacks.common import build, dataset, regate_config, snapshot, trainer

KINDS = ["llama", "llava"]
# CI time: LLaVA's accumulation check and Llama's resume check run under the slow mark; LLaVA's
# resume check (the MLLM, the Trainer and the ReGATE state together) and Llama's accumulation check
# stay in.
KINDS_FAST_LLAMA = ["llama", pytest.param("llava", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS_FAST_LLAMA)
def test_gradient_accumulation_equals_one_double_batch(kind, tmp_path):
    """GA=2 over batches of 2 = one batch of 4 (same samples, same keep masks): the normaliser is the
    kept supervised tokens of the whole accumulated batch. Step 0 is dense, step 1 sparse."""
    ga, cap_ga = trainer(kind, tmp_path / "ga", max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2)
    ga.train()
    big, cap_big = trainer(kind, tmp_path / "big", max_steps=2, per_device_train_batch_size=4)
    big.train()
    assert len(cap_ga.grads) == len(cap_big.grads) == 2
    for g_ga, g_big in zip(cap_ga.grads, cap_big.grads):
        assert_grads_close(g_ga, g_big, atol=1e-6, rtol=1e-4)
    assert ga.regate.token_stats()["kept_fraction"] < 1.0  # step 1 was sparse
    assert ga.regate.tokens_processed == big.regate.tokens_processed
    a, b = ga.regate.store.state_dict(), big.regate.store.state_dict()
    assert torch.equal(a["offsets"], b["offsets"]) and torch.equal(a["lengths"], b["lengths"])
    torch.testing.assert_close(a["values"], b["values"], equal_nan=True, rtol=1e-5, atol=1e-6)  # padding differs
    logged = [h["loss"] for h in ga.state.log_history if "loss" in h]
    want = [h["loss"] for h in big.state.log_history if "loss" in h]
    assert logged == pytest.approx(want, rel=1e-5)  # the logged loss is the accumulated batch's mean


@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.slow), "llava"])
def test_resume_equals_the_uninterrupted_run(kind, tmp_path):
    full, _ = trainer(kind, tmp_path / "full", max_steps=6)
    full.train()
    first, _ = trainer(kind, tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3)
    first.train()  # writes checkpoint-3 and checkpoint-6
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / REGATE_STATE_NAME).is_file()
    state = regate_fx.load_checkpoint(ckpt / REGATE_STATE_NAME)
    assert state["global_step"] == 3 and state["regate"]["store"]["num_updates"] == 3
    resumed, _ = trainer(kind, tmp_path / "run", max_steps=6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = snapshot(full.model), snapshot(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_same_store(full.regate.store.state_dict(), resumed.regate.store.state_dict())
    assert full.regate.token_stats() == resumed.regate.token_stats()


def test_resume_from_a_checkpoint_without_regate_state_is_refused(tmp_path):
    first, _ = trainer("llama", tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    os.remove(ckpt / REGATE_STATE_NAME)
    resumed, _ = trainer("llama", tmp_path / "run", max_steps=3)
    with pytest.raises(FileNotFoundError, match="require_regate_state=False"):
        resumed.train(resume_from_checkpoint=str(ckpt))


def test_logs_carry_token_statistics_and_evaluation_is_dense(tmp_path):
    data = dataset("llama")
    t, _ = trainer("llama", tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3,
                   per_device_eval_batch_size=4, eval_data=[{k: v for k, v in s.items() if k != "sample_id"}
                                                            for s in data[:4]])
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert [h["regate/rho"] for h in logs] == [1.0, 0.5, 0.5]
    assert logs[-1]["regate/kept_fraction"] == pytest.approx(t.regate.token_stats()["kept_fraction"])
    assert 0 < logs[-1]["regate/tokens_processed"] < logs[-1]["regate/tokens_dense"]
    eval_loss = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h][-1]
    batch = regate_fx.collate(data[:4], pad_token_id=0)
    t.model.eval()
    with torch.no_grad():  # the plain model's own loss: what a dense evaluation reports
        want = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss
    assert eval_loss == pytest.approx(float(want), rel=1e-5)


def test_gradient_checkpointing_flag_gives_the_same_gradients(tmp_path):
    from regate_fx.passes.backend import counters

    plain, cap_plain = trainer("llama", tmp_path / "a", max_steps=2)
    plain.train()
    before = counters["checkpoints_inlined"]
    ckpt, cap_ckpt = trainer("llama", tmp_path / "b", max_steps=2, gradient_checkpointing=True)
    ckpt.train()
    assert counters["checkpoints_inlined"] > before  # the layers were checkpointed inside the sparse graph
    for a, b in zip(cap_plain.grads, cap_ckpt.grads):
        assert_grads_close(a, b, atol=1e-6, rtol=1e-4)


def test_torch_compile_flag_gives_the_same_losses(tmp_path):
    plain, _ = trainer("llama", tmp_path / "a", max_steps=2)
    plain.train()
    compiled, _ = trainer("llama", tmp_path / "b", max_steps=2, torch_compile=True, torch_compile_backend="eager")
    compiled.train()
    want = [h["loss"] for h in plain.state.log_history if "loss" in h]
    got = [h["loss"] for h in compiled.state.log_history if "loss" in h]
    assert got == pytest.approx(want, rel=1e-5)


def test_any_data_collator_carries_the_sample_ids(tmp_path):
    def my_collator(features):  # knows nothing about sample_id (and would choke on it)
        assert all("sample_id" not in f for f in features)
        return regate_fx.collate(features, pad_token_id=0) | {"note": None}

    model = build("llama")
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(progress=False), backend="eager")
    data = dataset("llama")
    t = regate_fx.ReGateTrainer(model=model, args=training_args(tmp_path, max_steps=1),
                                train_dataset=[{k: v for k, v in s.items() if k != "sample_id"} for s in data],
                                regate=regate_fx.ReGate(regate_config(), len(data)), data_collator=my_collator)
    t.train()
    assert t.regate.store.num_updates == 1
    seen = [sid for sid in range(len(data)) if t.regate.store.length(sid) is not None]
    assert len(seen) == 2  # the batch's samples, by their dataset index


def test_errors_instead_of_silence(tmp_path):
    data = dataset("llama")
    plain = build("llama")
    with pytest.raises(ValueError, match="needs a sparsified model"):
        regate_fx.ReGateTrainer(model=plain, args=training_args(tmp_path), train_dataset=data,
                                regate=regate_fx.ReGate(regate_config(), len(data)))
    model = regate_fx.sparsify(build("llama"), backend="eager")
    no_labels = regate_fx.ReGateTrainer(
        model=model, args=training_args(tmp_path), train_dataset=data, regate=regate_fx.ReGate(regate_config(), len(data)),
        data_collator=lambda f: {k: v for k, v in regate_fx.collate(f).items() if k != "labels"})
    with pytest.raises(ValueError, match="has no 'labels'"):
        no_labels.train()
    dropper = regate_fx.ReGateTrainer(  # a custom pipeline that loses the ids
        model=model, args=training_args(tmp_path), train_dataset=data, regate=regate_fx.ReGate(regate_config(), len(data)),
        data_collator=regate_fx.ReGateCollator())
    dropper.data_collator = lambda f: {k: v for k, v in regate_fx.collate(f).items() if k != "sample_id"}
    with pytest.raises(ValueError, match="has no 'sample_id'"):
        dropper.train()
