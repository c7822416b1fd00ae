"""Token-choice mixture of experts (issue 20, item 1): the router scores each token on its own and
the experts run on every token's k (token, slot) rows ((B*T, D) -> (B*T*k, D), a *blocked* token
axis). Both of transformers' implementations are proven per token from the graph, so router and
experts run on kept tokens only:

- `grouped_mm` (the default): rows sorted by expert, a grouped matmul, the inverse permutation
  (passes/dispatch.py);
- `batched_mm`: each row repeated in place and multiplied by its expert's weights (reshapes judged
  by memory order, `repeat_interleave` in place, `scatter` along the expert axis).

Negatives: the slots read slot-major, a scatter along the tokens, and hand-written sorted dispatches
that break one step of the proof (un-permuted by the permutation itself, weights left in token
order, groups counted from the wrong bins) are refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

import regate_fx
from regate_fx import Reason, RewriteError, SparsifyConfig
from tests.helpers import assert_close, assert_grads_close, check_against_oracle, grads, make_batch, random_keep
from tests.models import COMMON, TinyModel
from tests.toy import ToyLM

E, K = 4, 2  # experts, experts per token
MOE = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=E)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(num_experts=E, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=E)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(num_experts=E, moe_intermediate_size=32, head_dim=8)),
}


def _moe(name: str, experts: str = "grouped_mm") -> TinyModel:
    config_cls, model_cls, kw = MOE[name]

    def build(attn):
        cfg = config_cls(**{**COMMON, "num_key_value_heads": 2, "num_experts_per_tok": K, **kw})
        cfg._attn_implementation = attn
        cfg._experts_implementation = experts
        return model_cls(cfg)

    return TinyModel(name, build)


def _sparse(model, layout: str):
    return regate_fx.sparsify(model, SparsifyConfig(return_logits=True, layout=layout), backend="eager")


@pytest.mark.parametrize("name,experts,layout", [
    ("mixtral", "grouped_mm", "padded"), ("qwen2_moe", "grouped_mm", "packed"), ("olmoe", "batched_mm", "padded"),
    pytest.param("mixtral", "grouped_mm", "packed", marks=pytest.mark.slow),
    pytest.param("mixtral", "batched_mm", "packed", marks=pytest.mark.slow),
    pytest.param("olmoe", "grouped_mm", "padded", marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "grouped_mm", "packed", marks=pytest.mark.slow),
    pytest.param("qwen2_moe", "batched_mm", "padded", marks=pytest.mark.slow),
])
def test_moe_matches_oracle(name, experts, layout):
    tm = _moe(name, experts)
    model = tm()
    smodel = _sparse(model, layout)
    batch = make_batch(tm, 3, 12, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    check_against_oracle(smodel, model, batch, keep)  # kept logits, loss, every gradient
    report = smodel.regate_report
    assert report.refused == [] and report.num_rewritten == len(report.branches) == 4
    # the oracle-free probe: other ids at pruned positions move no kept logit
    out = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep).logits
    other = dict(batch, input_ids=torch.where(keep, batch["input_ids"], (batch["input_ids"] + 7) % 90 + 1))
    moved = smodel(**{k: v for k, v in other.items() if k != "labels"}, keep_mask=keep).logits
    assert_close(moved[keep], out[keep], "kept logits after changing pruned ids", atol=0, rtol=0)


class _ExpertRows(TorchDispatchMode):
    """Records the rows each expert matmul gets: the grouped matmul's (S, D) input, or the batched
    experts' bmm(W[ids] (S, F, D), x (S, D, 1)) / bmm(x (S, 1, D), W[ids] (S, D, F))."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if "grouped_mm" in name and "backward" not in name:
            self.rows.append(int(args[0].shape[0]))
        elif func is torch.ops.aten.bmm.default and 1 in (args[0].shape[1], args[1].shape[-1]):
            self.rows.append(int(args[0].shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_experts_receive_only_kept_tokens(experts):
    count = _ExpertRows()

    def counting(gm, example_inputs):  # the backend after the pass: runs the rewritten graph under the count
        def run(*args):
            with count:
                return gm.forward(*args)
        return run

    tm = _moe("mixtral", experts)
    model = tm()
    smodel = regate_fx.sparsify(model, SparsifyConfig(layout="packed"), backend=counting)
    batch = make_batch(tm, 3, 12, pad="left", seed=1)
    keep = random_keep(batch, 0.4, seed=3)
    with count:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    assert count.rows == [K * 3 * 12] * 4  # dense: 2 layers x (up, down), every (token, slot) pair
    count.rows.clear()
    smodel(**batch, keep_mask=keep)
    assert count.rows == [K * int(keep.sum())] * 4, count.rows  # sparse: only the kept tokens' slots


def _toy_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    keep = torch.rand(2, 10, generator=g) < 0.6
    keep[:, 0] = True
    return ids, keep


@pytest.mark.parametrize("mix", ["blocked", "slots", "router", "moe_sorted"])
def test_blocked_token_axis_is_token_wise(mix):
    model = ToyLM([mix, None]).eval()
    smodel = regate_fx.sparsify(model, backend="eager")
    ids, keep = _toy_batch()
    out = smodel(input_ids=ids, keep_mask=keep)
    assert smodel.regate_report.refused == []
    for b in range(2):
        pos = keep[b].nonzero().flatten()
        assert_close(out.logits[b, pos], model(ids[b:b + 1, pos]).logits[0], f"sample {b}")


@pytest.mark.parametrize("mix,needle", [
    ("slots_minor", "moves tokens"), ("scatter_tokens", "scatter"),
    ("moe_sorted_perm", "indexing"), ("moe_sorted_unsorted", "not a proven expert dispatch"),
    ("moe_sorted_bins", "not a proven expert dispatch"),
])
def test_token_moving_slots_and_broken_dispatches_are_refused(mix, needle):
    model = ToyLM([None, mix]).eval()
    ids, keep = _toy_batch()
    with pytest.raises(RewriteError) as err:
        regate_fx.sparsify(model, backend="eager")(input_ids=ids, keep_mask=keep)
    report = err.value.report
    found = [(r.reason, r.detail) for r in report.refused] + [(o.reason, o.detail) for o in report.sparse_graph.outside]
    assert any(reason is Reason.TOKEN_MIXING and needle in detail for reason, detail in found), found


# More MoE families, through `regate-fx inspect` (tiny from their configs, checked against the oracle):
# GLM-4-MoE and PhiMoE scatter the router's top-k into a row of experts; DeepSeek-V3 adds MLA.
@pytest.mark.parametrize("family", ["glm4_moe", pytest.param("phimoe", marks=pytest.mark.slow),
                                    pytest.param("deepseek_v3", marks=pytest.mark.slow),
                                    pytest.param("granitemoe", marks=pytest.mark.slow)])
def test_more_moe_families_are_exact(family):
    from regate_fx.inspect import inspect_model

    res = inspect_model(family, time_limit=300)  # transformers' default experts (grouped_mm)
    assert res.verdict == "exact-sparse", (res.verdict, res.error, res.reasons)


def _aux_model(name: str) -> tuple[torch.nn.Module, TinyModel]:
    """A tiny MoE with output_router_logits=True and routers far from uniform (a random router
    balances its experts: the aux loss would be E * k / E * 1 / E * E = k whatever the tokens)."""
    config_cls, model_cls, kw = MOE[name]
    cfg = config_cls(**{**COMMON, "num_key_value_heads": 2, "num_experts_per_tok": K, **kw,
                        "output_router_logits": True, "router_aux_loss_coef": 0.3})
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(40.0)
    return model, TinyModel(f"{name}_aux", lambda attn: model)


def _reference(model, batch: dict, keep: torch.Tensor):
    """By hand, from the keep mask: the dense model on the batch of each sample's kept subsequence,
    right-padded, with an attention mask marking the kept tokens and their original position ids.
    Returns (aux loss, cross-entropy of the kept predictions on the original next labels)."""
    b_, t = keep.shape
    counts = [int(c) for c in keep.sum(1)]
    k = max(counts)
    ids = torch.zeros(b_, k, dtype=torch.long)
    am = torch.zeros(b_, k, dtype=torch.long)
    pos = torch.zeros(b_, k, dtype=torch.long)
    target = torch.full((b_, k), -100)
    nxt = torch.cat([batch["labels"][:, 1:], torch.full((b_, 1), -100)], 1)  # the label of p + 1
    for b in range(b_):
        p = [i for i in range(t) if keep[b, i]]
        ids[b, : len(p)] = batch["input_ids"][b, p]
        am[b, : len(p)] = 1
        pos[b, : len(p)] = batch["position_ids"][b, p]
        target[b, : len(p)] = nxt[b, p]
    out = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    return out.aux_loss, ce


@pytest.mark.parametrize("name,layout", [
    ("mixtral", "padded"), pytest.param("mixtral", "packed", marks=pytest.mark.slow),  # slow: CI time
    pytest.param("qwen2_moe", "padded", marks=pytest.mark.slow), ("qwen2_moe", "packed"),
    pytest.param("olmoe", "packed", marks=pytest.mark.slow),
])
def test_router_aux_loss_over_kept_tokens(name, layout):
    """output_router_logits=True: the aux loss is over the kept tokens of the batch, equal to the dense
    model's on the padded batch of kept subsequences; the loss adds the model's coef * aux_loss; every
    gradient (routers included) equals the reference's."""
    model, tm = _aux_model(name)
    smodel = _sparse(model, layout)
    batch = make_batch(tm, 3, 12, pad="left", seed=1)
    keep = random_keep(batch, 0.5, seed=2)
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    ref_aux, ref_ce = _reference(model, batch, keep)
    coef = model.config.router_aux_loss_coef
    (ref_ce + coef * ref_aux).backward()
    g_ref = grads(model)
    assert float((ref_aux.detach() - 2.0).abs()) > 0.01, "the reference aux loss should not be the balanced value"
    assert_close(out.aux_loss.detach(), ref_aux.detach(), "aux loss", atol=1e-5, rtol=0)
    assert_close(out.loss.detach(), (ref_ce + coef * ref_aux).detach(), "loss", atol=1e-5, rtol=0)
    assert any("gate" in n for n in g_ref)
    assert_grads_close(g_sparse, g_ref)
    assert smodel.regate_report.refused == []
    # without labels: the aux loss alone
    nolab = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep)
    assert nolab.loss is None
    assert_close(nolab.aux_loss.detach(), ref_aux.detach(), "aux loss without labels", atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_router_aux_loss_keep_all_is_the_model(layout):
    """rho = 1 (every real token kept): the sparse step's loss and aux loss are the model's own."""
    model, tm = _aux_model("mixtral")
    smodel = _sparse(model, layout)
    # right padding: with left padding transformers' loss also scores the prediction made at the last
    # pad of the first real token, which no kept position makes (method.md's position semantics)
    batch = make_batch(tm, 3, 12, pad="right", seed=4)
    keep = batch["attention_mask"].bool()
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    dense = smodel(**batch, use_cache=False)  # no keep_mask: the model's own forward
    dense.loss.backward()
    assert_close(out.aux_loss.detach(), dense.aux_loss.detach(), "aux loss", atol=1e-6, rtol=0)
    assert_close(out.loss.detach(), dense.loss.detach(), "loss", atol=1e-6, rtol=0)
    assert_grads_close(g_sparse, grads(model))


def test_router_aux_loss_counting_padding_is_refused(monkeypatch):
    """A model that does not pass its attention mask to the aux loss (transformers' `histc` over every
    row of the batch, normalised by the row count): its value counts padding rows, and on the kept
    layout it would count the layout's slots. No kept-token equivalent: refused, with the reason."""
    import transformers.models.mixtral.modeling_mixtral as mm

    dense_lb = mm.load_balancing_loss_func
    monkeypatch.setattr(mm, "load_balancing_loss_func",
                        lambda gate_logits, num_experts=None, top_k=2, attention_mask=None:
                        dense_lb(gate_logits, num_experts, top_k, None))
    model, tm = _aux_model("mixtral")
    batch = make_batch(tm, 2, 10, seed=1)
    with pytest.raises(RewriteError) as err:
        _sparse(model, "padded")(**batch, keep_mask=random_keep(batch, 0.5, seed=2))
    outside = err.value.report.sparse_graph.outside
    first = outside[0]
    assert first.reason in (Reason.TOKEN_MIXING, Reason.SYMBOLIC_SIZE), outside
    assert "router auxiliary loss" in first.detail, first.detail


def test_router_aux_loss_refused_where_not_replayed():
    """The gathered execution runs the model's forward around a gathered decoder: the aux loss
    would mix kept-layout router logits with the full-length mask. Refused, not silently wrong."""
    model, tm = _aux_model("mixtral")
    smodel = regate_fx.sparsify(model, SparsifyConfig(execution="gathered"), backend="eager")
    batch = make_batch(tm, 2, 10, seed=1)
    with pytest.raises(RewriteError, match="output_router_logits"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=2))


def test_router_aux_loss_normalised_by_the_row_count_is_refused(monkeypatch):
    """Masked sums, but divided by the number of rows of the batch (padding included): a size of the
    batch used as a number, which on the kept layout would count its slots. Refused."""
    import transformers.models.mixtral.modeling_mixtral as mm

    def by_rows(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        flat = attention_mask.reshape(-1).float()
        total = 0.0
        for g in gate_logits:
            probs = (torch.softmax(g, -1) * flat[:, None]).sum(0) / g.shape[0]  # (E,) over every row
            total = total + (probs * probs).sum() * num_experts
        return total

    monkeypatch.setattr(mm, "load_balancing_loss_func", by_rows)
    model, tm = _aux_model("mixtral")
    batch = make_batch(tm, 2, 10, seed=1)
    with pytest.raises(RewriteError) as err:
        _sparse(model, "padded")(**batch, keep_mask=random_keep(batch, 0.5, seed=2))
    first = err.value.report.sparse_graph.outside[0]
    assert first.reason is Reason.SYMBOLIC_SIZE and "router auxiliary loss" in first.detail, first


def test_router_logits_reduced_over_the_batch_in_the_stream_are_refused(monkeypatch):
    """Router logits centred over the batch before the top-k (inside the decoder, in the hidden
    stream): the batch-axis rule applies there as anywhere in the stream. Refused (BATCH_MIXING)."""
    import transformers.models.mixtral.modeling_mixtral as mm

    def centred(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)  # (B*T, E)
        logits = logits - logits.mean(0, keepdim=True)  # over every token of the batch
        top, idx = torch.topk(torch.softmax(logits.float(), -1), self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", centred)
    model, tm = _aux_model("mixtral")
    batch = make_batch(tm, 2, 10, seed=1)
    with pytest.raises(RewriteError) as err:
        _sparse(model, "padded")(**batch, keep_mask=random_keep(batch, 0.5, seed=2))
    report = err.value.report
    found = [r.reason for r in report.refused] + [o.reason for o in report.sparse_graph.outside]
    assert Reason.BATCH_MIXING in found or Reason.TOKEN_MIXING in found, found


def test_router_aux_loss_with_unmasked_counts_is_refused(monkeypatch):
    """Router probabilities weighted by the mask, but the expert counts a `histc` over every row
    (padding rows included), divided by the real-token count: the one flaw is a reduction over the
    tokens of a value the padding mask does not zero. Refused (TOKEN_MIXING), naming it."""
    import transformers.models.mixtral.modeling_mixtral as mm

    def unmasked_counts(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        flat = attention_mask.reshape(-1).float()
        rows = flat.sum()
        total = 0.0
        for g in gate_logits:
            probs = torch.softmax(g, -1)
            ids = torch.topk(probs, top_k, dim=-1).indices  # (B*T, k)
            counts = torch.histc(ids.reshape(-1).float(), bins=num_experts, min=0, max=num_experts)  # every row
            total = total + ((counts / rows) * ((probs * flat[:, None]).sum(0) / rows)).sum() * num_experts
        return total

    monkeypatch.setattr(mm, "load_balancing_loss_func", unmasked_counts)
    model, tm = _aux_model("mixtral")
    batch = make_batch(tm, 2, 10, seed=1)
    with pytest.raises(RewriteError) as err:
        _sparse(model, "padded")(**batch, keep_mask=random_keep(batch, 0.5, seed=2))
    first = err.value.report.sparse_graph.outside[0]
    assert first.reason is Reason.TOKEN_MIXING and "histc" in first.detail and "padding mask" in first.detail, first
