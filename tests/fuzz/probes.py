"""Probes: small modules that either mix positions in a way the token-flow proof must see (issue 18's
loopholes) or are token-wise controls that must stay exact.

Each probe maps the hidden states ``x`` (B, T, C) of a decoder to (B, T, C), reading the call's
``ctx`` (``ids``, ``pos``, ``am``: input ids, position ids, attention mask, all (B, T)). A probe sits
in the stem (after the embedding, before the first residual add) or in a branch (on an MLP's
hidden activations). :data:`KINDS` lists them by loophole kind:

1. ``structural``: integer/boolean functions of ids, positions or the mask that mix positions;
2. ``inplace``: writes into a buffer that move tokens (setitem, copy_, index_put_);
3. ``table``: an embedding whose table is token-indexed content;
4. ``reshape``: a reshape that keeps the token axis' size but not its memory order;
5. ``length``: the sequence length as a number in floating-point arithmetic;
6. ``content_mask``: masked_scatter / masked_fill whose mask depends on content across positions;
7. ``batch``: reductions or numbering over the batch axis (no per-sample result exists: refused);

and ``control``: token-wise uses of the same constructs (position embeddings, RMSNorm, gating and
masked_fill by ids, a per-token norm mask, a memory-order-preserving reshape): never refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from regate_fx import Reason

__all__ = ["KINDS", "CATEGORY", "EXPECTED", "Probe", "expected", "make_probe"]

VOCAB = 64
T_MAX = 16


class Probe(nn.Module):
    """One probe; `kind` selects the computation (see :data:`KINDS`)."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.randn(width) * 0.3)
        if kind in ("bigram", "pos_delta", "pos_embed", "id_table_lookup", "id_cumsum", "pos_from_first"):
            self.table = nn.Embedding(VOCAB, width)
        if kind in ("content_scatter", "batch_scatter"):
            self.src = nn.Parameter(torch.randn(4 * T_MAX * width))

    def forward(self, x, ctx):  # noqa: C901 - one branch per kind
        ids, pos, am = ctx["ids"], ctx["pos"], ctx["am"]
        b, t, c = x.shape
        k = self.kind
        # 1. integer / boolean functions of ids, positions, the mask that mix positions
        if k == "bigram":  # hash of (previous id, id)
            return x + self.table((ids * 31 + ids.roll(1, 1)) % VOCAB)
        if k == "pos_delta":  # distance to the previous position
            return x + self.table((pos - pos.roll(1, 1)).clamp(0, VOCAB - 1))
        if k == "pos_frac":  # relative position in the sequence
            return x + (pos / pos.amax(1, keepdim=True).clamp(min=1))[..., None].to(x.dtype) * self.w
        if k == "mask_len":  # 8 / number of real tokens
            return x * (8 / am.sum(-1))[:, None, None].to(x.dtype)
        if k == "prev_is_pad":  # a boolean shifted along the tokens
            return x * F.pad(am, (1, -1), value=1)[..., None].to(x.dtype)
        if k == "id_cumsum":  # a running hash of the ids
            return x + self.table(ids.cumsum(1) % VOCAB)
        if k == "pos_from_first":  # position relative to the sequence's first token
            return x + self.table((pos - pos[:, :1]).clamp(0, VOCAB - 1))
        # 2. in-place writes that move tokens
        if k == "setitem_shift":
            buf = torch.zeros_like(x)
            buf[:, 1:] = x[:, :-1]
            return x + buf
        if k == "copy_shift":
            buf = torch.zeros_like(x)
            buf[:, 1:].copy_(x[:, :-1])
            return x + buf
        if k == "index_put_shift":
            buf = torch.zeros_like(x)
            rows = torch.arange(b, device=x.device)[:, None]
            cols = (torch.arange(t, device=x.device) + 1).clamp(max=t - 1)[None]
            buf.index_put_((rows.expand(b, t), cols.expand(b, t)), x, accumulate=True)
            return x + buf
        if k == "setitem_last":  # writes the last position of the full length
            buf = x.clone()
            buf[:, -1] = 0.0
            return buf
        if k == "iadd_shift":  # accumulates the previous token in place
            buf = x.clone()
            buf[:, 1:] += x[:, :-1]
            return buf
        if k == "index_copy_roll":  # token t written to slot t - 1 (mod T)
            buf = torch.zeros_like(x)
            return x + buf.index_copy_(1, torch.arange(t, device=x.device).roll(1), x)
        # 3. a table indexed by tokens whose rows are token-indexed content
        if k == "hidden_table":
            return x + F.embedding(ids % 2, x[0])  # rows 0 and 1 of sample 0's tokens
        if k == "flat_table":
            return x + F.embedding(torch.zeros_like(ids), x.flatten(0, 1))
        if k == "gather_tokens":  # each token reads token 0 or 1 of its own sample
            return x + x.gather(1, (ids % 2)[..., None].expand_as(x))
        if k == "index_tokens":  # advanced indexing of the token axis by ids
            return x + x[torch.arange(b, device=x.device)[:, None], ids % 2]
        # 4. reshapes that keep the sizes and not the memory order
        if k == "reshape_scramble":
            return x.reshape(b, c, t).transpose(1, 2)
        if k == "reshape_tb":
            return x.reshape(t, b, c).transpose(0, 1)
        if k == "transpose_view":  # (B, C, T) in memory read back as (B, T, C)
            return x.transpose(1, 2).contiguous().view(b, t, c)
        if k == "unflatten_swap":
            return x.flatten(1).unflatten(1, (c, t)).transpose(1, 2)
        # 5. the sequence length as a number
        if k == "len_scale":
            return x * (4 / x.size(1))
        if k == "len_mean":
            return x + (x.sum(-1, keepdim=True) / x.size(1))
        if k == "len_sqrt":
            return x / math.sqrt(x.size(1))
        if k == "len_frac":  # index / length: the relative place in the sequence
            return x + (torch.arange(t, device=x.device) / t)[None, :, None].to(x.dtype) * self.w
        # 6. masks that depend on content across positions
        if k == "content_scatter":  # numbered by the previous positions whose feature is positive
            mask = (x[..., :1] > 0).expand_as(x)
            return x.masked_scatter(mask, self.src)  # (4 * T_MAX * C,): enough for any mask
        if k == "content_fill":  # above-average tokens zeroed
            n = x.norm(dim=-1, keepdim=True)
            return x.masked_fill(n > n.mean(1, keepdim=True), 0.0)
        if k == "content_count":  # gate by the count of earlier positive tokens
            return x * (x[..., :1] > 0).cumsum(1).to(x.dtype)
        if k == "content_where":  # tokens above the sequence's mean kept
            return torch.where(x > x.mean(1, keepdim=True), x, torch.zeros_like(x))
        # 7. over the batch axis
        if k == "batch_mean":
            return x - x.mean(0, keepdim=True)
        if k == "batch_norm":  # hand-written batch norm over samples
            return (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()
        if k == "batch_scatter":  # numbered over every real token of the batch
            mask = am.bool()[..., None].expand_as(x)
            return x.masked_scatter(mask, self.src)  # (4 * T_MAX * C,): enough for any mask
        if k == "batch_max":
            return x + x.amax(0)
        if k == "batch_roll":  # each sample reads the previous one
            return x + x.roll(1, 0)
        if k == "batch_fold":  # every sample's tokens as one sequence, then a running mean over it
            flat = x.reshape(1, b * t, c)
            return (flat.cumsum(1) / 8.0).reshape(b, t, c)
        # controls: token-wise, must stay exact
        if k == "pos_embed":
            return x + self.table(pos.clamp(0, VOCAB - 1))
        if k == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        if k == "id_gate":
            return x * (ids % 2 == 0)[..., None].to(x.dtype)
        if k == "id_fill":
            return x.masked_fill((ids % 3 == 0)[..., None], 0.0)
        if k == "norm_fill":  # a per-token content mask
            return x.masked_fill(x.norm(dim=-1, keepdim=True) > 2.0, 0.0)
        if k == "id_table_lookup":
            return x + self.table(ids)
        if k == "heads_reshape":  # (B, T, H, C/H) and back: memory order kept
            return x.reshape(b, t, 2, c // 2).flip(-1).reshape(b, t, c) * self.w
        if k == "mask_gate":  # the mask itself, per token
            return x * am[..., None].to(x.dtype)
        if k == "token_inplace":  # in-place writes within each token
            buf = x.clone()
            buf[..., :1] = 0.0
            buf[..., 1:] *= 2.0
            return buf
        if k == "heads_transpose":  # (B, T, 2, C/2) transposed within each token
            return x.reshape(b, t, 2, c // 2).transpose(2, 3).reshape(b, t, c)
        if k == "pos_sin":  # a float function of the position id
            return x + torch.sin(pos[..., None].to(x.dtype) * self.w)
        raise ValueError(k)


KINDS: dict[str, tuple[str, ...]] = {
    "structural": ("bigram", "pos_delta", "pos_frac", "mask_len", "prev_is_pad", "id_cumsum", "pos_from_first"),
    "inplace": ("setitem_shift", "copy_shift", "index_put_shift", "setitem_last", "iadd_shift", "index_copy_roll"),
    "table": ("hidden_table", "flat_table", "gather_tokens", "index_tokens"),
    "reshape": ("reshape_scramble", "reshape_tb", "transpose_view", "unflatten_swap"),
    "length": ("len_scale", "len_mean", "len_sqrt", "len_frac"),
    "content_mask": ("content_scatter", "content_fill", "content_count", "content_where"),
    "batch": ("batch_mean", "batch_norm", "batch_scatter", "batch_max", "batch_roll", "batch_fold"),
    "control": ("pos_embed", "rms", "id_gate", "id_fill", "norm_fill", "id_table_lookup", "heads_reshape",
                "mask_gate", "token_inplace", "heads_transpose", "pos_sin"),
}
"""Probe kinds by loophole kind (``control``: token-wise, never refused)."""

CATEGORY = {k: cat for cat, ks in KINDS.items() for k in ks}

EXPECTED: dict[str, set[Reason]] = {
    "structural": {Reason.TOKEN_MIXING},
    "inplace": {Reason.TOKEN_MIXING, Reason.UNSUPPORTED_OP},
    "table": {Reason.TOKEN_MIXING, Reason.BATCH_MIXING},  # the rows read may be another sample's
    "reshape": {Reason.TOKEN_MIXING, Reason.NO_STREAM},  # a stem that scrambles tokens leaves no (B, T, D) stream
    "length": {Reason.SYMBOLIC_SIZE},
    "content_mask": {Reason.TOKEN_MIXING},
    "batch": {Reason.BATCH_MIXING},
}
"""The reasons a refusal of each kind may give."""
EXPECTED_KIND: dict[str, set[Reason]] = {
    "batch_fold": {Reason.TOKEN_MIXING, Reason.BATCH_MIXING},  # the folded axis is both
}


def expected(kind: str) -> set[Reason]:
    """The reasons a refusal of probe `kind` may give."""
    return EXPECTED_KIND.get(kind, EXPECTED.get(CATEGORY[kind], set()))


def make_probe(kind: str, width: int) -> Probe:
    return Probe(kind, width)
