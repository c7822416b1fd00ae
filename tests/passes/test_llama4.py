"""Llama 4 (issue 20): its expert-major tiled MoE and its chunked attention, exact-sparse from the
graph's structure.

- `Llama4TextMoe` tiles the token rows once per expert (`hidden.repeat(E, 1)`), scales tile (e, n)
  by token n's score for expert e, runs a batched matmul over the (E, N, D) view and sums over the
  experts: proven per token in passes/tiling.py, so router and experts run on kept tokens only.
- Chunked layers (`attention_chunk_size`) build their mask at full length from
  `(idx - left_padding) // chunk`: the chunk of every token's original position (passes/judge.py,
  `_leading_padding`), gathered at kept positions. The oracle measures chunks in original positions
  (`oracle(..., chunk=)`); the tiny config's chunk (4) is smaller than the sequence (12), and a
  kept-index chunking is shown to differ, so a graph that chunked by kept index would fail.
- NoPE layers with attention temperature tuning: `floor_scale` (8192) is larger than any test
  sequence, so the scale is 1 here (see README, Mixture of experts / Llama 4).

Negatives: tilings whose tiles are summed over the tokens, read token-major, scaled by another
token's score or summed whole are refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

import regate_fx
from regate_fx import Reason, RewriteError, SparsifyConfig
from tests.helpers import assert_close, check_against_oracle, make_batch, random_keep
from tests.models import COMMON, TinyModel
from tests.toy import ToyLM, build_mask

E, K, CHUNK, SEQ = 4, 2, 4, 12


def _llama4(chunk: int | None = CHUNK, **extra) -> TinyModel:
    """Tiny Llama 4; `chunk=None`: no chunked layers (what the packed layout runs)."""

    def build(attn):
        cfg = tf.Llama4TextConfig(**{**extra,
            **COMMON, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": E, "num_experts_per_tok": K,
            "intermediate_size_mlp": 64, "attention_chunk_size": chunk,
            "no_rope_layers": [1, 0],  # layer 0: RoPE, chunked attention; layer 1: NoPE, full attention
        })
        cfg._attn_implementation = attn
        return tf.Llama4ForCausalLM(cfg)

    return TinyModel("llama4_text", build)


def _sparse(model, layout: str, backend="eager"):
    return regate_fx.sparsify(model, SparsifyConfig(return_logits=True, layout=layout), backend=backend)


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])  # slow: CI time
def test_llama4_matches_oracle(attn):
    tm = _llama4()
    model = tm(attn)
    assert model.config.layer_types == ["chunked_attention", "full_attention"]
    smodel = _sparse(model, "padded")
    batch = make_batch(tm, 3, SEQ, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    check_against_oracle(smodel, model, batch, keep, chunk=CHUNK)  # kept logits, loss, every gradient
    report = smodel.regate_report
    assert report.refused == [] and report.num_rewritten == len(report.branches) == 4
    assert report.sparse_graph.outside == []
    # chunking bites: chunks of kept-subsequence indices give other logits, so a graph that chunked
    # by kept index (or not at all) would fail the comparison above
    with torch.no_grad():
        by_index, _ = regate_fx.oracle(model, batch, keep)  # all-ones mask: chunks of kept indices
        by_position, _ = regate_fx.oracle(model, batch, keep, chunk=CHUNK)
    assert max(float((a - b).abs().max()) for a, b in zip(by_index, by_position)) > 1e-2
    _probe(smodel, batch, keep)


def _probe(smodel, batch, keep):
    """The oracle-free probe: other ids at pruned positions move no kept logit."""
    out = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep).logits
    other = dict(batch, input_ids=torch.where(keep, batch["input_ids"], (batch["input_ids"] + 7) % 90 + 1))
    moved = smodel(**{k: v for k, v in other.items() if k != "labels"}, keep_mask=keep).logits
    assert_close(moved[keep], out[keep], "kept logits after changing pruned ids", atol=0, rtol=0)


def test_llama4_packed_matches_oracle():
    """The packed layout runs causal SDPA only: the MoE without chunked layers, packed, is exact; with
    chunked layers the packed layout is refused with the reason."""
    tm = _llama4(chunk=None)
    model = tm()
    assert model.config.layer_types == ["full_attention", "full_attention"]
    smodel = _sparse(model, "packed")
    batch = make_batch(tm, 3, SEQ, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    check_against_oracle(smodel, model, batch, keep)
    report = smodel.regate_report
    assert report.refused == [] and report.num_rewritten == len(report.branches) == 4
    _probe(smodel, batch, keep)
    chunked = _sparse(_llama4()(), "packed")
    with pytest.raises(RewriteError, match="not causal on the kept tokens"):
        chunked(**batch, keep_mask=keep)


def test_llama4_temperature_tuning_uses_original_positions():
    """NoPE layers scale their queries by `1 + attn_scale * log1p(floor((p + 1) / floor_scale))` with
    p = `arange(T)`, not the position ids. The sparse graph reads it at each kept token's original
    index, as the full-length model does; the per-sample oracle would use the index in the kept
    subsequence (it cannot pass the model other indices). With the default floor_scale (8192) the two
    agree below 8191 tokens; here floor_scale=2 makes them differ within 12 tokens, and the sparse
    logits equal an independent reference: the dense model at full length with every pruned key
    masked out (chunks, padding and causality as the model's own masks), read at the kept tokens."""
    tm = _llama4(floor_scale=2, attn_scale=8.0)
    model = tm()
    smodel = _sparse(model, "padded")
    batch = make_batch(tm, 3, SEQ, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    with torch.no_grad():
        out = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep).logits
        b_, t = keep.shape
        idx = torch.arange(t)
        pos = idx[None] - (batch["attention_mask"].cumsum(1) == 0).sum(1)[:, None]  # (B, T) from the first real token
        causal = (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, T, T): key <= query
        seen = causal & keep[:, None, None, :]  # (B, 1, T, T): kept keys only
        chunked = seen & ((pos[:, :, None] // CHUNK) == (pos[:, None, :] // CHUNK))[:, None]
        eye = torch.eye(t, dtype=torch.bool)[None, None]  # pruned queries see themselves (no empty rows)
        masks = {k: torch.where(m | eye, 0.0, float("-inf")) for k, m in
                 (("full_attention", seen), ("chunked_attention", chunked))}
        ref = model(input_ids=batch["input_ids"], attention_mask=masks, position_ids=batch["position_ids"],
                    use_cache=False).logits
        by_kept_index, _ = regate_fx.oracle(model, batch, keep, chunk=CHUNK)
    assert_close(out[keep], ref[keep], "kept logits vs the masked full-length model")
    got = [out[b, keep[b]] for b in range(b_)]
    # the scale bites: the kept-index oracle lies far outside the comparison's tolerance (2e-5)
    assert max(float((g - o).abs().max()) for g, o in zip(got, by_kept_index)) > 1e-3


class _Rows(TorchDispatchMode):
    """Records the token rows the router (mm by its (D, E) weight) and the experts (bmm of the
    (E, N, D) view by (E, D, F) weights) receive."""

    def __init__(self):
        super().__init__()
        self.router: list[int] = []
        self.experts: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and tuple(args[1].shape) == (COMMON["hidden_size"], E):
            self.router.append(int(args[0].shape[0]))
        elif func is torch.ops.aten.bmm.default and args[0].shape[0] == E and args[1].shape[0] == E:
            self.experts.append(int(args[0].shape[1]))
        return func(*args, **(kwargs or {}))


def test_llama4_router_and_experts_receive_only_kept_tokens():
    count = _Rows()

    def counting(gm, example_inputs):  # the backend after the pass: runs the rewritten graph under the count
        def run(*args):
            with count:
                return gm.forward(*args)
        return run

    tm = _llama4(chunk=None)
    model = tm()
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout="packed"), backend=counting)
    batch = make_batch(tm, 3, SEQ, pad="left", seed=1)
    keep = random_keep(batch, 0.4, seed=3)
    with count, torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    assert count.router == [3 * SEQ] * 2 and count.experts == [3 * SEQ] * 4  # dense: every token, 2 layers
    count.router.clear()
    count.experts.clear()
    smodel(**batch, keep_mask=keep)
    n = int(keep.sum())
    assert count.router == [n] * 2, count.router  # sparse: the kept tokens only
    assert count.experts == [n] * 4, count.experts  # each expert's (up, down) bmm on the kept rows


def _toy_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    keep = torch.rand(2, 10, generator=g) < 0.6
    keep[:, 0] = True
    return ids, keep


def test_tiled_experts_are_token_wise():
    model = ToyLM(["tiled", None]).eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, keep = _toy_batch()
    out = smodel(input_ids=ids, keep_mask=keep)
    assert smodel.regate_report.refused == []
    for b in range(2):
        pos = keep[b].nonzero().flatten()
        assert_close(out.logits[b, pos], model(ids[b:b + 1, pos]).logits[0], f"sample {b}")


@pytest.mark.parametrize("mix", ["tiled_tokens", "tiled_minor", "tiled_factor", "tiled_flat"])
def test_tilings_that_mix_tokens_are_refused(mix):
    model = ToyLM([None, mix]).eval()
    ids, keep = _toy_batch()
    with pytest.raises(RewriteError) as err:
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, keep_mask=keep)
    # the branch's first refused node: the repeat, or the scores' expert-major reshape (which only
    # a proven tiling accepts: the same model with the tiles read per token, "tiled", is exact)
    found = [(r.reason, r.detail) for r in err.value.report.refused]
    assert len(found) == 1 and found[0][0] is Reason.TOKEN_MIXING, found
    assert "not a proven expert-major tiling" in found[0][1] or "moves tokens" in found[0][1], found


def test_llama4_conditional_generation_captures_the_inner_decoder():
    """Llama4ForConditionalGeneration.get_decoder() is its `language_model`, a Llama4ForCausalLM (its
    output has logits, not hidden states): decoder capture descends to that model's own base model
    and head (Capture._decoder_and_head), checked by the head probe and against the oracle."""
    from regate_fx.inspect import inspect_model

    res = inspect_model("llama4", time_limit=300)
    assert res.verdict == "exact-sparse", (res.verdict, res.error, res.reasons)


def _mask_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, :4] = 0  # left padding
    am[2, 9:] = 0  # right padding
    keep = (torch.rand(3, 12, generator=g) < 0.6) & am.bool()
    keep[torch.arange(3), am.argmax(1)] = True
    return ids, am, keep


def test_chunked_mask_from_left_padding_is_exact():
    """`(idx - left_padding) // chunk`, the left padding counted as `(cumsum(am) == 0).sum(-1)`:
    gathered, the chunks of the kept tokens' original positions (the reference: the toy's layers on
    each kept subsequence with the full-length mask read at its kept rows and columns)."""
    model = ToyLM(mask="chunked").eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, am, keep = _mask_batch()
    out = smodel(input_ids=ids, attention_mask=am, keep_mask=keep)
    assert smodel.regate_report.refused == [] and smodel.regate_report.sparse_graph.outside == []
    full = build_mask("chunked", am, 12)
    for b in range(3):
        pos = keep[b].nonzero().flatten()
        x = model.embed(ids[b:b + 1, pos])
        for layer in model.layers:
            x = layer(x, full[b:b + 1][:, :, pos][:, :, :, pos])
        assert_close(out.logits[b, pos].detach(), model.head(model.norm(x))[0].detach(), f"sample {b}")


@pytest.mark.parametrize("kind,needle", [("chunked_added", "sum along the token axis"),
                                         ("chunked_length", "sum along the token axis")])
def test_other_uses_of_the_padding_count_are_refused(kind, needle):
    model = ToyLM(mask=kind).eval()
    ids, am, keep = _mask_batch()
    with pytest.raises(RewriteError) as err:
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)
    outside = [(o.reason, o.detail) for o in err.value.report.sparse_graph.outside]
    assert any(r is Reason.TOKEN_MIXING and needle in d for r, d in outside), outside
