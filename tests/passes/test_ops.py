"""One test per rule of the op table (regate_fx/passes/ops.py): token-wise or refused, and why.

Each case is a tiny function of a (B, T, D) tensor captured by dynamo with a symbolic token axis;
the node under test is the last call in the graph that reads a tensor (and is not `.values`).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from regate_fx.passes.graph import TokenSymbols, node_value, op_name
from regate_fx.passes.ops import RULES, Verdict, classify
from regate_fx.report import Reason


def _verdict(fn, *shapes, op: str | None = None) -> Verdict:
    """Classify the last call node (or the last `op` node) of `fn` on random `shapes` (T symbolic)."""
    got = {}

    def backend(gm, example_inputs):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(node_value(n), torch.Tensor)]
        sym = TokenSymbols.from_value(node_value(phs[0]))
        calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                 and any(isinstance(node_value(a), torch.Tensor) for a in n.all_input_nodes)
                 and not (n.target is operator.getitem and isinstance(node_value(n.args[0]), (tuple, list)))]
        # (not `.values` of a (values, indices) pair: the op that made the pair)
        if op is not None:
            calls = [n for n in gm.graph.nodes if op_name(n) == op]
        got["v"] = classify(calls[-1], sym)
        return gm.forward

    torch._dynamo.reset()
    args = [torch.randn(*s) for s in shapes]
    for a in args:
        torch._dynamo.mark_dynamic(a, 1)  # the token axis
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return got["v"]


BTD = (2, 6, 8)


def _scores(x):
    """(B, T, 8) -> attention scores (B, 2, Tq, Tk)."""
    h = x.view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # (B, 2, T, 4)
    return h @ h.transpose(-1, -2)  # (B, 2, T, T)

def _set_hidden(x):
    """Qwen3-VL's interleaved M-RoPE: write some hidden columns in place."""
    y = x.clone()
    y[..., :4] = x[..., 4:] * 2
    return y


def _set_tokens(x):
    y = x.clone()
    y[:, 1:] = x[:, :-1]  # shifts tokens
    return y


TOKEN_WISE = {
    "pointwise": lambda x: torch.sigmoid(x) * 2,
    "operator with a scalar first": lambda x: 0.5 * x,
    "max of two tensors": lambda x: torch.max(x, x * 2),
    "where(cond, a, b)": lambda x: torch.where(x > 0, x, 0.0),
    "reshape keeps tokens whole": lambda x: x.view(x.shape[0], x.shape[1], 2, 4),
    "flatten batch and tokens": lambda x: x.reshape(-1, 8),
    "transpose": lambda x: x.transpose(1, 2),
    "view_as_complex on hidden pairs": lambda x: torch.view_as_complex(x.view(x.shape[0], x.shape[1], 4, 2)),
    "linear over hidden": lambda x: F.linear(x, torch.ones(3, 8)),
    "layer_norm over hidden": lambda x: F.layer_norm(x, (8,)),
    "reduction over hidden": lambda x: x.mean(-1),
    "max over hidden": lambda x: x.max(dim=-1).values,
    "softmax over hidden": lambda x: x.softmax(-1),
    "cat along hidden": lambda x: torch.cat([x, x], dim=-1),
    "split along hidden": lambda x: x.split(4, dim=-1)[0],
    "pad on hidden": lambda x: F.pad(x, (1, 1)),
    "repeat on batch": lambda x: x.repeat(2, 1, 1),
    "getitem of all tokens": lambda x: x[:, :, :4],
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "a table read at token-indexed positions": lambda x: torch.ones(64, 8)[(x[..., 0] > 0).long()],
    "functional activation with inplace=": lambda x: F.relu(x, inplace=False),
    "setitem of hidden columns": _set_hidden,
    "polar (complex RoPE table)": lambda x: torch.polar(torch.ones_like(x), x),
    "embedding from a parameter table": lambda x: F.embedding((x[..., 0] > 0).long(), torch.ones(4, 8)),
    "gather along hidden": lambda x: x.gather(2, torch.zeros_like(x, dtype=torch.long)),
    "index the token axis with its own arange": lambda x: x[:, torch.arange(x.shape[1])],
    "reshape heads in memory order": lambda x: x.reshape(x.shape[0], x.shape[1], 2, 4).reshape(x.shape[0], -1, 8),
    "arange over tokens (original positions)": lambda x: x + torch.arange(x.shape[1])[None, :, None],
    # issue 18: an MoE router's top-k mask (Llama 4, GLM-4-MoE), BatchNorm with running statistics
    "scatter along hidden (top-k mask)": lambda x: torch.zeros_like(x).scatter(2, x.topk(2, -1).indices, 1.0),
    "batch_norm in eval mode": lambda x: F.batch_norm(x.transpose(1, 2), torch.zeros(8), torch.ones(8)),
    # issue 20: Llama 4's chunk of a position, `(kv_idx - left_padding) // chunk` (floor_divide: no pointwise tag)
    "floor division per element": lambda x: x + (torch.arange(x.shape[1]) // 4)[None, :, None] + x // 2,
}
MIXING = {
    "max over tokens (reduction overload)": lambda x: x.max(dim=1).values,
    "min over tokens": lambda x: x.min(dim=1, keepdim=True).values,
    "sum over tokens": lambda x: x.sum(1),
    "cumsum over tokens": lambda x: x.cumsum(1),
    "sort over tokens": lambda x: x.sort(dim=1).values,
    "flip over tokens": lambda x: x.flip(1),
    "reshape splits tokens": lambda x: x.unflatten(1, (x.shape[1] // 2, 2)),
    "linear over tokens": lambda x: F.linear(x.transpose(1, 2), torch.ones(6, 6)[: x.shape[1], : x.shape[1]]),
    "layer_norm over tokens": lambda x: F.layer_norm(x.transpose(1, 2), (x.shape[1],)),
    "softmax over tokens": lambda x: x.softmax(1),
    "cat along tokens": lambda x: torch.cat([x, x], dim=1),
    "split along tokens": lambda x: x.split(2, dim=1)[0],
    "pad shifts tokens": lambda x: F.pad(x, (0, 0, 1, 0)),
    "repeat tiles tokens": lambda x: x.repeat(1, 2, 1),
    "getitem of some tokens": lambda x: x[:, 1:],
    "conv over tokens": lambda x: F.conv1d(x.transpose(1, 2), torch.ones(8, 1, 2), groups=8),
    "masked_scatter with a token-indexed source": lambda x: x.masked_scatter(x > 0, x * 2),
    "setitem of some tokens": _set_tokens,
    # issue 18
    "embedding from a token-indexed table": lambda x: F.embedding((x[..., 0] > 0).long(), x[0]),
    "gather along tokens": lambda x: x.gather(1, torch.zeros_like(x, dtype=torch.long)),
    "reshape keeps sizes, scrambles tokens": lambda x: x.reshape(x.shape[0], 8, x.shape[1]),
    "reshape swaps batch and tokens": lambda x: x.reshape(x.shape[1], x.shape[0], 8),
    "index the token axis with a shifted arange": lambda x: x[:, (torch.arange(x.shape[1]) + 1) % x.shape[1]],
    "masked_scatter numbering by a content mask": lambda x: x.masked_scatter((x[..., :1] > 0).expand_as(x),
                                                                               torch.randn(100)),
    "integer ids rolled along tokens": lambda x: (x[..., 0] > 0).long().roll(1, 1),
    "scatter along tokens": lambda x: torch.zeros_like(x).scatter(1, torch.zeros_like(x, dtype=torch.long), x),
    "scatter into the first token only": lambda x: x.scatter(2, torch.zeros(x.shape[0], 1, 8, dtype=torch.long), 1.0),
}
LENGTH = {
    "scale by 4 / T": lambda x: x * (4 / x.size(1)),
    "sum divided by T": lambda x: x.sum(-1) / x.size(1),
    "T as a fill value": lambda x: x.new_full((2,), x.size(1)),
}


@pytest.mark.parametrize("name", list(TOKEN_WISE))
def test_token_wise_rules(name):
    v = _verdict(TOKEN_WISE[name], BTD)
    assert v.token_wise, v


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_rules_refuse(name):
    v = _verdict(MIXING[name], BTD)
    assert not v.ok and v.reason in (Reason.TOKEN_MIXING, Reason.UNSUPPORTED_OP), v


@pytest.mark.parametrize("name", list(LENGTH))
def test_sequence_length_numbers_refuse(name):
    """A number derived from T in arithmetic: the kept layout's length is not each sample's."""
    v = _verdict(LENGTH[name], BTD)
    assert not v.ok and v.reason is Reason.SYMBOLIC_SIZE, v


def test_sizes_from_the_sequence_length_are_not_numbers():
    assert _verdict(lambda x: x.view(x.shape[0], x.shape[1], 2, 4) * 2, BTD).token_wise
    assert _verdict(lambda x: x.new_zeros(x.shape[0], x.shape[1]) + x[..., 0], BTD).token_wise


def test_where_with_one_argument_lists_positions():
    v = _verdict(lambda x: torch.where(x > 0)[1], BTD, op="where")
    assert not v.ok and v.reason is Reason.TOKEN_MIXING


def test_attention_pieces():
    assert _verdict(lambda x: _scores(x).softmax(-1), BTD).attention == "softmax"
    assert _verdict(lambda x: _scores(x) @ x.view(2, x.shape[1], 2, 4).transpose(1, 2), BTD).attention == "pv"
    qkv = lambda x: x.view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # noqa: E731  (B, 2, T, 4)
    assert _verdict(lambda x: F.scaled_dot_product_attention(qkv(x), qkv(x), qkv(x), is_causal=True),
                    BTD).attention == "sdpa"
    # weights whose first axis is not the batch (Bloom's (B*H, T, T)) cannot be key-masked per sample
    v = _verdict(lambda x: _scores(x).flatten(0, 1) @ x.view(2, x.shape[1], 2, 4).transpose(1, 2).flatten(0, 1), BTD)
    assert not v.ok and v.reason is Reason.ATTENTION_FORM


def _sinks(x, *, column=None, last=slice(None, -1), reuse_max=False):
    """gpt-oss's eager attention with sinks: a per-head logit joined to the scores along the keys,
    shifted by the row max, softmaxed, sliced back to the keys (passes/sinks.py)."""
    s = _scores(x)  # (B, 2, T, T)
    col = torch.ones(2).reshape(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[1], -1) if column is None else column(s)
    joined = torch.cat([s, col], dim=-1)  # (B, 2, T, T + 1)
    m = joined.max(dim=-1, keepdim=True).values
    w = torch.softmax(joined - m, dim=-1)[..., last]  # (B, 2, T, T)
    return w + m if reuse_max else w


@pytest.mark.parametrize("op", ["cat", "max", "softmax", "getitem"])
def test_attention_with_sinks(op):
    """Every node of the form is attention; the same node just outside the form is refused."""
    assert _verdict(_sinks, BTD, op=op).attention == "sink"
    outside = [
        lambda x: _sinks(x, column=lambda s: s[..., :1]),  # a joined column with a token axis (key 0)
        lambda x: _sinks(x, last=slice(1, None)),  # keeps the sink column, drops key 0
        # a constant spread along the keys too: (B, 2, T, T + 1) columns that would follow K, not T
        lambda x: _sinks(x, column=lambda s: torch.ones(2).reshape(1, -1, 1, 1).expand(*s.shape[:3], s.shape[3] + 1),
                         last=slice(None, x.shape[1])),
        lambda x: _sinks(x, reuse_max=True),  # the row max also read elsewhere
    ]
    for fn in outside:
        v = _verdict(fn, BTD, op=op)
        assert not v.ok and v.reason is Reason.TOKEN_MIXING, (op, v)


def test_cross_attention_is_token_wise_over_queries():
    """Mllama: keys and values are image tokens (no token axis); each query reads its own mask row."""
    q = lambda x: x.view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # noqa: E731  (B, 2, T, 4)
    kv = torch.randn(2, 2, 5, 4)
    assert _verdict(lambda x: F.scaled_dot_product_attention(q(x), kv, kv), BTD).attention == "cross"
    row_mask = lambda x: (x[:, None, :, :5] > 0)  # noqa: E731  (B, 1, T, 5): a row per query
    assert _verdict(lambda x: F.scaled_dot_product_attention(q(x), kv, kv, attn_mask=row_mask(x)),
                    BTD).attention == "cross"
    v = _verdict(lambda x: F.scaled_dot_product_attention(q(x), kv, kv, is_causal=True), BTD)
    assert not v.ok and v.reason is Reason.ATTENTION_FORM and "cross-attention" in v.detail


def test_masked_scatter_numbers_positions():
    """masked_scatter numbers the positions its mask selects: the op table alone refuses it (the
    analysis accepts LLaVA's form, a mask computed from the input ids alone: `analyse.Judge`,
    tests/passes/test_loopholes.py)."""
    feats = torch.randn(100, 8)
    v = _verdict(lambda x: x.masked_scatter((x[..., :1] > 0).expand_as(x), feats), BTD)
    assert not v.ok and v.reason is Reason.TOKEN_MIXING, v


def test_batch_norm_in_training_mode_couples_samples():
    v = _verdict(lambda x: F.batch_norm(x.transpose(1, 2), torch.zeros(8), torch.ones(8), training=True), BTD)
    assert not v.ok and v.reason is Reason.BATCH_MIXING, v
    v = _verdict(lambda x: F.batch_norm(x.transpose(1, 2), None, None, training=True), BTD)
    assert not v.ok and v.reason is Reason.BATCH_MIXING, v


def test_unknown_op_refuses():
    v = _verdict(lambda x: torch.fft.fft(x, dim=1).real, BTD)
    assert not v.ok and v.reason is Reason.UNSUPPORTED_OP


def test_every_rule_is_exercised():
    """The tests above reach every distinct rule of the table."""
    from regate_fx.passes import rules as r

    tested = {r.token_wise, r.reshape, r.permute, r.view_complex, r.linear, r.matmul,
              r.softmax, r.sdpa, r.norm, r.always_mixing, r.reduce, r.cat, r.split,
              r.pad, r.repeat, r.where, r.masked_scatter, r.getitem, r.tril, r.setitem,
              r.embedding, r.gather, r.scatter, r.batch_norm}
    assert set(RULES.values()) <= tested
