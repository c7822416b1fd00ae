"""The causal-mask proof (passes/masks.py): masks that are provably "causal AND key is real" let kept
tokens use SDPA's is_causal fast path; every other mask is gathered and used as it is."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from tests.helpers import assert_close, check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME
from tests.toy import ToyLM, build_mask


def _sdpa_calls(shapes: list):
    """A backend recording the (attn_mask, is_causal) of every SDPA call of the rewritten graph."""

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if "scaled_dot_product_attention" in getattr(n.target, "__name__", ""):
                mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
                shapes.append((mask is None, n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False)))
        return gm.forward

    return backend


@pytest.mark.parametrize("name,pad", [("llama", "left"), ("qwen2", "right"), ("gpt_neox", "none"), ("llava", "left")])
def test_transformers_masks_are_proven_causal_and_exact(name, pad):
    tm = BY_NAME[name]
    model = tm("sdpa")
    calls: list = []
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout="padded"), backend=_sdpa_calls(calls))
    batch = make_batch(tm, 3, 14, pad=pad, seed=5)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=6))
    graph = smodel.regate_report.sparse_graph
    assert graph.causal_masks == 1
    sparse_calls = calls[-2:]  # the sparse graph's two layers
    assert sparse_calls == [(True, True)] * 2
    assert "proven causal on kept tokens (SDPA is_causal fast path): 1" in str(smodel.regate_report)


def _toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, :4] = 0  # left padding
    am[2, 9:] = 0  # right padding
    keep = (torch.rand(3, 12, generator=g) < 0.6) & am.bool()
    keep[torch.arange(3), am.argmax(1)] = True
    return ids, am, keep


def _toy_oracle(model, ids, am, keep):
    """The toy's dense layers on each kept subsequence, with its mask gathered (window by index)."""
    out = []
    for b in range(ids.size(0)):
        pos = keep[b].nonzero().flatten()
        x = model.embed(ids[b:b + 1, pos])
        full = None if model.mask is None else build_mask(model.mask, am[b:b + 1], ids.size(1))
        mask = None if full is None else full[:, :, pos][:, :, :, pos]
        for layer in model.layers:
            x = layer(x, mask)
        out.append(model.head(model.norm(x))[0])
    return out


@pytest.mark.parametrize("kind,proven", [("causal_padding", True), ("window", False), ("foreign", False),
                                         ("broadcast_key", True), ("broadcast_query", False)])
def test_only_provably_causal_masks_take_the_fast_path(kind, proven):
    model = ToyLM(mask=kind).eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, am, keep = _toy_batch()
    out = smodel(input_ids=ids, attention_mask=am, keep_mask=keep)
    assert smodel.regate_report.sparse_graph.causal_masks == (1 if proven else 0)
    for b, ref in enumerate(_toy_oracle(model, ids, am, keep)):
        assert_close(out.logits[b, keep[b]].detach(), ref.detach(), f"{kind}: sample {b}")


def test_a_mask_reading_another_positions_padding_is_refused():
    """'shifted' reads key k's padding flag at position k - 1, another token's: on kept tokens the
    oracle's all-ones mask has no such flag. The step ties the 2-D padding mask's length to the ids'
    (step._step), so the read is judged on the token axis (issue 20: before, the mask's own length
    symbol hid it, and only the full-length mask gathered agreed)."""
    model = ToyLM(mask="shifted").eval()
    ids, am, keep = _toy_batch()
    with pytest.raises(regate_fx.RewriteError) as err:
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)
    outside = [(o.reason, o.detail) for o in err.value.report.sparse_graph.outside]
    assert any(r is regate_fx.Reason.TOKEN_MIXING and "subset of the token axis" in d for r, d in outside), outside


def test_the_window_really_differs_from_causal():
    """Guards the negatives above: the non-causal masks change the result on this batch."""
    ids, am, keep = _toy_batch()
    causal = _toy_oracle(ToyLM(mask="causal_padding").eval(), ids, am, keep)
    for kind in ("window", "foreign", "shifted"):
        other = _toy_oracle(ToyLM(mask=kind).eval(), ids, am, keep)
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(causal, other)), kind


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),  # slow: CI time
                                  pytest.param("gpt_neox", marks=pytest.mark.slow),
                                  pytest.param("llava", marks=pytest.mark.slow)])
def test_a_call_without_attention_mask_takes_the_causal_fast_path(name):
    """No attention_mask and no position_ids (unpadded data): transformers' own mask then carries a
    packed-sequence term read from the default positions; the step passes the equivalent all-ones
    padding mask instead, so the proof applies, and the result still equals the oracle."""
    tm = BY_NAME[name]
    model = tm("sdpa")
    batch = make_batch(tm, 3, 14, seed=5, positions=False)
    keep = random_keep(batch, 0.5, seed=3)
    del batch["attention_mask"]
    calls: list = []
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout="padded"), backend=_sdpa_calls(calls))
    check_against_oracle(smodel, model, batch, keep)
    assert smodel.regate_report.sparse_graph.causal_masks == 1
    # every SDPA call gets no mask; the decoder's (2 layers, in the loss step and in the logits call
    # without labels) is causal; LLaVA's vision tower is not
    assert calls and all(mask_is_none for mask_is_none, _ in calls), calls
    assert sum(causal for _, causal in calls) == 4, calls


def test_position_ids_without_attention_mask_keep_their_packed_meaning():
    """With explicit position_ids and no attention_mask transformers reads restarts as packed
    documents (block-diagonal attention); the step must not turn that into one sequence."""
    tm = BY_NAME["llama"]
    model = tm("sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (2, 12), generator=g)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, 12)  # two documents per row
    keep = torch.ones(2, 12, dtype=torch.bool)
    smodel = regate_fx.sparsify(model, backend="eager")
    logits = smodel(input_ids=ids, position_ids=pos, keep_mask=keep).logits
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    one_sequence = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert (packed - one_sequence).abs().max() > 1e-3  # the two readings really differ here
    assert_close(logits.detach(), packed.detach(), "logits of packed rows")


class _PadCountLM(torch.nn.Module):
    """Scales its branch by the padding count `mask.shape[1] - mask.sum(-1)`: a number of the full
    length (the oracle's kept subsequence has no padding), read from a mask whose length nothing in
    the model ties to the ids'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lin, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        from transformers.modeling_outputs import CausalLMOutput

        x = self.embed(input_ids)
        pads = (attention_mask.shape[1] - attention_mask.sum(-1)).float()[:, None, None]  # (B, 1, 1)
        x = x + self.lin(x) * pads
        return CausalLMOutput(logits=self.head(x))


def test_a_number_from_the_padding_masks_length_is_judged():
    """The step ties the padding mask's (B, T) to the ids' (step._step), so `mask.sum(-1)` is a sum
    over the token axis wherever the model computes it (before, a mask with its own length symbol
    made it a per-sample constant: accepted, 2.8 off the oracle)."""
    ids, am, keep = _toy_batch()
    with pytest.raises(regate_fx.RewriteError) as err:
        regate_fx.sparsify(_PadCountLM().eval(), backend="eager")(input_ids=ids, attention_mask=am, keep_mask=keep)
    outside = [(o.reason, o.detail) for o in err.value.report.sparse_graph.outside]
    assert any(r is regate_fx.Reason.TOKEN_MIXING and "sum along the token axis" in d for r, d in outside), outside
