"""A hand-written pre-norm decoder whose MLP can be swapped for token-mixing variants.

Negative tests use it: a conv or cumsum along the sequence must not be rewritten.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput


class Attention(nn.Module):
    """form: 'sdpa', or 'sigmoid' (weights sigmoid(q k^T) * mask, no softmax: nothing normalises
    over the keys, so padding slots of the kept layout must be zeroed where weights meet values), or
    'sink' (gpt-oss's eager attention with sinks: a per-head logit joined to the scores along the
    keys, shifted by the row max, softmaxed, sliced back to the keys) and variants outside that form:
    'sink_token_column' (the joined column is computed from each query: it carries a token axis),
    'sink_unsliced' (the sink column's probability is also read), 'sink_keeps_column' (the slice
    keeps the sink column and drops key 0), 'sink_max_reused' (the row max is also added to the
    output)."""

    def __init__(self, d: int, heads: int, form: str = "sdpa"):
        super().__init__()
        self.heads, self.form = heads, form
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        if form.startswith("sink"):
            self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.form == "sigmoid":
            if mask is None:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
            w = torch.sigmoid(q @ k.transpose(-1, -2) / 4.0) * mask  # (B, H, T, T)
            y = w @ v  # (B, H, T, hd)
        elif self.form.startswith("sink"):
            y = self._sink_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


    def _sink_attention(self, q, k, v, mask):
        b, h, t, _ = q.shape
        s = q @ k.transpose(-1, -2) / 4.0  # (B, H, T, T)
        allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None] if mask is None else mask
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        col = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, t, -1)  # (B, H, T, 1)
        if self.form == "sink_token_column":
            col = (q * q).sum(-1, keepdim=True)  # (B, H, T, 1), from each query
        joined = torch.cat([s, col], dim=-1)  # (B, H, T, T + 1)
        m = joined.max(dim=-1, keepdim=True).values  # (B, H, T, 1)
        probs = torch.softmax(joined - m, dim=-1)
        w = probs[..., 1:] if self.form == "sink_keeps_column" else probs[..., :-1]  # (B, H, T, T)
        y = w @ v  # (B, H, T, hd)
        if self.form == "sink_unsliced":
            y = y * (1 - probs[..., -1:])
        elif self.form == "sink_max_reused":
            y = y + m
        return y


class MLP(nn.Module):
    """mix: None (token-wise), 'conv' (depthwise conv along the sequence), 'cumsum', 'max' (max over
    tokens), 'absmax' (scale by the max over tokens) or 'flip' (a reshape that moves tokens)."""

    def __init__(self, d: int, mix: str | None = None):
        super().__init__()
        self.mix = mix
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        if mix == "conv":
            self.conv = nn.Conv1d(2 * d, 2 * d, kernel_size=3, padding=2, groups=2 * d)
        if mix is not None and (mix.startswith("moe_sorted") or mix.startswith("tiled")):
            self.experts = nn.Parameter(torch.randn(4, 2 * d, 2 * d) / (2 * d) ** 0.5)  # (experts, in, out)

    def forward(self, x):
        h = F.gelu(self.up(x))  # (B, T, 2D)
        if self.mix == "conv":
            h = self.conv(h.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)  # causal conv over tokens
        elif self.mix == "cumsum":
            h = h.cumsum(dim=1)
        elif self.mix == "max":
            h = h + h.max(dim=1, keepdim=True).values  # (B, 1, 2D) broadcast over tokens
        elif self.mix == "absmax":
            h = h / h.abs().max(dim=1, keepdim=True).values
        elif self.mix == "blocked":  # each token copied twice in place, then summed back: token-wise
            b, t, e = h.shape
            h = h.repeat_interleave(2, dim=1).view(b, t, 2, e).sum(2) / 2  # (B, 2T, 2D) -> (B, T, 2D)
        elif self.mix == "slots":  # MoE's slots: (B*T, 2D) rows, k=2 copies each, flattened and back
            b, t, e = h.shape
            rows = h.reshape(b * t, e).repeat_interleave(2, dim=0)  # (B*T*2, 2D), token-major
            gate = torch.softmax(rows[:, :2].view(b * t, 2, 2).sum(-1), dim=-1).reshape(-1, 1)  # (B*T*2, 1)
            h = (rows * gate).view(b * t, 2, e).sum(1).view(b, t, e)  # (B*T, 2, 2D) -> (B, T, 2D)
        elif self.mix == "slots_minor":  # the same rows read slot-major: token i's slot meets token i+1's
            b, t, e = h.shape
            rows = h.reshape(b * t, e).repeat_interleave(2, dim=0)  # (B*T*2, 2D)
            h = rows.view(2, b * t, e)[0].view(b, t, e)  # (B*T, 2D) rows 0..BT-1 of the blocked axis: mixed
        elif self.mix == "router":  # each token's top-2 scores scattered into its row of 4 experts
            top = h[..., :4].topk(2, dim=-1)  # (B, T, 2)
            dense = torch.zeros_like(h[..., :4]).scatter(-1, top.indices, top.values.softmax(-1))  # (B, T, 4)
            h = h * (1 + dense @ torch.arange(4.0))[..., None]
        elif self.mix == "scatter_tokens":  # writes each row to another token's place: mixes
            idx = (torch.arange(h.shape[1]) + 1) % h.shape[1]  # (T,)
            h = torch.zeros_like(h).scatter(1, idx[None, :, None].expand_as(h), h)
        elif self.mix is not None and self.mix.startswith("moe_sorted"):
            h = self._sorted_experts(h)
        elif self.mix is not None and self.mix.startswith("tiled"):
            h = self._tiled_experts(h)
        elif self.mix == "flip":
            b, t, e = h.shape
            h = h.unflatten(1, (t // 2, 2)).flip(2).flatten(1, 2)  # (B, T/2, 2, E): swaps neighbours
        return self.down(h)


    def _tiled_experts(self, h):
        """Llama 4's expert-major tiled MoE, written out (Llama4TextMoe), 4 experts, top-2: the rows
        tiled once per expert, scaled by each token's score for that expert, a batched matmul over
        the (experts, tokens) view, summed over the experts. Variants that mix tokens: '_tokens' sums
        the tiles over the token axis, '_minor' reads the tiles token-major ((tokens, experts) rows:
        token n meets tiles of other tokens), '_factor' scales tile (e, n) by the scores laid out
        token-major (another token's score), '_flat' sums the tiled rows whole."""
        b, t, e = h.shape
        x = h.reshape(-1, e)  # (N, 2D)
        logits = x[:, :4]  # (N, 4): the router
        top = logits.topk(2, dim=1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values))
        factor = scores.reshape(-1, 1) if self.mix == "tiled_factor" else scores.transpose(0, 1).reshape(-1, 1)
        routed = x.repeat(4, 1) * factor  # (4N, 2D): row j*N + n is token n for expert j
        y = torch.bmm(F.silu(routed.view(4, -1, e)), self.experts).view(-1, e)  # (4N, 2D)
        if self.mix == "tiled_tokens":
            out = x + y.view(4, -1, e).sum(1).sum(0)  # (4, 2D): summed over the tokens
        elif self.mix == "tiled_minor":
            out = x + y.reshape(-1, 4, e).sum(1)  # rows read token-major
        elif self.mix == "tiled_flat":
            out = x + y.sum(0, keepdim=True)  # every tiled row summed
        else:
            out = x + y.reshape(4, -1, e).sum(0)  # (N, 2D): summed over the experts
        return out.view(b, t, e)

    def _sorted_experts(self, h):
        """transformers' grouped_mm MoE dispatch, written out (integrations/moe.py), 4 experts, top-2.
        Variants that break one step of the proof: '_perm' un-permutes with perm instead of its
        inverse, '_unsorted' weights rows in expert order by weights in token order, '_bins'
        counts rows into shifted groups."""
        from transformers.integrations.moe import _grouped_mm

        b, t, e = h.shape
        x = h.reshape(b * t, e)  # (N, E2)
        top = torch.softmax(x[:, :4], dim=-1).topk(2, dim=-1)  # (N, 2)
        weights, keys = top.values.reshape(-1), top.indices.reshape(-1)  # (S,) = (N*2,)
        sorted_keys, perm = torch.sort(keys)
        x_g = x[perm // 2]  # (S, E2): rows in expert order
        w_g = weights if self.mix == "moe_sorted_unsorted" else weights[perm]  # (S,)
        lo = 1 if self.mix == "moe_sorted_bins" else 0  # bins [1, 4]: expert 0's rows counted nowhere
        offs = torch.cumsum(torch.histc(sorted_keys.float(), bins=4, min=lo, max=lo + 3), dim=0, dtype=torch.int32)
        y_g = _grouped_mm(x_g, self.experts, offs=offs) * w_g[:, None]  # (S, E2)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0))
        y = y_g[perm if self.mix == "moe_sorted_perm" else inv]  # (S, E2) in (token, slot) order
        return y.view(b * t, 2, e).sum(1).view(b, t, e)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mix: str | None, attn: str = "sdpa"):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attention(d, heads, attn), MLP(d, mix)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


def build_mask(kind: str, attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """A (B, 1, T, T) bool mask built from index tensors, the way transformers' sdpa_mask does.

    kind: 'causal_padding' (provably causal on kept tokens), 'window' (also q - kv < 3), 'foreign'
    (also a key mask that is not the padding mask), 'shifted' (kv <= q + 1: not causal),
    'broadcast_key' (the padding placed as keys by slicing, `am.bool()[:, None, None, :]`: proven),
    'broadcast_query' (the padding placed as *queries*, `[:, None, :, None]`: not "key is real"),
    'chunked' (also the same chunk of 3 positions from the first real token, `(idx - left_padding) // 3`),
    'chunked_added' (the left padding added, not subtracted), 'chunked_length' (the padding counted
    by a sum of the mask: `T - am.sum(-1)`).
    """
    b = attention_mask.shape[0]
    q = torch.arange(t)[None, None, :, None]
    kv = torch.arange(t)[None, None, None, :]
    key = kv
    if kind == "shifted":
        kv = (torch.arange(t) - 1)[None, None, None, :]  # each query also sees the next key
        key = kv.clamp(min=0)
    if kind.startswith("broadcast"):
        placed = (slice(None), None, None, slice(None)) if kind == "broadcast_key" else (slice(None), None, slice(None), None)
        return (kv <= q) & attention_mask.bool()[placed]
    mask = (kv <= q) & attention_mask.to(torch.bool)[torch.arange(b)[:, None, None, None], key]
    if kind == "window":
        mask = mask & (q - kv < 3)
    elif kind.startswith("chunked"):  # chunks of 3 positions counted from the first real token (Llama 4)
        lead = (attention_mask.cumsum(-1) == torch.zeros_like(attention_mask)).sum(-1)  # (B,) left padding
        if kind == "chunked_length":  # the real length instead: a number the kept subsequence does not have
            lead = attention_mask.shape[1] - attention_mask.sum(-1)
        lead = lead[torch.arange(b)[:, None, None, None]]  # (B, 1, 1, 1)
        if kind == "chunked_added":  # the count used otherwise than `arange - count`
            mask = mask & ((kv + lead) // 3 == (q + lead) // 3)
        else:
            mask = mask & ((kv - lead) // 3 == (q - lead) // 3)
    elif kind == "foreign":
        mask = mask & (kv % 2 == 0)
    return mask


class ToyLM(nn.Module):
    """mixes: the MLP variant of each layer, e.g. [None, 'conv']; mask: None (is_causal) or a
    `build_mask` kind."""

    def __init__(self, mixes=(None, None), vocab: int = 64, d: int = 32, heads: int = 4, mask: str | None = None,
                 attn: str = "sdpa", stem: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.mask = mask
        self.embed = nn.Embedding(vocab, d)
        # stem, before the first residual add: 'conv' (a causal depthwise conv over tokens) or
        # 'gate_count' (scale by an integer cumsum of a hidden-state test: content, not structure)
        self.stem_kind = stem
        self.stem = nn.Conv1d(d, d, kernel_size=2, padding=1, groups=d) if stem == "conv" else None
        self.layers = nn.ModuleList(Block(d, heads, m, attn) for m in mixes)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        x = self.embed(input_ids)
        if self.stem is not None:
            x = self.stem(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)  # (B, T, D)
        elif self.stem_kind == "gate_count":
            x = x * (x[..., :1] > 0).long().cumsum(dim=1)  # (B, T, D)
        mask = None
        if self.mask is not None:
            am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            mask = build_mask(self.mask, am, input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, mask)
        return CausalLMOutput(logits=self.head(self.norm(x)))


class NoStreamLM(nn.Module):
    """No residual stream at all: a bag of token-wise layers."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return CausalLMOutput(logits=self.proj(torch.tanh(self.embed(input_ids))))


# --- a forward wrapper that selects what runs through Python state --------------------------------
# The pattern of the `kernels` package (transformers >= 5.25 hub kernels): a wrapper around a module's
# forward sets state outside the module (a context variable holding the selected kernel functions) for
# the length of the call, and code deeper down reads it. Here the selection changes the output, so a
# backward recomputation that saw other state than the forward would give other gradients. The state
# holds a module (not a constant), which is what dynamo refuses inside a checkpoint by default.

class _Selection:
    def __init__(self):
        self.act = None  # the activation module a wrapper selected; None outside every wrapper


SelectedState = _Selection()  # one global object, like the kernels package's context variable


class Tripled(nn.Module):
    def forward(self, x):
        return F.silu(x) * 3.0


class Selected(nn.Module):
    """An activation that runs what the enclosing wrapper selected, plain SiLU outside it."""

    def forward(self, x):
        return F.silu(x) if SelectedState.act is None else SelectedState.act(x)


def selecting(cls: type) -> type:
    """A subclass of ``cls`` whose forward selects ``self.choice`` for its length (``SelectedState``)."""
    inner = cls.forward

    def forward(self, *args, **kwargs):
        before = SelectedState.act
        SelectedState.act = self.choice
        try:
            return inner(self, *args, **kwargs)
        finally:
            SelectedState.act = before
    return type(f"Selecting{cls.__name__}", (cls,), {"forward": forward})


class SelectingBlock(nn.Module):
    """``Selected()(x)`` inside a selecting forward: the smallest module with the pattern."""

    def __init__(self):
        super().__init__()
        self.choice = Tripled()
        self.act = Selected()

    def forward(self, x):
        return self.act(x)


SelectingBlock = selecting(SelectingBlock)
