"""ReGateSFTTrainer driving trl.SFTTrainer.train(): text that TRL tokenizes (Llama, the teacher cache
computed on TRL's dataset by a factory) and a pre-tokenized multimodal set (LLaVA)."""

from __future__ import annotations

import datasets
import pytest
import torch

import regate_fx
from tests.helpers import assert_grads_close
from tests.runtime.test_regate import assert_same_store
from tests.stacks.common import GradCapture, build, dataset, regate_config, snapshot, text_dataset, tokenizer

trl = pytest.importorskip("trl")


def sft(kind: str, out, *, cache_dir=None, **kw):
    model = regate_fx.sparsify(build(kind), regate_fx.SparsifyConfig(return_logits=False, progress=False),
                               backend="eager")
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=2,
                logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, optim="sgd",
                lr_scheduler_type="constant", max_length=None, seed=0, max_grad_norm=0.0,
                bf16=False)  # TRL defaults to bf16 autocast; exact comparisons need fp32
    base.update(kw)
    cap = GradCapture()
    if kind == "llama":  # raw text: TRL tokenizes; the factory computes the cache on what it built
        def make(ds):
            teacher = regate_fx.text_only_teacher(model)
            cache = regate_fx.TeacherCache.compute(cache_dir, teacher, ds, progress=False)
            return regate_fx.ReGate(regate_config(lam=0.5), num_samples=len(ds), teacher_cache=cache)

        t = regate_fx.ReGateSFTTrainer(model=model, args=trl.SFTConfig(**base), train_dataset=text_dataset(),
                                       processing_class=tokenizer(), regate=make, callbacks=[cap])
    else:  # pre-tokenized samples with an image each, batched by ReGateCollator
        rows = [{**s, "input_ids": s["input_ids"].tolist(), "labels": s["labels"].tolist(),
                 "pixel_values": s["pixel_values"].tolist()} for s in dataset("llava")]
        t = regate_fx.ReGateSFTTrainer(model=model, args=trl.SFTConfig(**base),
                                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer(),
                                       data_collator=regate_fx.ReGateCollator(pad_token_id=0),
                                       regate=regate_fx.ReGate(regate_config(), num_samples=len(rows)), callbacks=[cap])
    return t, cap


# LLaVA under TRL runs under the slow mark (CI time); tests/stacks/test_trainer.py runs it under Trainer.
KINDS = ["llama", pytest.param("llava", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS)
def test_sft_gradient_accumulation_equals_one_double_batch(kind, tmp_path):
    ga, cap_ga = sft(kind, tmp_path / "ga", cache_dir=tmp_path / "cache", gradient_accumulation_steps=2)
    ga.train()
    big, cap_big = sft(kind, tmp_path / "big", cache_dir=tmp_path / "cache", per_device_train_batch_size=4)
    big.train()
    assert len(cap_ga.grads) == len(cap_big.grads) == 2
    for a, b in zip(cap_ga.grads, cap_big.grads):
        assert_grads_close(a, b, atol=1e-6, rtol=1e-4)
    assert ga.regate.tokens_processed == big.regate.tokens_processed < big.regate.tokens_dense


@pytest.mark.slow  # resume is the Trainer's own mechanism: tests/stacks/test_trainer.py runs it by default
@pytest.mark.parametrize("kind", KINDS)
def test_sft_resume_equals_the_uninterrupted_run(kind, tmp_path):
    full, _ = sft(kind, tmp_path / "full", cache_dir=tmp_path / "cache", max_steps=4)
    full.train()
    first, _ = sft(kind, tmp_path / "run", cache_dir=tmp_path / "cache", max_steps=4, save_strategy="steps",
                   save_steps=2)
    first.train()
    resumed, _ = sft(kind, tmp_path / "run", cache_dir=tmp_path / "cache", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    a, b = snapshot(full.model), snapshot(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_same_store(full.regate.store.state_dict(), resumed.regate.store.state_dict())


def test_packing_and_other_losses_are_refused(tmp_path):
    model = regate_fx.sparsify(build("llama"), backend="eager")
    rg = regate_fx.ReGate(regate_config(), 16)
    for bad, match in (({"packing": True, "max_length": 32}, "packing"), ({"loss_type": "dft"}, "loss_type")):
        cfg = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **bad)
        with pytest.raises(ValueError, match=match):
            regate_fx.ReGateSFTTrainer(model=model, args=cfg, train_dataset=text_dataset(),
                                       processing_class=tokenizer(), regate=rg)
