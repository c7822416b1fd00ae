"""The text-only teacher: derivation from an MLLM, any same-vocabulary causal LM, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from regate_fx.runtime.data import collate
from regate_fx.runtime.teacher import (
    TextTeacher,
    causal_lm_teacher,
    check_same_vocab,
    text_only_teacher,
    visual_token_ids_from_config,
    weights_fingerprint,
)
from tests.runtime.runtime_helpers import IMAGE_ID, PAD, llama_config, synthetic_dataset, tiny_llama, tiny_llava


class Tok:
    """A stand-in tokenizer: only get_vocab() and pad_token_id are read."""

    def __init__(self, n: int, pad: int | None = PAD, rename: int | None = None) -> None:
        self.vocab = {f"t{i}": i for i in range(n)}
        if rename is not None:
            self.vocab[f"x{rename}"] = self.vocab.pop(f"t{rename}")
        self.pad_token_id = pad

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


@pytest.fixture(scope="module")
def batch():
    return collate(synthetic_dataset(6, seed=3, n_image=3), pad_token_id=PAD)


def manual_reference(lm, batch, pad=PAD, image=IMAGE_ID):
    """r by hand: visual ids -> pad, the text LM's logits, CE of labels[p+1] at p."""
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == image, pad)
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    tgt = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.clamp(min=0).flatten(), reduction="none")
    out = torch.full(ids.shape, float("nan"))
    out[:, :-1] = torch.where(tgt != -100, ce.view_as(tgt), torch.tensor(float("nan")))
    return out


def test_text_only_teacher_is_the_mllm_language_model_with_visual_tokens_padded(llava, batch):
    teacher = text_only_teacher(llava)
    assert teacher.visual_token_ids == (IMAGE_ID,) and teacher.pad_token_id == PAD
    assert (batch["input_ids"] == IMAGE_ID).any()
    # the same language model and head, as a standalone Llama
    lm = LlamaForCausalLM(llama_config()).eval()
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    r = teacher.reference_losses(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert r.dtype == torch.float32 and r.device.type == "cpu" and not r.requires_grad
    ref = manual_reference(lm, batch)
    torch.testing.assert_close(r, ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.isnan(), ref.isnan())
    # same length: the placeholder replaces, it does not remove
    x = teacher.text_only_ids(batch["input_ids"], batch["attention_mask"].bool())
    assert x.shape == batch["input_ids"].shape and not (x == IMAGE_ID).any()
    assert torch.equal(x == PAD, (batch["input_ids"] == IMAGE_ID) | (batch["input_ids"] == PAD))


def test_decoder_mode_equals_model_mode(llava, batch):
    a = text_only_teacher(llava).reference_losses(batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = text_only_teacher(llava, mode="decoder").reference_losses(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert text_only_teacher(llava).fingerprint() != text_only_teacher(llava, mode="decoder").fingerprint()


def test_visual_mask_works_like_visual_ids(llava, batch):
    teacher = TextTeacher(llava, pad_token_id=PAD, visual_token_ids=())
    vis = batch["input_ids"] == IMAGE_ID
    a = teacher.reference_losses(batch["input_ids"], batch["attention_mask"], batch["labels"], visual_mask=vis)
    b = text_only_teacher(llava).reference_losses(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a, b, equal_nan=True)


def test_batched_losses_equal_per_sample_losses():
    lm = tiny_llama(seed=2)
    teacher = causal_lm_teacher(lm, student=lm)
    data = synthetic_dataset(5, seed=4)
    full = collate(data)
    r = teacher.reference_losses(full["input_ids"], full["attention_mask"], full["labels"])
    for b, s in enumerate(data):
        one = teacher.reference_losses(s["input_ids"][None], None, s["labels"][None])[0]
        n = one.numel()
        torch.testing.assert_close(r[b, :n], one, equal_nan=True, rtol=1e-5, atol=1e-5)
        assert r[b, n:].isnan().all()
        # NaN exactly where the next label is not supervised
        assert torch.equal(~one[:-1].isnan(), s["labels"][1:] != -100) and one[-1].isnan()


def test_no_grad_and_training_flags_restored():
    lm = tiny_llama().train()
    teacher = causal_lm_teacher(lm, student=lm)
    ids = torch.randint(3, 100, (2, 7))
    r = teacher.reference_losses(ids)
    assert not r.requires_grad and lm.training and all(m.training for m in lm.modules())
    assert r[:, :-1].isfinite().all() and r[:, -1].isnan().all()


def test_label_outside_the_vocabulary_is_refused():
    lm = tiny_llama()
    teacher = causal_lm_teacher(lm, student=lm)
    ids = torch.randint(3, 100, (1, 5))
    with pytest.raises(ValueError, match="outside the teacher's vocabulary"):
        teacher.reference_losses(ids, labels=torch.full_like(ids, 500))


def test_teacher_with_another_vocabulary_is_refused():
    student = tiny_llava()
    with pytest.raises(ValueError, match="Appendix A.2") as e:
        causal_lm_teacher(tiny_llama(vocab_size=100), student=student)
    assert "100 rows" in str(e.value) and "128" in str(e.value)
    with pytest.raises(ValueError, match="tokenizer differs"):
        causal_lm_teacher(tiny_llama(), student=student, tokenizer=Tok(128), teacher_tokenizer=Tok(128, rename=5))
    with pytest.raises(ValueError, match="cannot verify"):
        causal_lm_teacher(tiny_llama())
    with pytest.raises(ValueError, match="token ids up to 199"):
        check_same_vocab(tiny_llama(), tokenizer=Tok(200), teacher_tokenizer=Tok(200))


def test_same_tokenizer_with_padded_embeddings_is_accepted():
    # a teacher with a padded output layer: allowed only when the tokenizers prove equality
    teacher_lm = tiny_llama(vocab_size=160)
    student = tiny_llama()
    with pytest.raises(ValueError, match="pass tokenizer"):
        check_same_vocab(teacher_lm, student)
    t = causal_lm_teacher(teacher_lm, student=student, tokenizer=Tok(128), teacher_tokenizer=Tok(128))
    assert t.vocab_size == 160 and t.pad_token_id == PAD


def test_causal_lm_teacher_takes_the_students_visual_ids_and_pad():
    student = tiny_llava()
    lm = tiny_llama(seed=5)
    lm.config.pad_token_id = None
    t = causal_lm_teacher(lm, student=student)
    assert t.visual_token_ids == (IMAGE_ID,) and t.pad_token_id == PAD
    assert causal_lm_teacher(lm, student=student, tokenizer=Tok(128, pad=7)).pad_token_id == 7
    with pytest.raises(ValueError, match="pad_token_id"):
        TextTeacher(lm, pad_token_id=None, visual_token_ids=(IMAGE_ID,))


def test_visual_token_ids_from_config():
    assert visual_token_ids_from_config(tiny_llava().config) == (IMAGE_ID,)
    assert visual_token_ids_from_config(llama_config()) == ()
    assert visual_token_ids_from_config(None) == ()


def test_fingerprint_tracks_the_weights_and_settings():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    fa = causal_lm_teacher(a, student=a).fingerprint()
    assert fa == causal_lm_teacher(b, student=b).fingerprint()
    assert fa != causal_lm_teacher(tiny_llama(seed=1), student=a).fingerprint()
    assert fa != causal_lm_teacher(a, student=a, pad_token_id=3).fingerprint()
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert fa != causal_lm_teacher(b, student=b).fingerprint()
    assert weights_fingerprint({"m": a}, extra=1) != weights_fingerprint({"m": a}, extra=2)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        TextTeacher(tiny_llama(), pad_token_id=0, mode="head")
