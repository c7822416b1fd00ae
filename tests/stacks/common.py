"""Shared builders for the training-stack tests: tiny models, data, trainers, gradient capture."""

from __future__ import annotations

import copy

import torch
from transformers import TrainerCallback, TrainingArguments

import regate_fx
from tests.runtime.runtime_helpers import IMAGE_ID, PAD, VOCAB, synthetic_dataset, tiny_llama, tiny_llava

IMAGE_TOKENS = 5  # tiny_llava: 16x16 image, 8x8 patches + CLS ("default" strategy drops CLS -> 4)
N = 16


def llava_image_tokens(model) -> int:
    cfg = model.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    return n if model.config.vision_feature_select_strategy == "default" else n + 1


def dataset(kind: str, n: int = N, seed: int = 0) -> list[dict]:
    """Samples with input_ids, labels (prompt -100) and sample_id; LLaVA samples also carry an image."""
    if kind == "llama":
        return synthetic_dataset(n, seed=seed, min_len=6, max_len=14)
    data = synthetic_dataset(n, seed=seed, min_len=10, max_len=16, n_image=4)
    g = torch.Generator().manual_seed(seed)
    for s in data:
        s["pixel_values"] = torch.randn(3, 16, 16, generator=g)
    return data


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed) if kind == "llama" else tiny_llava(seed)
    return model.train()


def qwen2_vl_samples(model, n: int = 4) -> list[dict]:
    """Unpadded Qwen2-VL samples with sample ids, one image each: its patches (16, 24), its grid (1, 3),
    the token types and the visual mask (the collator needs :data:`QWEN2_VL_PER_SAMPLE`)."""
    from tests.mm_models import BY_NAME as MM
    from tests.mm_models import make_mm_batch

    out = []
    for i in range(n):
        b = make_mm_batch(MM["qwen2_vl"], model, [["image"]], text=3 + i % 2, seed=10 + i)
        out.append({"input_ids": b["input_ids"][0], "labels": b["labels"][0], "visual_mask": b["visual_mask"][0],
                    "mm_token_type_ids": b["mm_token_type_ids"][0], "pixel_values": b["pixel_values"],
                    "image_grid_thw": b["image_grid_thw"], "sample_id": i})
    return out


# Qwen2-VL: the patch rows of all images of a batch, one grid row each (equal-sized images would stack)
QWEN2_VL_PER_SAMPLE = {"pixel_values": "cat", "image_grid_thw": "cat"}


def protecting_config(model, **kw) -> regate_fx.ReGateConfig:
    """:func:`regate_config`'s schedule with the model's visual tokens and their markers protected."""
    base = dict(warmup_steps=0, cycle_steps=3, dense_steps=1, rho_min=0.5, lam=0.0)
    base.update(kw)
    return regate_fx.ReGateConfig.for_model(model, **base)


def regate_config(**kw) -> regate_fx.ReGateConfig:
    """Sparse from step 0 (no warm-up, no dense steps) unless overridden; student-only (no cache)."""
    base = dict(warmup_steps=0, cycle_steps=3, dense_steps=1, rho_min=0.5, lam=0.0, visual_token_ids=(IMAGE_ID,))
    base.update(kw)
    return regate_fx.ReGateConfig(**base)


def args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                learning_rate=1e-2, lr_scheduler_type="constant", optim="sgd", max_steps=3, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, weight_decay=0.0,
                max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


class GradCapture(TrainerCallback):
    """Records every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.model = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def trainer(kind: str, out, *, model=None, data=None, rg=None, backend: str = "eager", eval_data=None, collator=None,
            **kw):
    model = build(kind) if model is None else model
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False), backend=backend)
    data = dataset(kind) if data is None else data
    rg = regate_fx.ReGate(regate_config(), num_samples=len(data)) if rg is None else rg
    cap = GradCapture()
    t = regate_fx.ReGateTrainer(model=model, args=args(out, **kw), train_dataset=data, eval_dataset=eval_data,
                                regate=rg, callbacks=[cap], data_collator=collator)
    return t, cap


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


__all__ = ["GradCapture", "IMAGE_ID", "N", "PAD", "QWEN2_VL_PER_SAMPLE", "VOCAB", "args", "build", "copy", "dataset",
           "protecting_config", "qwen2_vl_samples", "regate_config", "snapshot", "trainer"]


def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary ("t0" .. "t127"), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{PAD}", unk_token="t1", eos_token="t2",
                                   bos_token="t3")


def text_dataset(n: int = N, seed: int = 0):
    """A raw-text datasets.Dataset that TRL tokenizes itself ("t5 t17 ...")."""
    import datasets

    rows = [{"text": " ".join(f"t{int(i)}" for i in s["input_ids"])} for s in dataset("llama", n, seed)]
    return datasets.Dataset.from_list(rows)
