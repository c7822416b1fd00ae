"""Gradient checkpointing in every stack users run it in: a plain loop, ReGateTrainer and ReGateSFTTrainer
(whose default turns it on), on a text model and a multimodal one, with the newest transformers (whose
hub-kernel wrappers set Python state inside every checkpointed layer).

Each case runs the same sparse steps twice, with checkpointing on and off, and compares the loss and
every gradient of every step (1e-5). The oracle side of checkpointing is tests/test_compile_ckpt.py.
"""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx.passes.backend import counters
from tests.helpers import LOSS_ATOL, assert_close, assert_grads_close
from tests.mm_models import BY_NAME as MM
from tests.runtime.runtime_helpers import tiny_llama
from tests.stacks.common import (
    QWEN2_VL_PER_SAMPLE,
    GradCapture,
    args,
    dataset,
    protecting_config,
    qwen2_vl_samples,
    regate_config,
    tokenizer,
)

STEPS = 2
PER_SAMPLE = QWEN2_VL_PER_SAMPLE


def _model(kind: str) -> torch.nn.Module:
    return (tiny_llama(0) if kind == "llama" else MM["qwen2_vl"]("sdpa")).train()


def _samples(kind: str, model, n: int = 4) -> list[dict]:
    """Unpadded samples with sample ids; Qwen2-VL ones carry one image each (its patches and grid)."""
    if kind == "llama":
        return [{**s, "sample_id": i} for i, s in enumerate(dataset("llama", n))]
    return qwen2_vl_samples(model, n)


def _rg(kind: str, model, n: int) -> regate_fx.ReGate:
    if kind == "llama":
        return regate_fx.ReGate(regate_config(), num_samples=n)
    return regate_fx.ReGate(protecting_config(model), num_samples=n)


def _sparsify(model):
    return regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False), backend="eager")


def _plain_loop(kind: str, ckpt: bool, tmp_path) -> tuple[list, list]:
    model = _sparsify(_model(kind))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = _samples(kind, model)
    rg = _rg(kind, model, len(samples))
    collate = regate_fx.ReGateCollator(pad_token_id=0, per_sample=PER_SAMPLE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses, grads = [], []
    for step in range(STEPS):
        batch = collate(samples[2 * step: 2 * step + 2])
        keep = rg.keep_mask(batch, step)
        out = model(**regate_fx.model_inputs(batch), keep_mask=keep)
        out.loss.backward()
        rg.update(batch, out.token_loss.detach(), keep)
        losses.append(out.loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


class _Losses(GradCapture):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_log(self, a, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(torch.tensor(logs["loss"]))


def _trainer(kind: str, ckpt: bool, tmp_path) -> tuple[list, list]:
    model = _sparsify(_model(kind))
    samples = _samples(kind, model)
    cap = _Losses()
    t = regate_fx.ReGateTrainer(
        model=model, args=args(tmp_path, max_steps=STEPS, gradient_checkpointing=ckpt, per_device_train_batch_size=2,
                               remove_unused_columns=False),
        train_dataset=samples, regate=_rg(kind, model, len(samples)), callbacks=[cap],
        data_collator=regate_fx.ReGateCollator(pad_token_id=0, per_sample=PER_SAMPLE))
    t.train()
    return cap.losses, cap.grads


def _sft(kind: str, ckpt: bool, tmp_path) -> tuple[list, list]:
    trl = pytest.importorskip("trl")
    import datasets

    model = _sparsify(_model(kind))
    samples = _samples(kind, model)
    rows = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in samples]
    cap = _Losses()
    conf = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                         max_steps=STEPS, logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-2,
                         optim="sgd", lr_scheduler_type="constant", max_length=None, seed=0, max_grad_norm=0.0,
                         bf16=False, gradient_checkpointing=ckpt, remove_unused_columns=False)
    t = regate_fx.ReGateSFTTrainer(model=model, args=conf, train_dataset=datasets.Dataset.from_list(rows),
                                   processing_class=tokenizer(), callbacks=[cap],
                                   data_collator=regate_fx.ReGateCollator(pad_token_id=0, per_sample=PER_SAMPLE),
                                   regate=_rg(kind, model, len(rows)))
    t.train()
    return cap.losses, cap.grads


STACKS = {"loop": _plain_loop, "trainer": _trainer, "sft": _sft}
# The default run takes one case per stack that no other test covers; the plain loop on both models is
# tests/test_compile_ckpt.py::test_checkpointing_of_layers_with_hub_kernel_wrappers, Trainer on Llama is
# tests/stacks/test_trainer.py::test_gradient_checkpointing_flag_gives_the_same_gradients.
CASES = [("trainer", "qwen2_vl"), ("sft", "llama"),
         *(pytest.param(s, k, marks=pytest.mark.slow)
           for s, k in [("loop", "llama"), ("loop", "qwen2_vl"), ("trainer", "llama"), ("sft", "qwen2_vl")])]


@pytest.mark.parametrize("stack,kind", CASES)
def test_checkpointed_sparse_steps_equal_the_same_steps_without(stack, kind, tmp_path):
    plain_losses, plain_grads = STACKS[stack](kind, False, tmp_path / "plain")
    before = counters["checkpoints_inlined"]
    ckpt_losses, ckpt_grads = STACKS[stack](kind, True, tmp_path / "ckpt")
    assert counters["checkpoints_inlined"] > before, "checkpointing did not reach the sparse graph"
    assert len(plain_grads) == len(ckpt_grads) == STEPS and len(plain_losses) == len(ckpt_losses) == STEPS
    for a, b in zip(ckpt_losses, plain_losses):
        assert_close(a, b, "loss", atol=LOSS_ATOL, rtol=0)
    for a, b in zip(ckpt_grads, plain_grads):
        assert_grads_close(a, b, atol=1e-5, rtol=1e-4)
