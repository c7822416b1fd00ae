"""Gemma 4: its decoder layer ends with an in-place `hidden_states *= self.layer_scalar`, and it
has a third residual branch (per-layer inputs), sliding and full layers, and optionally K/V shared
across layers and an MoE block. Exact-sparse from the graph's structure.

- The in-place scale is the stream itself (passes/stream.py, `written_in_place`): between two
  layers it is the next carry; after the last layer it is what the final norm reads, so the last
  region ends there and the tail starts after it. Before, the scaled value counted as a region
  intermediate escaping to the final norm (ESCAPING_VALUE at `model.norm`). The layer scalars are
  set away from their initial 1 here, so a scale applied twice (once in the last region, once in
  the tail) or not at all on kept tokens fails the oracle.
- The per-layer-input branch, `h + norm(proj(act(gate(h)) * per_layer_input))`, is a branch like
  attention and MLP: judged token-wise and run on kept tokens; the per-layer inputs (an embedding
  of the ids plus a projection of the input embeddings) are gathered at kept positions.
- K/V sharing (`num_kv_shared_layers`): the later layers attend over the K/V an earlier layer of
  their type computed, which in a region are the kept tokens' K/V, as in the oracle.

Negatives: an in-place write that mixes tokens, one that mixes in another token-indexed value, and
one whose old value is also read elsewhere (an alias of the written tensor), are refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.modeling_outputs import CausalLMOutput

import regate_fx
from regate_fx import KeepMaskError, RewriteError, SparsifyConfig
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import COMMON, VOCAB, TinyModel
from tests.toy import ToyLM, build_mask

WINDOW, SEQ = 4, 12


def _gemma4(layers: int = 2, **extra) -> TinyModel:
    """Tiny Gemma 4 text model: sliding and full layers, per-layer inputs, layer scalars != 1."""

    def build(attn):
        types = ["sliding_attention", "full_attention"] * (layers // 2)
        cfg = tf.Gemma4TextConfig(**{
            **COMMON, "num_hidden_layers": layers, "num_key_value_heads": 2, "head_dim": 8,
            "global_head_dim": 16, "layer_types": types, "sliding_window": WINDOW,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, **extra,
        })
        cfg._attn_implementation = attn
        model = tf.Gemma4ForCausalLM(cfg)
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                layer.layer_scalar.fill_(0.6 + 0.5 * i)
            # the final RMSNorm undoes a scale unless it is small enough for its eps to matter
            model.model.layers[-1].layer_scalar.fill_(0.05)
        return model

    return TinyModel("gemma4_text", build)


def _sparse(model):
    return regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")


def _check(tm, attn="sdpa", pad="left"):
    model = tm(attn)
    smodel = _sparse(model)
    batch = make_batch(tm, 2, SEQ, pad=pad, seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    check_against_oracle(smodel, model, batch, keep, window=WINDOW)  # kept logits, loss, every gradient
    report = smodel.regate_report
    assert report.refused == [] and report.num_rewritten == len(report.branches)
    assert report.sparse_graph.outside == []
    return model, report


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_gemma4_matches_oracle(attn):
    tm = _gemma4()
    model, report = _check(tm, attn)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(report.branches) == 6  # attention, MLP, per-layer input in each layer
    # the window bites: measured in kept indices instead, the logits differ
    batch = make_batch(tm, 2, SEQ, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    with torch.no_grad():
        naive, _ = regate_fx.oracle(model, batch, keep)
        windowed, _ = regate_fx.oracle(model, batch, keep, window=WINDOW)
    assert max(float((a - b).abs().max()) for a, b in zip(naive, windowed)) > 1e-3


def test_gemma4_layer_scalar_bites():
    """Guards the tests: the last layer's scalar (0.05) changes the logits through the final
    norm's eps, so a scale applied twice (in the last region and again in the tail) would show."""
    tm = _gemma4()
    model = tm("sdpa")
    batch = make_batch(tm, 2, SEQ, seed=1)
    ids = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**ids).logits
        model.model.layers[-1].layer_scalar.mul_(0.05)  # as if applied twice
        after = model(**ids).logits
    assert float((before - after).abs().max()) > 1e-3


def test_gemma4_kv_sharing_matches_oracle():
    """Layers 2 and 3 reuse the K/V of layers 0 (sliding) and 1 (full); with the double-wide MLP of
    the sharing layers and full layers whose values are their keys (`attention_k_eq_v`)."""
    tm = _gemma4(layers=4, num_kv_shared_layers=2, use_double_wide_mlp=True, attention_k_eq_v=True)
    model, report = _check(tm)
    assert model.config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    assert not hasattr(model.model.layers[3].self_attn, "k_proj")  # it has no K/V of its own
    assert len(report.branches) == 12


@pytest.mark.slow
def test_gemma4_moe_block_matches_oracle():
    """`enable_moe_block`: a routed expert block beside the dense MLP, in the same branch."""
    _check(_gemma4(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16))


@pytest.mark.slow
def test_gemma4_right_padding_matches_oracle():
    _check(_gemma4(), pad="right")


# --- negatives -------------------------------------------------------------------------------------


class _Layer(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, 64), torch.nn.Linear(64, d)
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.register_buffer("scale", torch.tensor([0.7]))

    def forward(self, x, mask):
        h = self.n1(x)
        b, t, d = h.shape
        q, k, v = (p(h).view(b, t, 4, d // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.relu(self.up(self.n2(x))))


class _ScaledLM(ToyLM):
    """Each layer's output scaled in place (Gemma 4's layer scalar); `ending` says what the model
    does after the last layer. No final norm: it would undo the last scale."""

    def __init__(self, ending: str):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])
        self.ending = ending

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        t = input_ids.shape[1]
        mask = build_mask("causal_padding", attention_mask, t)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
            old = x
            if self.ending == "mixing" and layer is self.layers[-1]:
                x *= x.mean(dim=1, keepdim=True).sigmoid()  # in place, by a mean over the tokens
            elif self.ending == "other_source" and layer is self.layers[-1]:
                x *= self.embed(input_ids).sigmoid()  # in place, by another token-indexed value
            else:
                x *= layer.scale
        if self.ending == "alias":  # reads the written tensor through its old name: the scaled value
            x = x * old.sigmoid()
        return CausalLMOutput(logits=self.head(x))


def _run(model):
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 10, dtype=torch.long)
    keep = torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[:, 0] = True
    labels = ids.clone()
    return smodel, dict(input_ids=ids, attention_mask=am, labels=labels), keep


def test_inplace_scale_of_a_toy_matches_oracle():
    """The positive twin of the negatives below: a plain in-place scale is exact-sparse (the logits
    are linear in the last scale: no norm after it)."""
    torch.manual_seed(0)
    model = _ScaledLM("scale")
    smodel, batch, keep = _run(model)
    check_against_oracle(smodel, model, batch, keep)  # kept logits, loss, every gradient
    assert smodel.regate_report.refused == [] and smodel.regate_report.sparse_graph.outside == []


@pytest.mark.parametrize("ending", ["alias", "mixing", "other_source"])
def test_inplace_writes_that_are_not_the_stream_are_refused(ending):
    torch.manual_seed(0)
    smodel, batch, keep = _run(_ScaledLM(ending))
    with pytest.raises((RewriteError, KeepMaskError)) as e:
        smodel(**batch, keep_mask=keep)
    text = str(e.value)
    if ending == "mixing":
        assert "token_mixing" in text or "TOKEN_MIXING" in text
    else:
        assert "escaping_value" in text or "ESCAPING_VALUE" in text
