"""The post-head map (regate_fx/heads.py): what a multimodal model's forward does to its LM head's
output, recorded once and replayed after the head in the decoder-capture graph.

- Families whose forward scales or soft-caps the logits after the head are exact against the oracle
  (loss, logits at kept positions, every parameter gradient): AyaVision (a constant scale, also with
  an image), GraniteDocling (a division), MuseGlimmer (a multiplier, then tanh soft-capping), built
  tiny from their configs.
- A map that mixes positions (or samples), or one the recording cannot follow, is refused with the
  reason and the hint ``capture='model'``.
"""

from __future__ import annotations

import types

import pytest
import torch

import regate_fx
from regate_fx import RewriteError, SparsifyConfig
from regate_fx.heads import PostHead, PostHeadError, PostHeadRecorder
from regate_fx.inspect.shrink import load_config, model_class, shrink_config
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME


def _tiny(family: str, **vision) -> torch.nn.Module:
    cfg = shrink_config(load_config(family))
    for k, v in vision.items():
        setattr(cfg.vision_config, k, v)
    _, cls = model_class(cfg)
    torch.manual_seed(0)
    return cls._from_config(cfg, dtype=torch.float32).float()


def _text_batch(model, batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[0, : seq // 4] = 0  # left padding in sample 0
    ids = ids.masked_fill(am == 0, 0)
    return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100),
            "position_ids": (am.cumsum(1) - 1).clamp(min=0)}


@pytest.mark.parametrize("family", ["aya_vision", "granite_docling", "muse_glimmer"])
def test_post_head_map_is_exact_against_the_oracle(family):
    model = _tiny(family)
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")
    batch = _text_batch(model, 3, 12, seed=1)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    fwd = smodel._regate_forward
    assert fwd._capture.mode == "decoder" and fwd._capture.wrapper._post is not None  # the map is replayed
    g = smodel.regate_report.sparse_graph
    assert smodel.regate_report.refused == [] and g.tail_on_kept  # the map runs on the kept rows


def test_aya_vision_with_an_image_is_exact():
    """AyaVision with pixel inputs: the vision tower and projector run eagerly, the decoder + head +
    logit scale are captured; gradients reach the projector through the merged embeddings."""
    model = _tiny("aya_vision", image_size=56)  # 4x4 patches, pixel-shuffled by 2: 4 image tokens
    n, image = 4, model.config.image_token_id
    batch = _text_batch(model, 2, 14, seed=3)
    ids = batch["input_ids"]
    for b in range(2):
        start = int(batch["attention_mask"][b].nonzero()[0]) + 1
        ids[b, start:start + n] = image
    batch["labels"] = ids.masked_fill((batch["attention_mask"] == 0) | (ids == image), -100)
    batch["pixel_values"] = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    keep = random_keep(batch, 0.5, seed=5) | (ids == image)
    smodel = regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")
    check_against_oracle(smodel, model, batch, keep, grad_scale=2e-6)
    smodel(**batch, keep_mask=keep).loss.backward()
    proj = [p.grad for n, p in model.named_parameters() if n.startswith("model.multi_modal_projector")]
    assert proj and all(g is not None for g in proj) and any(float(g.abs().max()) > 0 for g in proj)


def _llava_with(fn):
    """Tiny LLaVA whose forward ends with ``logits = fn(logits)`` (its own code, not a hook); a
    two-argument `fn` also gets the forward's keyword arguments."""
    tm = BY_NAME["llava"]
    model = tm("sdpa")
    forward = model.forward

    def own_forward(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = fn(out.logits, kwargs) if fn.__code__.co_argcount == 2 else fn(out.logits)
        return out

    model.forward = types.MethodType(own_forward, model)
    return tm, model, regate_fx.sparsify(model, backend="eager")


def test_a_map_in_the_forward_is_replayed():
    """Soft-capping written in the model's forward: replayed after the head, exact."""
    tm, model, smodel = _llava_with(lambda x: torch.tanh(x * 0.5) * 3.0)
    batch = make_batch(tm, 2, 12, seed=1)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))


@pytest.mark.parametrize("fn,what", [
    (lambda x: x - x.mean(1, keepdim=True), "mixes positions"),
    (lambda x: x.cumsum(1), "mixes positions"),
    (lambda x: x - x.mean(0, keepdim=True), "mixes samples"),
])
def test_a_map_that_mixes_positions_is_refused(fn, what):
    tm, _, smodel = _llava_with(fn)
    batch = make_batch(tm, 2, 12, seed=1)
    with pytest.raises(RewriteError, match=rf"logits are not its LM head \(lm_head\).*{what}.*capture='model'"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))


def test_the_pass_refuses_a_replayed_map_that_mixes_positions(monkeypatch):
    """The probe's commutation check is the clear message; the proof is the pass's: without the
    check, the replayed map is in the graph and the coverage invariant refuses it."""
    monkeypatch.setattr(PostHead, "check", lambda *_a, **_k: None)
    tm, _, smodel = _llava_with(lambda x: x - x.mean(1, keepdim=True))
    batch = make_batch(tm, 2, 12, seed=1)
    with pytest.raises(RewriteError, match=r"token_mixing: mean along the token axis"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))


def test_a_map_the_recording_cannot_follow_is_refused():
    """Python control flow on the logits' shape, and an activation read by the map: refused."""
    tm, _, smodel = _llava_with(lambda x: x / x.shape[1])
    batch = make_batch(tm, 2, 12, seed=1)
    with pytest.raises(RewriteError, match=r"reads the logits' 'shape'.*capture='model'"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))
    tm, _, smodel = _llava_with(lambda x, kw: x / kw["input_ids"].shape[1])  # the length, as a Python int
    with pytest.raises(RewriteError, match=r"computes with the number 12, the batch's sequence length"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))
    noise = torch.randn(2, 12, 1)
    tm, _, smodel = _llava_with(lambda x: x * noise)
    with pytest.raises(RewriteError, match=r"neither computed from the LM head's output nor a parameter"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5))


def test_recorder_replays_parameters_and_in_place_ops():
    lin = torch.nn.Linear(4, 6)
    scale = torch.nn.Parameter(torch.full((6,), 2.0))
    owner = torch.nn.Module()
    owner.register_parameter("scale", scale)
    rec = PostHeadRecorder(owner)
    x = torch.randn(2, 5, 4)
    head_out = lin(x)
    rec.start(head_out)
    y = head_out.float() * scale
    y.clamp_(max=1.0)
    rec.stop()
    post = rec.result(y)
    post.check(owner, head_out.detach(), y.detach())
    assert torch.equal(post(owner, head_out), y)
    with pytest.raises(PostHeadError, match="not computed from the LM head's output"):
        rec.result(torch.zeros(2, 5, 6))
