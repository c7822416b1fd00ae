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
    attns: tuple[str, ...] = ("sdpa", "eager")  # attention implementations the family offers

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
    TinyModel("gpt_j", _causal(tf.GPTJConfig, tf.GPTJForCausalLM, rotary_dim=4, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)),
    TinyModel("cohere", _causal(tf.CohereConfig, tf.CohereForCausalLM, num_key_value_heads=2)),
    TinyModel("llava", _llava, multimodal=True),
    # Post-norm decoders: h = norm(h + f(h)); the stream passes through a LayerNorm between adds.
    TinyModel("openai_gpt", lambda attn: tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(
        vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)), attns=("eager",)),
    TinyModel("bert_decoder", _causal(tf.BertConfig, tf.BertLMHeadModel, is_decoder=True,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
]

# Families beyond the required list, tried as a new user would (one oracle check each).
EXTRA_MODELS = [
    TinyModel("gpt2", _causal(tf.GPT2Config, tf.GPT2LMHeadModel, n_inner=64, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0)),
    TinyModel("starcoder2", _causal(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, num_key_value_heads=2,
                                    residual_dropout=0.0, embedding_dropout=0.0, sliding_window=None)),
    TinyModel("olmo2", _causal(tf.Olmo2Config, tf.Olmo2ForCausalLM, num_key_value_heads=2)),
    TinyModel("granite", _causal(tf.GraniteConfig, tf.GraniteForCausalLM, num_key_value_heads=2)),
    TinyModel("stablelm", _causal(tf.StableLmConfig, tf.StableLmForCausalLM, num_key_value_heads=2)),
    TinyModel("phi3", _causal(tf.Phi3Config, tf.Phi3ForCausalLM, num_key_value_heads=2, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0)),
    TinyModel("gemma2", _causal(tf.Gemma2Config, tf.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=8),
              attns=("eager",)),
    TinyModel("gemma3", _causal(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, num_key_value_heads=2, head_dim=8)),
    TinyModel("falcon_gqa", _causal(tf.FalconConfig, tf.FalconForCausalLM, new_decoder_architecture=True,
                                    num_kv_heads=2, alibi=False, hidden_dropout=0.0, attention_dropout=0.0)),
]
BY_NAME = {m.name: m for m in MODELS + EXTRA_MODELS}

# A tiny Llama above DDP's first gradient bucket (1 MiB): 2.3 MiB of fp32 parameters, most of them in
# the (4096, 64) embedding and LM head. Under DDP, dynamo's DDP optimizer would split a captured graph
# of it at the bucket boundary (see regate_fx.sparse._run); the models above are all under 1 MiB.
LLAMA_ABOVE_FIRST_BUCKET = TinyModel("llama_2mib", _causal(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2,
                                                           vocab_size=4096, hidden_size=64, intermediate_size=128))
