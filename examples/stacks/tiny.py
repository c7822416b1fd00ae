"""Stand-ins for your model, data and tokenizer, so that every example runs on a CPU in seconds.

Replace them with your own: a Hugging Face causal LM or MLLM (``from_pretrained``), a dataset of
dicts with ``input_ids`` and ``labels`` (-100 = not learned; images as the model's inputs, e.g.
``pixel_values``), and its tokenizer. Nothing here is specific to ReGATE.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 256
PAD, EOS, BOS = 0, 2, 1
IMAGE_ID = VOCAB - 1  # the <image> placeholder of the tiny LLaVA


def llama(seed: int = 0) -> tf.LlamaForCausalLM:
    """A 2-layer Llama with random weights."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS)
    return tf.LlamaForCausalLM(cfg)


def llava(seed: int = 0) -> tf.LlavaForConditionalGeneration:
    """A tiny LLaVA (CLIP tower 16x16 images, projector, 2-layer Llama) with random weights."""
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=8)
    text = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return tf.LlavaForConditionalGeneration(cfg)


IMAGE_TOKENS = 5  # 16x16 image, 8x8 patches, plus CLS ("full" strategy)


def dataset(n: int = 64, *, images: bool = False, seed: int = 0) -> list[dict]:
    """Instruction-style samples: [image tokens] prompt (labels -100) answer (learned)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(16, 40, (1,), generator=g))
        ids = torch.randint(3, IMAGE_ID, (length,), generator=g)
        prompt = length // 3
        if images:
            ids = torch.cat([torch.full((IMAGE_TOKENS,), IMAGE_ID), ids])
            prompt += IMAGE_TOKENS
        labels = ids.clone()
        labels[:prompt] = -100
        sample = {"input_ids": ids, "labels": labels}
        if images:
            sample["pixel_values"] = torch.randn(3, 16, 16, generator=g)
        out.append(sample)
    return out


def text_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Raw text rows (``{"text": "w17 w5 ..."}``) for trainers that tokenize themselves (TRL)."""
    return [{"text": " ".join(f"w{int(t)}" for t in s["input_ids"])} for s in dataset(n, seed=seed)]


def tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary ("w0" .. "w255"), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"w{PAD}", eos_token=f"w{EOS}",
                                      bos_token=f"w{BOS}", unk_token="w3")
