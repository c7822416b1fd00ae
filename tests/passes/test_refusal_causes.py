"""Issue 18: refusals name the real cause, and constructs that are exact are accepted.

Tiny models from transformers config classes (nothing downloaded) and small hand-written ones; the
oracle is `tests/fuzz/check.py`'s (the dense model on each kept subsequence), which shares no code
with the pass. The assertions are on the structured `Reason`, not on the text.

- XGLM's eager attention forms its scores as (batch*heads, queries, keys): `ATTENTION_FORM`, not
  "softmax outside an attention score matrix" (`TOKEN_MIXING`).
- Doge's residual carry is scaled by a parameter (`h = w * h + f(h)`): found as the stream and
  exact (it was `NO_STREAM`). MiniMax scales its carry by constants: the stream is found, and what
  is refused is named (its lightning attention's block slicing, its MoE routing), not `NO_STREAM`.
- BatchNorm in eval mode (running statistics) is per token: exact. In training mode it normalises
  over the batch: `BATCH_MIXING`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers as tf
from transformers.modeling_outputs import CausalLMOutput

from regate_fx import KeepMaskError, Reason, RewriteError
from tests.fuzz.check import BatchSpec, check_refused_or_exact, make_batch, new_sparse

VOCAB = 64
BATCH = BatchSpec(2, 8, "right", (8, 6), positions=True, rho=0.6, seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reasons(model, layout: str = "padded") -> set[Reason]:
    """The refusal's reasons (every refused branch, node outside the branches, graph-level)."""
    batch, keep = make_batch(BATCH, VOCAB)
    with pytest.raises((RewriteError, KeepMaskError)) as err:
        new_sparse(model, layout)(**batch, keep_mask=keep)
    graph = err.value.report.sparse_graph
    return ({b.reason for b in graph.refused} | {o.reason for o in graph.outside}
            | ({graph.reason} if graph.reason else set()))


def _exact(model) -> str:
    batch, keep = make_batch(BATCH, VOCAB)
    return check_refused_or_exact(model, batch, keep, VOCAB)


def test_xglm_scores_laid_out_batch_times_heads_name_the_attention_form():
    torch.manual_seed(0)
    cfg = tf.XGLMConfig(vocab_size=VOCAB, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = tf.XGLMForCausalLM(cfg).float().eval()
    assert _reasons(model) == {Reason.ATTENTION_FORM}


def test_doge_residual_scaled_by_a_parameter_is_exact():
    torch.manual_seed(0)
    cfg = tf.DogeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        hidden_dropout=0.0, keep_window_size=64)
    model = tf.DogeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # residual weights away from 1, so a dropped scale shows
        for name, p in model.named_parameters():
            if name.endswith("_residual"):
                p.uniform_(0.5, 1.5)
    assert _exact(model).startswith("exact")


@pytest.mark.slow
def test_minimax_residual_scaled_by_constants_is_a_stream():
    torch.manual_seed(0)
    cfg = tf.MiniMaxConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           num_local_experts=2, num_experts_per_tok=1, block_size=4,
                           layer_types=["full_attention", "linear_attention"])
    reasons = _reasons(tf.MiniMaxForCausalLM(cfg).float().eval())
    assert reasons and Reason.NO_STREAM not in reasons


class _NormLM(nn.Module):
    """embed -> 2 x (h = h + W2 relu(W1 BN(h))) -> head; BatchNorm1d over the hidden channels."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(2))
        self.ups = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)
        for bn in self.norms:  # running statistics that are not the identity
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        h = self.embed(input_ids)  # (B, T, D)
        for bn, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(torch.relu(up(bn(h.transpose(1, 2)).transpose(1, 2))))  # BN over (B, D, T)
        return CausalLMOutput(logits=self.head(h))


def test_batch_norm_in_eval_mode_is_per_token():
    assert _exact(_NormLM().eval()).startswith("exact")


def test_batch_norm_in_training_mode_couples_samples():
    assert Reason.BATCH_MIXING in _reasons(_NormLM().train())


# Multi-head latent attention builds its key by in-place writes into two slices of a `new_empty`
# buffer (the no-rope and the rope parts). Before issue 18 that read as an "escaping value" (advice:
# output_attentions=False, already off); the functionalized analysis sees the writes: exact.
MLA = {
    "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
                    dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                         first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16)),
    "minicpm3": (tf.MiniCPM3Config, tf.MiniCPM3ForCausalLM, dict(q_lora_rank=16, kv_lora_rank=16)),
}


@pytest.mark.parametrize("family", ["deepseek_v2", pytest.param("minicpm3", marks=pytest.mark.slow)])
def test_mla_key_written_into_new_empty_slices_is_exact(family):
    config_cls, model_cls, kw = MLA[family]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                     qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, **kw)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).float().eval()
    assert _exact(model).startswith("exact")
