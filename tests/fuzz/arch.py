"""Random decoder-only LMs in plain torch, for fuzzing the ReGATE pass (issue 6: exact or refused).

An :class:`ArchSpec` says how to build one model: where the norms sit, how the attention and MLP
branches join the residual stream, the attention form (SDPA, eager, soft-capped, sigmoid), GQA,
positions, a sliding window, the MLP, and optional token mixers (ops that mix positions along the
token axis, which the pass must refuse). :func:`arch_specs` draws specs with hypothesis and
:class:`FuzzLM` builds them. The forward takes Hugging Face-style keywords (``input_ids``,
``attention_mask``, ``position_ids``, ``use_cache``) and returns a ``CausalLMOutput``.

Position convention: causality is decided by token index, the sliding window by ``position_ids``.
Run on a kept subsequence with its original position ids (the oracle), the model therefore sees
exactly the window the full-length model sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from transformers.modeling_outputs import CausalLMOutput

from tests.fuzz.probes import Probe

__all__ = ["MIXERS", "T_MAX", "VOCAB", "ArchSpec", "FuzzLM", "Mixer", "arch_specs"]

VOCAB = 64
T_MAX = 16  # longest sequence a model accepts (learned positions, token-axis linear)
SOFTCAP = 5.0

MIXERS = ("conv", "cumsum", "shift", "max", "absmax", "min", "mean", "token_linear", "flip_pairs")
"""Token mixers: each one mixes positions along the token axis, so a branch containing it (or a
stem before the stream) cannot run on kept tokens alone."""


@dataclass(frozen=True)
class Mixer:
    """A token mixer and where it sits.

    Attributes:
        kind: one of :data:`MIXERS`.
        where: ``"stem"`` (after the embedding, before the first residual add), ``"attn"`` (on the
            attention branch's input) or ``"mlp"`` (on the MLP's hidden activations).
        layer: the decoder layer, for ``"attn"`` / ``"mlp"``.
    """

    kind: str
    where: str
    layer: int = 0

    def __repr__(self) -> str:
        return f"Mixer({self.kind!r}, {self.where!r}, {self.layer})"


@dataclass(frozen=True)
class ArchSpec:
    """One random decoder architecture. The repr lists the fields that differ from the defaults.

    Attributes:
        layers: number of decoder layers (1-3).
        heads: attention heads; ``head_dim``: size of each; hidden = heads * head_dim.
        kv_heads: key/value heads (GQA / MQA when fewer than ``heads``).
        gqa: how kv heads are repeated: ``"repeat_interleave"`` or ``"expand"`` (expand + reshape).
        norm_place: ``"pre"`` (h + f(n(h))), ``"post"`` (n(h + f(h))), ``"sandwich"`` (h + n2(f(n1(h)))).
        norm_type: ``"layer"`` (nn.LayerNorm) or ``"rms"`` (hand-written RMS norm).
        block: ``"serial"`` (attn then MLP), ``"parallel"`` (h + (attn + mlp)) or ``"cohere"``
            ((h + attn) + mlp, both read the same normed input).
        attn: ``"sdpa"``, ``"eager"`` (matmul, softmax, matmul), ``"softcap"`` (eager with
            tanh(s / c) * c, Gemma2) or ``"sigmoid"`` (sigmoid(s) * mask, no softmax).
        mask: ``"bool"`` or ``"additive"`` (B, 1, T, T) mask built from index tensors, or
            ``"is_causal"`` (SDPA only, no window; the model then ignores ``attention_mask``, so
            batches for it have no padding).
        pos: ``"rope"`` (from position_ids), ``"learned"`` (absolute embedding) or ``"none"``.
        window: sliding window in original positions (q - k < window), or None.
        mlp: ``"plain"`` (Linear-GELU-Linear) or ``"gated"`` (SiLU(gate) * up).
        mixers: token mixers (see :class:`Mixer`).
        probes: issue 18's probes (:mod:`tests.fuzz.probes`; ``Mixer.kind`` is a probe kind, ``where``
            ``"stem"`` or ``"mlp"``): loopholes in the token-flow proof and token-wise controls.
        tied: LM head tied to the embedding.
        seed: weight initialisation seed.
    """

    layers: int = 2
    heads: int = 4
    head_dim: int = 8
    kv_heads: int = 4
    gqa: str = "repeat_interleave"
    norm_place: str = "pre"
    norm_type: str = "layer"
    block: str = "serial"
    attn: str = "sdpa"
    mask: str = "bool"
    pos: str = "rope"
    window: int | None = None
    mlp: str = "plain"
    mixers: tuple[Mixer, ...] = ()
    probes: tuple[Mixer, ...] = ()
    tied: bool = False
    seed: int = 0

    def __post_init__(self):
        assert self.heads % self.kv_heads == 0, "kv_heads must divide heads"
        assert self.mask != "is_causal" or (self.attn == "sdpa" and self.window is None)
        assert all(m.where == "stem" or m.layer < self.layers for m in self.mixers + self.probes)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def even_seq(self) -> bool:
        """True when the model needs an even sequence length (the flip_pairs mixer)."""
        return any(m.kind == "flip_pairs" for m in self.mixers)

    @property
    def pads(self) -> bool:
        """False when the model ignores ``attention_mask`` (batches for it must not be padded)."""
        return self.mask != "is_causal"

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return f"ArchSpec({', '.join(changed)})"

    def _repr_pretty_(self, p, cycle):  # hypothesis' printer: the short repr, not every field
        p.text(repr(self))


@st.composite
def arch_specs(draw, mixers: bool = True) -> ArchSpec:
    """Hypothesis strategy for :class:`ArchSpec` (hidden 16-32, heads 2-4, 1-3 layers).

    Args:
        mixers: allow token mixers (about half the specs get one or two).
    """
    heads = draw(st.integers(2, 4))
    head_dim = draw(st.sampled_from([d for d in (4, 6, 8) if 16 <= heads * d <= 32]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 3, 4) if heads % k == 0]))
    layers = draw(st.integers(1, 3))
    attn = draw(st.sampled_from(["sdpa", "eager", "softcap", "sigmoid"]))
    window = draw(st.one_of(st.none(), st.integers(1, 6)))
    masks = ["bool", "additive"] + (["is_causal"] if attn == "sdpa" and window is None else [])
    mix: tuple[Mixer, ...] = ()
    if mixers and draw(st.booleans()):
        wheres = st.sampled_from(["stem", "attn", "mlp"])
        mix = tuple(Mixer(draw(st.sampled_from(MIXERS)), w, 0 if w == "stem" else draw(st.integers(0, layers - 1)))
                    for w in draw(st.lists(wheres, min_size=1, max_size=2)))
    return ArchSpec(
        layers=layers, heads=heads, head_dim=head_dim, kv_heads=kv_heads,
        gqa=draw(st.sampled_from(["repeat_interleave", "expand"])),
        norm_place=draw(st.sampled_from(["pre", "post", "sandwich"])),
        norm_type=draw(st.sampled_from(["layer", "rms"])),
        block=draw(st.sampled_from(["serial", "parallel", "cohere"])),
        attn=attn, mask=draw(st.sampled_from(masks)),
        pos=draw(st.sampled_from(["rope", "learned", "none"])),
        window=window, mlp=draw(st.sampled_from(["plain", "gated"])), mixers=mix,
        tied=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


# --- modules ------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(spec: ArchSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden) if spec.norm_type == "layer" else RMSNorm(spec.hidden)


class TokenMixer(nn.Module):
    """(B, T, C) -> (B, T, C), mixing positions along T (see :data:`MIXERS`)."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.conv = nn.Conv1d(width, width, kernel_size=3, padding=2, groups=width)
        elif kind == "shift":
            self.mu = nn.Parameter(torch.rand(width))
        elif kind == "token_linear":
            self.w = nn.Parameter(torch.randn(T_MAX, T_MAX) / math.sqrt(T_MAX))

    def forward(self, x):
        t = x.shape[1]
        if self.kind == "conv":  # causal depthwise conv over tokens
            return self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)  # (B, C, T+2) -> (B, T, C)
        if self.kind == "cumsum":
            return x.cumsum(dim=1) * 0.5
        if self.kind == "shift":  # RWKV token shift: prev[:, p] = x[:, p - 1], zero at p = 0
            prev = F.pad(x, (0, 0, 1, -1))  # (B, T, C)
            return x + self.mu * (prev - x)
        if self.kind == "max":
            return x + x.max(dim=1, keepdim=True).values  # (B, 1, C) broadcast over T
        if self.kind == "absmax":
            return x / x.abs().max(dim=1, keepdim=True).values
        if self.kind == "min":
            return x - x.min(dim=1, keepdim=True).values
        if self.kind == "mean":
            return x - x.mean(dim=1, keepdim=True)
        if self.kind == "token_linear":  # causal-masked (T, T) weight over the token axis
            return torch.tril(self.w[:t, :t]) @ x  # (T, T) @ (B, T, C) -> (B, T, C)
        if self.kind == "flip_pairs":  # swaps tokens 2i and 2i+1 (even T only)
            return x.unflatten(1, (t // 2, 2)).flip(2).flatten(1, 2)  # (B, T/2, 2, C) -> (B, T, C)
        raise ValueError(self.kind)


class Probes(nn.Module):
    """The probes of one place, applied in order: (B, T, C), ctx -> (B, T, C)."""

    def __init__(self, kinds, width: int):
        super().__init__()
        self.probes = nn.ModuleList(Probe(k, width) for k in kinds)

    def forward(self, x, ctx):
        for p in self.probes:
            x = p(x, ctx)
        return x


def _probes(spec: ArchSpec, where: str, layer: int, width: int) -> Probes:
    return Probes([m.kind for m in spec.probes if m.where == where and (where == "stem" or m.layer == layer)], width)


def _mixer(spec: ArchSpec, where: str, layer: int, width: int) -> nn.Module:
    kinds = [m.kind for m in spec.mixers if m.where == where and (where == "stem" or m.layer == layer)]
    return nn.Sequential(*(TokenMixer(k, width) for k in kinds))  # empty: identity


def rope(x, cos, sin):
    """Rotate-half RoPE. x (B, H, T, hd); cos, sin (B, T, hd/2)."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, layer: int):
        super().__init__()
        self.spec = spec
        d, hd = spec.hidden, spec.head_dim
        self.q = nn.Linear(d, spec.heads * hd)
        self.k = nn.Linear(d, spec.kv_heads * hd)
        self.v = nn.Linear(d, spec.kv_heads * hd)
        self.o = nn.Linear(spec.heads * hd, d)
        self.mix = _mixer(spec, "attn", layer, d)

    def _repeat_kv(self, x):
        s = self.spec
        rep = s.heads // s.kv_heads
        if rep == 1:
            return x
        if s.gqa == "repeat_interleave":
            return x.repeat_interleave(rep, dim=1)  # (B, KV, T, hd) -> (B, H, T, hd)
        b, kv, t, hd = x.shape
        return x[:, :, None].expand(b, kv, rep, t, hd).reshape(b, kv * rep, t, hd)  # (B, H, T, hd)

    def forward(self, x, cos, sin, allowed):
        s = self.spec
        x = self.mix(x)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, s.heads, s.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if cos is not None:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, H, T, hd)
        if s.attn == "sdpa":
            if allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=_as_mask(allowed, s.mask, q.dtype))
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(s.head_dim)  # (B, H, T, T)
            if s.attn == "softcap":
                scores = torch.tanh(scores / SOFTCAP) * SOFTCAP
            if s.attn == "sigmoid":
                weights = torch.sigmoid(scores) * allowed.to(scores.dtype)  # no softmax: masked keys add 0
            else:
                if s.mask == "bool":
                    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + _as_mask(allowed, "additive", scores.dtype)
                weights = scores.softmax(dim=-1)
            y = weights @ v  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))  # (B, T, D)


def _as_mask(allowed, form: str, dtype):
    if form == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # additive (B, 1, T, T); finite: no NaN rows


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec, layer: int):
        super().__init__()
        d, f = spec.hidden, 2 * spec.hidden
        self.gated = spec.mlp == "gated"
        self.up = nn.Linear(d, f)
        self.gate = nn.Linear(d, f) if self.gated else None
        self.down = nn.Linear(f, d)
        self.mix = _mixer(spec, "mlp", layer, f)
        self.probes = _probes(spec, "mlp", layer, f)

    def forward(self, x, ctx):
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))  # (B, T, F)
        return self.down(self.probes(self.mix(h), ctx))


class Block(nn.Module):
    def __init__(self, spec: ArchSpec, layer: int):
        super().__init__()
        self.spec = spec
        self.attn, self.mlp = Attention(spec, layer), MLP(spec, layer)
        self.n1, self.n2 = _norm(spec), _norm(spec)  # pre/post norms (parallel forms use n1 only)
        if spec.norm_place == "sandwich":
            self.m1, self.m2 = _norm(spec), _norm(spec)  # norms on the branch outputs

    def forward(self, h, cos, sin, allowed, ctx):
        s = self.spec

        def attn(x):
            y = self.attn(x, cos, sin, allowed)
            return self.m1(y) if s.norm_place == "sandwich" else y

        def mlp(x):
            y = self.mlp(x, ctx)
            return self.m2(y) if s.norm_place == "sandwich" else y

        if s.norm_place == "post":
            if s.block == "serial":
                h = self.n1(h + attn(h))
                return self.n2(h + mlp(h))
            if s.block == "parallel":
                return self.n1(h + (attn(h) + mlp(h)))
            return self.n1(h + attn(h) + mlp(h))  # cohere
        if s.block == "serial":
            h = h + attn(self.n1(h))
            return h + mlp(self.n2(h))
        x = self.n1(h)
        if s.block == "parallel":
            return h + (attn(x) + mlp(x))
        return h + attn(x) + mlp(x)  # cohere: (h + attn) + mlp


class FuzzLM(nn.Module):
    """The decoder an :class:`ArchSpec` describes, with Hugging Face-style keyword inputs."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        d = spec.hidden
        self.embed = nn.Embedding(VOCAB, d)
        self.pos_embed = nn.Embedding(T_MAX, d) if spec.pos == "learned" else None
        self.stem = _mixer(spec, "stem", 0, d)
        self.stem_probes = _probes(spec, "stem", 0, d)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.layers))
        self.norm = _norm(spec) if spec.norm_place != "post" else None
        self.head = None if spec.tied else nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        s = self.spec
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None].expand(b, t)  # (B, T)
        h = self.embed(input_ids)  # (B, T, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed(position_ids)
        h = self.stem(h)
        ctx = {"ids": input_ids, "pos": position_ids,
               "am": attention_mask if attention_mask is not None else torch.ones_like(input_ids)}
        h = self.stem_probes(h, ctx)
        cos = sin = None
        if s.pos == "rope":
            inv = 1.0 / 10000 ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim)  # (hd/2,)
            angle = position_ids[..., None].float() * inv  # (B, T, hd/2)
            cos, sin = angle.cos(), angle.sin()
        allowed = None
        if s.mask != "is_causal":
            q_idx = torch.arange(t, device=input_ids.device)[None, None, :, None]  # (1, 1, T, 1)
            kv_idx = torch.arange(t, device=input_ids.device)[None, None, None, :]  # (1, 1, 1, T)
            allowed = kv_idx <= q_idx  # (1, 1, T, T)
            if attention_mask is not None:
                allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
            if s.window is not None:
                dist = position_ids[:, None, :, None] - position_ids[:, None, None, :]  # (B, 1, T, T)
                allowed = allowed & (dist < s.window)
        for layer in self.layers:
            h = layer(h, cos, sin, allowed, ctx)
        if self.norm is not None:
            h = self.norm(h)
        logits = F.linear(h, self.embed.weight) if self.head is None else self.head(h)  # (B, T, V)
        return CausalLMOutput(logits=logits)
