"""Tiny random-weight transformers models for the issue-6 regressions: post-LN decoders and hybrids.

Each builder returns an eval-mode fp32 model with a 64-token vocabulary; nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


def _eval(model):
    return model.float().eval()


def openai_gpt():
    """Post-LN GPT-1 (h = LN(h + attn(h)); h = LN(h + mlp(h)))."""
    cfg = tf.OpenAIGPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _eval(tf.OpenAIGPTLMHeadModel(cfg))


def bert_decoder():
    """Post-LN BERT used as a causal decoder (is_decoder=True)."""
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, is_decoder=True,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _eval(tf.BertLMHeadModel(cfg))


def jamba(moe: bool):
    """Mamba layer then attention layer; with `moe` the second layer's MLP is a 4-expert MoE."""
    cfg = tf.JambaConfig(**_COMMON, attn_layer_period=2, attn_layer_offset=1,
                         num_experts=4 if moe else 1, num_experts_per_tok=2, expert_layer_period=2,
                         expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                         mamba_dt_rank=4)
    return _eval(tf.JambaForCausalLM(cfg))


def falcon_h1():
    """Attention and Mamba-2 in parallel in every layer, then an MLP."""
    cfg = tf.FalconH1Config(**_COMMON, head_dim=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8,
                            mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                            mamba_chunk_size=4, max_position_embeddings=64)
    return _eval(tf.FalconH1ForCausalLM(cfg))


def bamba():
    """Mamba-2 layer then attention layer."""
    cfg = tf.BambaConfig(**_COMMON, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8,
                         mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                         mamba_chunk_size=4, max_position_embeddings=64)
    return _eval(tf.BambaForCausalLM(cfg))


def zamba2():
    """Mamba-2 layer then a hybrid layer (shared attention block + Mamba-2)."""
    cfg = tf.Zamba2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          layers_block_type=["mamba", "hybrid"], num_attention_heads=4,
                          num_key_value_heads=4, attention_head_dim=16, mamba_d_state=8, mamba_d_conv=4,
                          mamba_expand=2, mamba_ngroups=1, n_mamba_heads=8, chunk_size=4,
                          num_mem_blocks=1, max_position_embeddings=64)
    return _eval(tf.Zamba2ForCausalLM(cfg))


def granite_moe_hybrid():
    """Mamba-2 layer then attention layer, both with a 4-expert MoE and a shared MLP."""
    cfg = tf.GraniteMoeHybridConfig(**_COMMON, layer_types=["mamba", "attention"], num_local_experts=4,
                                    num_experts_per_tok=2, shared_intermediate_size=64, mamba_n_heads=8,
                                    mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                                    mamba_expand=2, mamba_chunk_size=4, max_position_embeddings=64)
    return _eval(tf.GraniteMoeHybridForCausalLM(cfg))


BUILDERS = {
    "openai_gpt": openai_gpt,
    "bert_decoder": bert_decoder,
    "jamba": lambda: jamba(moe=False),
    "jamba_moe": lambda: jamba(moe=True),
    "falcon_h1": falcon_h1,
    "bamba": bamba,
    "zamba2": zamba2,
    "granite_moe_hybrid": granite_moe_hybrid,
}


def build(name: str):
    torch.manual_seed(0)
    return BUILDERS[name]()
