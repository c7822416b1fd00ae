"""Capture (issue 7): what dynamo captures, and what a user sees when it cannot.

- A capture that dynamo cannot complete is a RewriteError naming the module and what to do, never
  a raw dynamo error.
- Multimodal models are captured as "decoder + LM head" on what their own forward computes
  eagerly (vision tower, projector, merge, M-RoPE ids); gradients still reach the vision side.
- Refusals name the true cause (OLMo's in-place clip is not an "escaping value", Mllama's
  cross-attention is not a malformed SDPA key).
"""

from __future__ import annotations

import pytest
import torch

import regate_fx
from regate_fx import RewriteError, SparsifyConfig
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.mm_models import BY_NAME as MM, keep_visual, make_mm_batch, model_inputs
from tests.models import BY_NAME


def test_capture_failure_is_a_rewrite_error_naming_the_module():
    """Qwen2-VL's vision attention calls lengths.tolist(): with capture='model' dynamo cannot
    capture it. The user gets a RewriteError that names the module, the line, and the fix."""
    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    smodel = regate_fx.sparsify(model, SparsifyConfig(capture="model"), backend="eager")
    batch = make_mm_batch(fam, model, [["image"], ["image"]], seed=1)
    with pytest.raises(RewriteError) as info:
        smodel(**model_inputs(batch), keep_mask=keep_visual(batch, 0.5))
    msg = str(info.value)
    assert "module 'model.visual.blocks.0.attn'" in msg and "lengths.tolist()" in msg
    assert "capture='decoder'" in msg
    assert type(info.value) is RewriteError  # not a torch._dynamo exception


def test_llava_called_eagerly_before_the_first_sparse_call():
    """Regression: an eager call (evaluation before training) hooked the vision tower; installing
    the hooks again on the whole model duplicated them, and the projector got None as its input."""
    tm = BY_NAME["llava"]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 12, pad="left", seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model(**inputs, use_cache=False).logits
    for capture in ("model", "decoder"):
        smodel = regate_fx.sparsify(model, SparsifyConfig(capture=capture), backend="eager")
        check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    torch.testing.assert_close(model(**inputs, use_cache=False).logits, before)  # eager still works


def test_decoder_capture_refuses_a_change_before_the_head():
    """Decoder capture runs decoder + head (+ the forward's post-head map, tests/test_heads.py); a
    forward that changes the decoder's output before the head would be silently dropped, so the
    first call checks and refuses."""
    tm = BY_NAME["llava"]
    model = tm("sdpa")
    model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] * 2.0,))
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 2, 12, seed=1)
    with pytest.raises(RewriteError, match=r"LM head \(lm_head\) is not applied to its decoder's.*capture='model'"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))


def test_decoder_capture_names_a_decoder_the_forward_never_calls():
    """An encoder-decoder model (Florence-2) calls its decoder stack, not model.get_decoder()."""
    tm = BY_NAME["llava"]
    model = tm("sdpa")
    model.get_decoder = lambda: model.model.vision_tower  # a module the text forward never calls
    smodel = regate_fx.sparsify(model, SparsifyConfig(capture="decoder"), backend="eager")
    batch = {k: v for k, v in make_batch(tm, 2, 12, seed=1).items() if k != "pixel_values"}
    with pytest.raises(RewriteError, match=r"never called its decoder \(model.vision_tower"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))


def test_a_decoder_holding_the_head_is_looked_through():
    """Kosmos-2.5's get_decoder() is its text_model, a causal LM with the LM head inside: the
    captured decoder is that LM's own decoder (its one other child with parameters)."""
    from regate_fx.capture import Capture
    from regate_fx.inspect.shrink import load_config, model_class, shrink_config

    cfg = shrink_config(load_config("kosmos-2.5"))
    model = model_class(cfg)[1]._from_config(cfg)
    wrapper = Capture(model, "decoder", {}).wrapper
    assert wrapper._decoder_path == ("text_model", "model") and wrapper._head_path == ("text_model", "lm_head")


def test_multimodal_models_capture_the_decoder_by_default():
    assert regate_fx.sparsify(BY_NAME["llava"]("sdpa"), backend="eager")._regate_forward._capture.mode == "decoder"
    assert regate_fx.sparsify(BY_NAME["llama"]("sdpa"), backend="eager")._regate_forward._capture.mode == "model"
    with pytest.raises(ValueError, match="capture must be one of"):
        SparsifyConfig(capture="vision")


def test_mllama_cross_attention_runs_on_kept_queries():
    """Mllama's cross-attention keys are image tokens (no token axis): each kept query reads its
    own mask row, so it is exact on kept tokens (it used to be refused as a malformed sdpa key)."""
    fam = MM["mllama"]
    model = fam("sdpa")
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_mm_batch(fam, model, [["image"], ["image"]], seed=1)
    check_against_oracle(smodel, model, model_inputs(batch), keep_visual(batch, 0.5, seed=2), grad_scale=2e-6)
    forms = {b.attention for b in smodel.regate_report.sparse_graph.branches}
    assert "cross" in forms and smodel.regate_report.refused == []



def test_dynamic_rope_refusal_names_the_rotary_module():
    """Dynamic RoPE recomputes its frequencies when the largest position grows: a data-dependent
    branch. The error names the rotary module and the branch, not just 'graph break'."""
    import transformers as tf

    from tests.models import TinyModel, _causal

    tm = TinyModel("llama_dynamic_rope", _causal(tf.LlamaConfig, tf.LlamaForCausalLM, num_key_value_heads=2,
                                                 rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 10000.0}))
    smodel = regate_fx.sparsify(tm("sdpa"), backend="eager")
    batch = make_batch(tm, 2, 12, seed=1)
    with pytest.raises(RewriteError) as info:
        smodel(**batch, keep_mask=random_keep(batch, 0.5))
    msg = str(info.value)
    assert "module 'model.rotary_emb' (LlamaRotaryEmbedding)" in msg
    assert "dynamic_frequency_update: if seq_len > max_seq_len_cached" in msg


def test_dense_call_in_decoder_capture_equals_the_model():
    """keep_mask=None through decoder capture: the model's own logits, and its gradients."""
    from tests.helpers import assert_close, assert_grads_close, grads

    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_mm_batch(fam, model, [["image"], ["video"]], pad="right", seed=4)
    inputs = model_inputs(batch)
    out = smodel(**inputs)
    out.logits.sum().backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    ref = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    ref.sum().backward()
    assert_close(out.logits.detach(), ref.detach(), "logits", atol=1e-5, rtol=1e-5)
    assert_grads_close(g_sparse, grads(model), scale=2e-6)
    assert smodel._regate_forward._capture.mode == "decoder"  # a dense call is the model's own forward


def test_image_layout_does_not_recompile_the_decoder():
    """Decoder capture: batch size, number of images and videos, and sequence length change; the
    front end runs eagerly, so the captured decoder graph is reused."""
    from torch._dynamo.utils import counters

    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    smodel = regate_fx.sparsify(model, backend="eager")
    first = make_mm_batch(fam, model, [["image"], ["image"]], seed=1)
    smodel(**model_inputs(first), keep_mask=keep_visual(first, 0.5, seed=1)).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    for seed, items in enumerate([[["image", "image"], ["video"], ["image"]], [["video", "image"], ["video"]],
                                  [["image"], ["image", "video"], ["video"], ["image"]]]):  # B >= 2: 1 specialises
        batch = make_mm_batch(fam, model, items, seed=seed + 2)
        smodel(**model_inputs(batch), keep_mask=keep_visual(batch, 0.4, seed=seed)).loss.backward()
    layouts = [g.layout for g in smodel.regate_report.graphs if g.sparse]
    assert len(layouts) == len(set(layouts)), layouts  # "auto": each layout compiled once, at its first use
    assert counters["stats"]["unique_graphs"] - graphs == len(layouts) - 1


def test_output_hooks_are_installed_only_for_a_forward_that_asks_for_outputs():
    # transformers' output-capturing hooks make dynamo trace every hooked module's hook path (a
    # slower capture): a plain sparse step leaves them out. A forward that asks for attentions or
    # hidden states gets them, and is captured again (test_negative's WithAttn model).
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 2, 8)
    smodel(**batch, keep_mask=random_keep(batch, 0.5))
    assert [name for name, m in model.named_modules() if m._forward_hooks] == []
