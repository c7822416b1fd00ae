"""The packed kept layout (SparsifyConfig.layout): kernels, the layout builder, exactness against
the oracle on every packable family, the choice `"auto"` makes, and the graphs it must refuse."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regate_fx
from regate_fx.passes.kernels import _padded_attention, pack_tokens, packed_attention, unpack_tokens, varlen_sdpa_cpu
from regate_fx.sparse import packed_layout, sparse_forward
from tests.helpers import IMAGE_TOKENS, check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def keep_masks(draw, max_b: int = 5, max_t: int = 12):
    b = draw(st.integers(2, max_b))
    t = draw(st.integers(2, max_t))
    rows = [draw(st.lists(st.booleans(), min_size=t, max_size=t).filter(any)) for _ in range(b)]
    return torch.tensor(rows)


# --- the layout and the kernels, against loops over samples -------------------------------------

@SETTINGS
@given(keep=keep_masks())
def test_packed_layout_indices(keep):
    b, t = keep.shape
    lay = packed_layout(keep)
    counts = keep.sum(1).tolist()
    k = max(max(counts), 2)
    expected_flat = [s * t + p for s in range(b) for p in range(t) if keep[s, p]]
    assert lay.flat_idx.tolist() == expected_flat
    assert lay.cu_seqlens.dtype == torch.int32
    assert lay.cu_seqlens.tolist() == [sum(counts[:i]) for i in range(b + 1)]
    assert tuple(lay.pad_idx.shape) == (b, k)
    start = 0
    for s, c in enumerate(counts):  # real slots, then the sample's last token repeated
        assert lay.pad_idx[s].tolist() == [start + min(j, c - 1) for j in range(k)]
        start += c
    # pack_idx inverts pad_idx on the real slots
    assert lay.pad_idx.flatten()[lay.pack_idx].tolist() == list(range(len(expected_flat)))


def _attention_per_sample(q, k, v, keep):
    """Causal softmax attention of each sample's kept tokens, one sample at a time (no SDPA)."""
    outs = []
    for s in range(keep.size(0)):
        n = int(keep[s].sum())
        rows = slice(int(keep[:s].sum()), int(keep[:s].sum()) + n)
        qs, ks, vs = (x[0][:, rows] for x in (q, k, v))  # (H, n, d)
        if ks.size(0) != qs.size(0):
            ks, vs = (x.repeat_interleave(qs.size(0) // x.size(0), 0) for x in (ks, vs))
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(qs.size(-1))
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ vs)
    return torch.cat(outs, 1).unsqueeze(0)  # (1, H, N, d)


def _packed_qkv(keep: torch.Tensor, gqa: bool, dtype=torch.float32, requires_grad: bool = False):
    """Random packed q (1, 4, N, 8) and k, v (1, 2|4, N, 8) for the kept tokens of `keep`."""
    n = int(keep.sum())
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, h, n, 8, generator=g, dtype=dtype, requires_grad=requires_grad)
                 for h in (4, 2 if gqa else 4, 2 if gqa else 4))


@SETTINGS
@given(keep=keep_masks(), gqa=st.booleans(), path=st.sampled_from(["device", "padded_view"]))
def test_packed_attention_is_per_sample_causal_attention(keep, gqa, path):
    """The kernel this device picks (on the CPU the varlen op), and the padded-view fallback that
    CUDA in fp32 uses, against a per-sample loop."""
    lay = packed_layout(keep)
    q, k, v = _packed_qkv(keep, gqa)
    if path == "device":
        got = packed_attention(q, k, v, lay.pad_idx, lay.pack_idx, lay.cu_seqlens, enable_gqa=gqa)
    else:
        got = _padded_attention(q, k, v, lay.pad_idx, lay.pack_idx, None, gqa)
    torch.testing.assert_close(got, _attention_per_sample(q, k, v, keep), atol=1e-5, rtol=1e-5)


def _flash_attn_stub(calls: list):
    """A stand-in for flash-attn 2's `flash_attn_varlen_func`, with its signature and documented
    contract (q (total, H, d), k and v (total, H_k, d) with H_k dividing H, int32 cu_seqlens of
    B + 1 offsets, max_seqlen >= every length), computed by per-sample loops. flash-attn needs
    CUDA to build, so this checks the call regate_fx makes, not the kernel."""
    import types

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        assert q.dim() == k.dim() == v.dim() == 3 and q.size(1) % k.size(1) == 0, (q.shape, k.shape)
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        assert max_seqlen_q >= max(lengths) and max_seqlen_k >= max(lengths)
        assert cu_seqlens_q[-1] == q.size(0) == k.size(0)
        calls.append({"causal": causal, "scale": softmax_scale, "dropout": dropout_p})
        scale = softmax_scale if softmax_scale is not None else q.size(-1) ** -0.5
        kk, vv = (x.repeat_interleave(q.size(1) // x.size(1), 1) for x in (k, v))  # (total, H, d)
        out = []
        for s, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            scores = torch.einsum("qhd,khd->hqk", q[s:e], kk[s:e]) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv[s:e]))
        return torch.cat(out)  # (total, H, d)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


@SETTINGS
@given(keep=keep_masks(), gqa=st.booleans())
def test_the_flash_attn_call_is_per_sample_causal_attention(keep, gqa):
    # The CUDA half-precision path hands flash-attn's varlen kernel the packed (N, H, d) tokens,
    # int32 cu_seqlens, K as the maximum length and causal=True: checked against flash-attn's
    # documented contract on a stand-in (the real kernel runs only where flash-attn is installed:
    # tests/test_cuda.py).
    import sys
    from unittest import mock

    from regate_fx.passes import kernels

    calls = []
    lay = packed_layout(keep)
    q, k, v = _packed_qkv(keep, gqa)
    with mock.patch.dict(sys.modules, {"flash_attn": _flash_attn_stub(calls)}):
        got = kernels._flash_attn_varlen(q, k, v, lay.cu_seqlens, lay.pad_idx.size(1), None, gqa)
    assert calls == [{"causal": True, "scale": None, "dropout": 0.0}]
    torch.testing.assert_close(got, _attention_per_sample(q, k, v, keep), atol=1e-5, rtol=1e-5)


def test_packed_attention_with_another_value_head_size():
    """v's head size differs from q's and k's (MLA-style attention): the flash kernels refuse it,
    SDPA on the padded view computes it."""
    keep = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lay = packed_layout(keep)
    q, k, _ = _packed_qkv(keep, False)
    v = torch.randn(1, 4, q.size(2), 6)  # head size 6, q and k 8
    got = packed_attention(q, k, v, lay.pad_idx, lay.pack_idx, lay.cu_seqlens)
    torch.testing.assert_close(got, _attention_per_sample(q, k, v, keep), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(keep=keep_masks(), gqa=st.booleans())
def test_cpu_varlen_attention_gradients(keep, gqa):
    """The CPU varlen op's backward (its own custom op) against autograd through per-sample loops."""
    lay = packed_layout(keep)
    q, k, v = _packed_qkv(keep, gqa, torch.float64, requires_grad=True)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(packed_attention(q, k, v, lay.pad_idx, lay.pack_idx, lay.cu_seqlens), (q, k, v), grad)
    want = torch.autograd.grad(_attention_per_sample(q, k, v, keep), (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_cpu_varlen_attention_op_registration():
    """Fake kernel, autograd registration and schema of the custom op agree (torch's own checker)."""
    keep = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    q, k, v = _packed_qkv(keep, True, torch.float64, requires_grad=True)
    torch.library.opcheck(varlen_sdpa_cpu, (q, k, v, packed_layout(keep).cu_seqlens, 0.5))


@SETTINGS
@given(keep=keep_masks(), shared=st.booleans())
def test_pack_unpack(keep, shared):
    b, t = keep.shape
    lay = packed_layout(keep)
    x = torch.randn(1 if shared else b, 3, t, 2)  # a (B|1, H, T, d) side input, token axis 2
    got = pack_tokens(x, lay.flat_idx, dim=2)  # (1, 3, N, 2)
    rows = [x[0 if shared else s][:, p] for s in range(b) for p in range(t) if keep[s, p]]
    torch.testing.assert_close(got[0], torch.stack(rows, 1))
    base = torch.randn(b, t, 5)
    kept = torch.randn(1, int(keep.sum()), 5)
    out = unpack_tokens(base, kept, lay.flat_idx)
    torch.testing.assert_close(out[~keep], base[~keep])  # pruned rows carried unchanged
    torch.testing.assert_close(out[keep], kept[0])  # kept rows, in order


# --- whole models: exact against the oracle ------------------------------------------------------

# Every family whose attention is causal SDPA on the kept tokens (eager attention, sliding windows
# and GPT-2's own mask stay padded: test_auto_falls_back_to_padded). One of each structure by
# default (GQA + RoPE, head_dim != hidden / heads, partial rotary, parallel residual, flattened
# stream + learned positions, post-norm, the MLLM); the rest under the slow mark.
_SLOW = pytest.mark.slow
PACKABLE = ["llama", "gpt_neox", "opt", "bert_decoder", "llava",
            *(pytest.param(n, marks=_SLOW) for n in ("qwen3", "phi", "qwen2", "mistral", "gemma", "falcon", "gpt_j",
                                                     "cohere"))]


def _packed(name: str, layout: str = "packed", attn: str = "sdpa", backend: str = "eager"):
    tm = BY_NAME[name]
    model = tm(attn)
    return tm, model, regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout=layout, progress=False),
                                         backend=backend)


@pytest.mark.parametrize("name", PACKABLE)
def test_packed_is_exact(name):
    """Logits, loss and every gradient equal the oracle's, with left and right padding (one graph)."""
    tm, model, smodel = _packed(name)
    for pad, seed in (("right", 1), ("left", 2)):
        batch = make_batch(tm, 3, 16, pad=pad, seed=seed)
        check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=seed))
    g = smodel.regate_report.sparse_graph
    assert g.layout == "packed" and g.exact and g.tail_on_kept
    assert "kept layout: packed" in str(smodel.regate_report)


@pytest.mark.slow
@pytest.mark.inductor
def test_packed_inductor_is_exact():
    """The packed graph through AOTAutograd and inductor: exact (loss, logits, every gradient)."""
    tm, model, smodel = _packed("llama", backend="inductor")
    for seed in (1, 2):
        batch = make_batch(tm, 3, 16, pad="right", seed=seed)
        check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=seed))
    assert {g.layout for g in smodel.regate_report.graphs if g.sparse} == {"packed"}


@pytest.fixture(scope="module", params=["llama", "llava"])
def packed_case(request):
    return _packed(request.param)


@SETTINGS
@given(data=st.data())
def test_packed_property(packed_case, data):
    """Any batch size, length, padding side and keep mask: exact, on one compiled graph."""
    tm, model, smodel = packed_case
    low = IMAGE_TOKENS + 1 if tm.multimodal else 2
    b = data.draw(st.integers(2, 4))
    t = data.draw(st.integers(max(4, low), 20))
    pad = data.draw(st.sampled_from(["none", "left", "right"]))
    lengths = [data.draw(st.integers(low, t)) for _ in range(b)] if pad != "none" else None
    batch = make_batch(tm, b, t, pad=pad, lengths=lengths, seed=data.draw(st.integers(0, 2**16)))
    keep = random_keep(batch, data.draw(st.floats(0.05, 1.0)), seed=data.draw(st.integers(0, 2**16)))
    check_against_oracle(smodel, model, batch, keep)
    assert smodel.regate_report.sparse_graph.layout == "packed"


# --- what "auto" picks ----------------------------------------------------------------------------

def test_auto_packs_uneven_steps_only():
    tm, model, smodel = _packed("llama", layout="auto")
    batch = make_batch(tm, 2, 16, seed=3)
    even = torch.zeros(2, 16, dtype=torch.bool)
    even[:, ::2] = True  # equal kept counts: no padding slot in (B, K)
    check_against_oracle(smodel, model, batch, even)
    assert smodel.regate_report.sparse_graph.layout == "padded"
    uneven = even.clone()
    uneven[1, 4:] = False  # 8 and 2 kept: 37.5% of the (B, K) slots would be padding
    check_against_oracle(smodel, model, batch, uneven)
    assert smodel.regate_report.sparse_graph.layout == "packed"
    one = make_batch(tm, 1, 16, seed=4)  # a single sample never pads: padded
    check_against_oracle(smodel, model, one, random_keep(one, 0.5))
    assert smodel.regate_report.sparse_graph.layout == "padded"


def test_min_waste_threshold():
    """The step's choice (test_auto_packs_uneven_steps_only runs both layouts): packed from
    `packed_min_waste` of the (B, K) slots on."""
    smodel = regate_fx.sparsify(BY_NAME["llama"]("sdpa"), regate_fx.SparsifyConfig(packed_min_waste=0.25),
                                backend="eager")
    fwd = sparse_forward(smodel)

    def wants_packed(keep):
        return fwd._layout(keep).name == "packed"

    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, :8] = True
    keep[1, :6] = True
    assert not wants_packed(keep)  # 2 of 16 slots: 12.5% < 25%
    keep[1, 4:6] = False
    assert wants_packed(keep)  # 4 of 16 slots: 25%
    assert not wants_packed(keep[:1])  # one sample never pads


# --- graphs that must not be packed ---------------------------------------------------------------

@pytest.mark.parametrize("name,attn,why", [
    ("llama", "eager", "is not SDPA"),  # softmax attention over the packed row would mix samples
    ("gpt2", "sdpa", "not causal on the kept tokens"),  # a mask masks.py cannot prove causal
])
def test_auto_falls_back_to_padded(name, attn, why):
    tm, model, smodel = _packed(name, layout="auto", attn=attn)
    batch = make_batch(tm, 3, 16, pad="right", seed=5)
    keep = random_keep(batch, 0.4, seed=5)
    check_against_oracle(smodel, model, batch, keep)
    report = smodel.regate_report
    assert report.sparse_graph.layout == "padded" and why in report.packed_refused
    assert "packed layout not possible" in str(report)


def test_sliding_window_is_not_packed():
    tm = BY_NAME["mistral"]
    cfg_model = tm("sdpa")
    cfg_model.config.sliding_window = 4
    model = type(cfg_model)(cfg_model.config)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout="packed", progress=False), backend="eager")
    batch = make_batch(tm, 2, 12, pad="right", seed=6)
    with pytest.raises(regate_fx.RewriteError, match="layout='padded'"):
        smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=6))


def test_layout_config_is_validated():
    with pytest.raises(ValueError, match="layout must be one of"):
        regate_fx.SparsifyConfig(layout="varlen")
    with pytest.raises(ValueError, match="packed_min_waste"):
        regate_fx.SparsifyConfig(packed_min_waste=1.5)
