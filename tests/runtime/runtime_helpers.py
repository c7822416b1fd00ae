"""Shared builders for the runtime tests: tiny random-weight models and synthetic data."""

from __future__ import annotations

import socket

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 128
PAD = 0
IMAGE_ID = 127


def llama_config(vocab_size: int = VOCAB, **kw) -> LlamaConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size)).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=llama_config(), image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def synthetic_dataset(
    n: int = 24, seed: int = 0, min_len: int = 6, max_len: int = 20, n_image: int = 0
) -> list[dict]:
    """Samples: optional image tokens, a prompt (labels -100), an answer (supervised)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, IMAGE_ID - 1, (L,), generator=g)
        ids[1 : 1 + min(n_image, L - 3)] = IMAGE_ID
        labels = ids.clone()
        prompt = max(1, min(L - 2, L // 3 + n_image))
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels, "sample_id": i})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
