"""The table of tiny random-weight models every generic test is parametrized over (PEFT style).

Each entry builds a model from a transformers config class: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[str], torch.nn.Module]
    multimodal: bool = False

    def __call__(self, attn: str = "sdpa") -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build(attn).eval()

    def __repr__(self) -> str:
        return self.name


def _causal(config_cls, model_cls, **kw):
    def build(attn):
        cfg = config_cls(**{**COMMON, **kw})
        cfg._attn_implementation = attn
        return model_cls(cfg)
    return build


def _llava(attn):
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32)
    text = tf.LlamaConfig(**COMMON, num_key_value_heads=2, pad_token_id=0)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB - 1,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    return tf.LlavaForConditionalGeneration(cfg)


MODELS = [
    TinyModel("llama", _causal(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2)),
    TinyModel("qwen2", _causal(tf.Qwen2Config, tf.Qwen2ForCausalLM, num_key_value_heads=2)),
    TinyModel("qwen3", _causal(tf.Qwen3Config, tf.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=8)),
    TinyModel("mistral", _causal(tf.MistralConfig, tf.MistralForCausalLM, num_key_value_heads=2,
                                 sliding_window=None)),
    TinyModel("gemma", _causal(tf.GemmaConfig, tf.GemmaForCausalLM, num_key_value_heads=2, head_dim=8)),
    TinyModel("phi", _causal(tf.PhiConfig, tf.PhiForCausalLM, partial_rotary_factor=0.5,
                             resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    TinyModel("gpt_neox", _causal(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, use_parallel_residual=True,
                                  hidden_dropout=0.0, attention_dropout=0.0)),
    TinyModel("opt", _causal(tf.OPTConfig, tf.OPTForCausalLM, ffn_dim=64, word_embed_proj_dim=32,
                             dropout=0.0, attention_dropout=0.0)),
    TinyModel("falcon", _causal(tf.FalconConfig, tf.FalconForCausalLM, new_decoder_architecture=False,
                                parallel_attn=True, alibi=False, hidden_dropout=0.0, attention_dropout=0.0)),
    TinyModel("llava", _llava, multimodal=True),
]
BY_NAME = {m.name: m for m in MODELS}
