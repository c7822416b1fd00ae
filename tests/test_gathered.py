"""SparsifyConfig(execution="gathered"), one process: the unmodified model run on the gathered kept
tokens equals the oracle (logits at kept positions, loss, every gradient), for a text decoder and
for multimodal models whose front end merges image features into inputs_embeds (LLaVA) and computes
3-D M-RoPE positions (Qwen2-VL); models the proof does not cover are refused with reasons."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regate_fx
from regate_fx import RewriteError, SparsifyConfig
from regate_fx.passes.proof import meta_copy
from tests.helpers import (
    LOSS_ATOL,
    assert_close,
    assert_grads_close,
    check_against_oracle,
    grads,
    make_batch,
    random_keep,
)
from tests.mm_models import BY_NAME as MM
from tests.mm_models import keep_visual, make_mm_batch, model_inputs
from tests.models import BY_NAME

GATHERED = SparsifyConfig(execution="gathered")
GRAD_SCALE = 2e-6  # float32 noise relative to a tensor's largest gradient (as tests/test_mm_matrix.py)


def _gathered(model, **kw):
    return regate_fx.sparsify(model, SparsifyConfig(execution="gathered", **kw), backend="eager")


@pytest.mark.parametrize(
    "attn, pad",
    [
        ("sdpa", "left"),
        pytest.param("eager", "left", marks=pytest.mark.slow),  # an additive float mask: proven causal too
        pytest.param("sdpa", "right", marks=pytest.mark.slow),
        pytest.param("eager", "right", marks=pytest.mark.slow),
    ],
)
def test_llama_gathered_equals_oracle(attn, pad):
    tm = BY_NAME["llama"]
    model = tm(attn).train()
    smodel = _gathered(model)
    batch = make_batch(tm, 3, 12, pad=pad, seed=1)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    proof = next(iter(smodel._regate_forward.gathered.proofs.values()))
    assert proof.ok and proof.regions == 1


def test_gathered_without_position_ids_uses_the_oracles_positions():
    tm = BY_NAME["llama"]
    model = tm().train()
    batch = make_batch(tm, 2, 10, pad="none", seed=3, positions=False)
    check_against_oracle(_gathered(model), model, batch, random_keep(batch, 0.4, seed=4))


def test_gathered_equals_rewrite_and_dense_at_keep_all():
    tm = BY_NAME["llama"]
    model = tm().train()
    batch = make_batch(tm, 2, 9, pad="none", seed=5)  # left padding: HF would score a padded position
    keep = batch["attention_mask"].bool()
    smodel = _gathered(model, return_logits=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    regate_fx.unsparsify(model)
    dense = model(**batch)  # HF's own loss: mean over the shifted supervised labels
    dense.loss.backward()
    assert_close(out.loss.detach(), dense.loss.detach(), "loss", atol=LOSS_ATOL, rtol=0)
    real = keep
    assert_close(out.logits[real].detach(), dense.logits[real].detach(), "logits")
    assert_grads_close(g, grads(model))


def _mm_case(name):
    if name == "llava":  # CLIP tower + projector, features merged into inputs_embeds
        tm = BY_NAME["llava"]
        model = tm("sdpa").train()
        batch = make_batch(tm, 2, 14, pad="left", seed=1)
        return model, batch, random_keep(batch, 0.5, seed=2)
    fam = MM[name]  # Qwen2-VL: its own vision tower, 3-D M-RoPE positions
    model = fam("sdpa").train()
    batch = make_mm_batch(fam, model, [["image"], ["image"]], pad="left", seed=1)
    return model, model_inputs(batch), keep_visual(batch, 0.5, seed=2)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_multimodal_gathered_equals_oracle(name):
    model, inputs, keep = _mm_case(name)
    smodel = _gathered(model, return_logits=True)
    model.zero_grad(set_to_none=True)
    out = smodel(**inputs, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    ref_logits, ref_loss = regate_fx.oracle(model, inputs, keep)
    ref_loss.backward()
    g_ref = grads(model)
    for b, ref in enumerate(ref_logits):
        pos = keep[b].nonzero().flatten()
        assert_close(out.logits[b, pos].detach(), ref.detach(), f"logits of sample {b}")
        assert float(out.logits[b, ~keep[b]].detach().abs().sum()) == 0.0
    assert_close(out.loss.detach(), ref_loss.detach(), "loss", atol=LOSS_ATOL, rtol=0)
    assert_grads_close(g_sparse, g_ref, scale=GRAD_SCALE)
    vision = [n for n in g_sparse if "vision" in n or "visual" in n or "projector" in n or "merger" in n]
    assert vision and any(float(g_sparse[n].abs().max()) > 0 for n in vision), "no gradient reached the vision side"


def test_gathered_checks_the_head_on_the_steps_own_forward():
    """A decoder-mode model's first gathered step checks that its logits are exactly head(decoder
    output) with hooks on its own forward: the model runs once (a dense forward of its own, nested
    in the root's, all-gathered every FSDP2 layer twice and the root's group again for the
    backward), and a model that changes its logits after the head in a way that mixes positions is
    still refused."""
    model, inputs, keep = _mm_case("llava")
    runs = []
    model.get_decoder().register_forward_pre_hook(lambda _m, _a: runs.append("decoder"))
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, _a: runs.append("head"))
    smodel = _gathered(model)
    smodel(**inputs, keep_mask=keep).loss.backward()
    assert runs == ["decoder", "head"]
    assert smodel._regate_forward.gathered._head_checked

    # a map after the head (here: in the forward) runs on the kept rows, in the model's own forward:
    # exact when it is per position (heads.py checks that on the first step), refused otherwise
    for fn, refused in ((lambda x: torch.tanh(x * 0.5) * 3.0, None), (lambda x: x - x.mean(1, keepdim=True),
                                                                       "mixes positions")):
        model, inputs, keep = _mm_case("llava")

        class After(type(model)):  # logits changed after the head, inside the forward
            def forward(self, *args, fn=fn, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = fn(out.logits)
                return out

        model.__class__ = After
        smodel = _gathered(model, return_logits=True)
        if refused is None:
            check_against_oracle(smodel, model, inputs, keep, grad_scale=GRAD_SCALE)
            continue
        with pytest.raises(RewriteError, match=rf"logits are not its LM head \(lm_head\).*{refused}.*capture='model'"):
            smodel(**inputs, keep_mask=keep)


def test_qwen2_vl_positions_are_3d_mrope():
    """The decoder of Qwen2-VL receives (3, B, T) (or (4, B, T)) positions: they are gathered as such."""
    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    smodel = _gathered(model)
    batch = make_mm_batch(fam, model, [["image"], ["image"]], pad="left", seed=1)
    keep = keep_visual(batch, 0.5, seed=2)
    seen = {}
    dec = model.get_decoder()
    h = dec.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        smodel(**model_inputs(batch), keep_mask=keep)
    finally:
        h.remove()
    pos, k = seen["position_ids"], int(keep.sum(1).max())
    assert pos.dim() == 3 and pos.shape[1:] == (2, k), tuple(pos.shape)
    assert seen["inputs_embeds"].shape[:2] == (2, k)


# --- refusals -------------------------------------------------------------------------------


def _refusal(model, batch, keep) -> str:
    with pytest.raises(RewriteError) as info:
        _gathered(model)(**batch, keep_mask=keep)
    return str(info.value)


def test_sliding_window_is_refused():
    """Mistral with a window: the mask is counted in indices, which the kept layout would change."""
    import transformers as tf

    from tests.models import COMMON

    torch.manual_seed(0)
    cfg = tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4)
    cfg._attn_implementation = "sdpa"
    model = tf.MistralForCausalLM(cfg)
    batch = make_batch(BY_NAME["llama"], 2, 12, seed=1)
    msg = _refusal(model, batch, random_keep(batch, 0.5, seed=1))
    assert "cannot be proven exact" in msg and "side_input" in msg and "execution='rewrite'" in msg


@pytest.mark.parametrize(
    "kw, code",
    [
        (dict(mixes=(None, "conv")), "refused_branch"),  # a depthwise convolution over tokens in a branch
        (dict(stem="conv"), "outside"),  # a token-mixing stem before the first residual add
    ],
)
def test_token_mixing_the_proof_does_not_cover_is_refused(kw, code):
    from tests.toy import ToyLM

    model = ToyLM(**kw)
    batch = make_batch(BY_NAME["llama"], 2, 10, seed=1)
    msg = _refusal(model, batch, random_keep(batch, 0.5, seed=1))
    assert "cannot be proven exact" in msg and code in msg, msg


def test_4d_mask_is_refused():
    tm = BY_NAME["llama"]
    batch = make_batch(tm, 2, 8, seed=1)
    keep = random_keep(batch, 0.5, seed=1)
    batch["attention_mask"] = torch.ones(2, 1, 8, 8)
    with pytest.raises(Exception) as info:
        _gathered(tm())(**batch, keep_mask=keep)
    assert "2-D" in str(info.value) or "keep_mask" in str(info.value)


def test_auto_is_the_rewrite_without_per_module_sharding():
    model = regate_fx.sparsify(BY_NAME["llama"](), SparsifyConfig(execution="auto"), backend="eager")
    assert regate_fx.sparse_forward(model).execution(model) == "rewrite"


def test_config_rejects_an_unknown_execution():
    with pytest.raises(ValueError, match="execution"):
        SparsifyConfig(execution="layerwise")


# --- the structural copy --------------------------------------------------------------------


def test_meta_copy_has_the_structure_and_nothing_else():
    model = regate_fx.sparsify(BY_NAME["llama"](), backend="eager")
    model.model.layers[0].register_forward_pre_hook(lambda *a: None)
    copy = meta_copy(model)
    assert type(copy) is type(model) and "forward" not in copy.__dict__
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p.device.type == "meta" for p in copy.parameters())
    assert not copy.model.layers[0]._forward_pre_hooks and model.model.layers[0]._forward_pre_hooks
    assert all(p.device.type == "cpu" for p in model.parameters())  # the original is untouched


# --- any keep mask ----------------------------------------------------------------------------

_MODEL = {}


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**16),
    rho=st.floats(0.05, 1.0),
    pad=st.sampled_from(["left", "right", "none"]),
    bsz=st.integers(1, 3),
    seq=st.integers(4, 14),
)
def test_any_keep_mask_gathered_equals_oracle(seed, rho, pad, bsz, seq):
    tm = BY_NAME["llama"]
    if "m" not in _MODEL:
        model = tm().train()
        _MODEL["m"] = (model, _gathered(model))
    model, smodel = _MODEL["m"]
    batch = make_batch(tm, bsz, seq, pad=pad, seed=seed)
    check_against_oracle(smodel, model, batch, random_keep(batch, rho, seed=seed + 1))
