"""Regressions for the six unsound shapes of issue 6: each is refused with a reason, or exact.

"Exact" means the fuzzer's full check (:func:`tests.fuzz.check.check_refused_or_exact`): kept
logits, loss and every gradient equal the per-sample oracle, pruned token ids do not reach kept
logits, and a second step keeping every real token equals the unsparsified model.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.fuzz import hf_models
from tests.fuzz.arch import VOCAB, ArchSpec, FuzzLM, Mixer
from tests.fuzz.check import BatchSpec, check_refused_or_exact, make_batch

# Left padding (shifted positions, uneven kept counts) by default; the unpadded batch under the
# slow mark (CI time).
BATCHES = [
    pytest.param(BatchSpec(2, 10, "left", (10, 6), rho=0.5, seed=1), id="left-pad"),
    pytest.param(BatchSpec(2, 8, "none", rho=0.4, seed=2), id="none-pad", marks=pytest.mark.slow),
]

SHAPES = {
    # 1. a reduction over the token axis inside a branch
    "max_over_tokens_in_mlp": ArchSpec(mixers=(Mixer("max", "mlp", 0),)),
    "min_over_tokens_in_mlp": ArchSpec(mixers=(Mixer("min", "mlp", 1),)),
    "absmax_scale_in_mlp": ArchSpec(mixers=(Mixer("absmax", "mlp", 0),)),
    "max_over_tokens_in_attn": ArchSpec(mixers=(Mixer("max", "attn", 0),)),
    # 2. post-LN: h = LN(h + f(h)) breaks the chain of residual adds
    "post_norm_serial": ArchSpec(norm_place="post"),
    "post_norm_parallel_eager": ArchSpec(norm_place="post", block="parallel", attn="eager", layers=3),
    "post_norm_cumsum_after_chain": ArchSpec(layers=1, norm_place="post", mixers=(Mixer("cumsum", "mlp", 0),)),
    # 3. a token mixer before the first residual add
    "causal_conv_stem": ArchSpec(mixers=(Mixer("conv", "stem"),)),
    "cumsum_stem": ArchSpec(mixers=(Mixer("cumsum", "stem"),)),
    # found by the fuzzer after the coverage invariant: the value entering the stream was exempt
    "token_linear_stem": ArchSpec(layers=1, norm_place="post", mixers=(Mixer("token_linear", "stem"),)),
    # 4. sigmoid attention: no softmax, so a duplicated padding slot is not masked away
    "sigmoid_attention": ArchSpec(attn="sigmoid"),
    "sigmoid_attention_additive_window": ArchSpec(attn="sigmoid", mask="additive", window=3, layers=1),
    # 5. a reshape that moves tokens (swap neighbours)
    "flip_pairs_in_attn": ArchSpec(mixers=(Mixer("flip_pairs", "attn", 0),)),
    "flip_pairs_in_mlp": ArchSpec(mixers=(Mixer("flip_pairs", "mlp", 0),)),
}


@pytest.mark.parametrize("bs", BATCHES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_issue6_fuzz_shape(name, bs):
    spec = SHAPES[name]
    batch, keep = make_batch(dataclasses.replace(bs, even=spec.even_seq), VOCAB)
    model = FuzzLM(spec)
    check_refused_or_exact(model, batch, keep, VOCAB, then_keep_all=True)


# 2 (post-LN) and 6 (hybrids) in transformers models. All build and run densely on CPU in
# transformers 5.24 (the Mamba layers use their PyTorch reference path).
HF = ["openai_gpt", "bert_decoder", "jamba", "jamba_moe", "falcon_h1", "bamba", "zamba2", "granite_moe_hybrid"]


# CI time: one hybrid (falcon_h1: Mamba + attention) in the default run, the rest slow.
HF_DEFAULT = ["openai_gpt", "bert_decoder", "falcon_h1"]


@pytest.mark.parametrize("name", [n if n in HF_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in HF])
def test_issue6_transformers_model(name):
    model = hf_models.build(name)
    batch, keep = make_batch(BatchSpec(2, 10, "left", (10, 7), rho=0.5, seed=4), hf_models.VOCAB)
    check_refused_or_exact(model, batch, keep, hf_models.VOCAB, then_keep_all=True)
