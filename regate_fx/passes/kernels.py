"""Functions the rewritten graph calls. aot_autograd and inductor trace through them.

`kept_rows` (and `kept_rows_packed` for the packed layout) is also a marker: `sparsify`'s step function calls it on the model's output (the
logits), dynamo keeps it as one node (`allow_in_graph`), and the pass recognises it to run the
tail of the model (final norm, LM head) on kept positions only. The rewrite never leaves it in a
graph.

AOTAutograd's cache accepts a call to a Python function only when the node is marked as a wrapped
function with a cache hash (`mark_cacheable`): the hash of this file's source and the package
version, so an edited kernel never reuses a stale compiled graph.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, cast

import torch
import torch.fx as fx

__all__ = [
    "KERNELS",
    "MARKERS",
    "gather_tokens",
    "kept_rows",
    "kept_rows_packed",
    "mark_cacheable",
    "mask_keys_scores",
    "mask_keys_weights",
    "pack_tokens",
    "packed_attention",
    "packed_rows",
    "scatter_tokens",
    "sdpa_key_mask",
    "unpack_tokens",
    "varlen_sdpa_cpu",
]


def gather_tokens(x: torch.Tensor, gather_idx: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Gather `x` at the kept positions along each token axis in `dims` (batch axis first)."""
    b, k = gather_idx.shape
    if x.size(0) != b:
        x = x.expand(b, *x.shape[1:])  # (1, ...) broadcast over the batch -> (B, ...)
    for d in dims:
        shape = [1] * x.dim()
        shape[0], shape[d] = b, k
        sizes = list(x.shape)
        sizes[d] = k
        x = x.gather(d, gather_idx.view(shape).expand(sizes))  # token axis d: T -> K
    return x


def scatter_tokens(
    base: torch.Tensor, kept: torch.Tensor, scatter_idx: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Write `kept` (B, K, D) back into `base` (B, T, D); padding slots rewrite pruned rows unchanged."""
    idx = scatter_idx.unsqueeze(-1).expand(-1, -1, base.size(-1))  # (B, K, D)
    src = torch.where(valid.unsqueeze(-1), kept.to(base.dtype), base.gather(1, idx))  # (B, K, D)
    return base.scatter(1, idx, src)  # (B, T, D)


def sdpa_key_mask(mask: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Combine an SDPA attention mask with the key validity of the padded kept layout."""
    keys = valid[:, None, None, :]  # (B, 1, 1, K)
    if mask is None:
        return keys
    if mask.dtype == torch.bool:
        return mask & keys  # (B, H|1, K, K)
    return mask.masked_fill(~keys, float("-inf"))


def mask_keys_scores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask padding-slot keys in eager attention scores (B, H, K, K) before the softmax."""
    return scores.masked_fill(~valid[:, None, None, :], float("-inf"))


def mask_keys_weights(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the padding-slot keys of attention weights (B, ..., K, K) formed without a softmax."""
    shape = [valid.size(0)] + [1] * (weights.dim() - 2) + [valid.size(1)]  # (B, 1, ..., 1, K)
    return weights.masked_fill(~valid.view(shape), 0)


@torch._dynamo.allow_in_graph
def kept_rows(x: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, T, ...) model output at the kept positions: (B, K, ...)."""
    return gather_tokens(x, gather_idx, (1,))


# --- the packed layout ------------------------------------------------------------------------
# Kept tokens of every sample in one row, sample after sample (see `regate_fx.layouts.packed`):
#
#     flat_idx   (N,)    flat position b * T + t of every kept token, ascending
#     pad_idx    (B, K)  for attention: sample b's kept tokens as indices into N, then padding
#                        slots repeating its last kept token (causal: no real query sees them)
#     pack_idx   (N,)    where each packed token sits in the flattened (B * K) padded layout
#     cu_seqlens (B + 1,) int32 cumulative kept counts (varlen attention)


def pack_tokens(x: torch.Tensor, flat_idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows of a (B|1, ..., T, ...) value (token axis `dim`) at the kept tokens, packed: (1, ..., N, ...)."""
    x = x.movedim(dim, 1)  # (B|1, T, ...)
    if x.size(0) != 1:
        out = x.flatten(0, 1)[flat_idx]  # (B*T, ...) -> (N, ...)
    else:
        out = x[0][flat_idx % x.size(1)]  # shared over the batch: index by position  # (N, ...)
    return out.unsqueeze(0).movedim(1, dim)  # (1, ..., N, ...)


def unpack_tokens(base: torch.Tensor, kept: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """Write packed `kept` (1, N, D) back into `base` (B, T, D) at the kept tokens."""
    flat = base.flatten(0, 1)  # (B*T, D)
    return flat.index_copy(0, flat_idx, kept.squeeze(0).to(base.dtype)).view_as(base)  # (B, T, D)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad_idx: torch.Tensor,
    pack_idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal attention of every sample's kept tokens among themselves; q, k, v (1, H, N, d).

    CUDA with half precision: a varlen kernel on the packed tokens (flash-attn's
    `flash_attn_varlen_func` when installed, else torch's `varlen_attn`). CPU: `varlen_sdpa_cpu`,
    SDPA's CPU flash kernel on each sample's slice (cost sum_b K_b^2, as the oracle's). Otherwise
    (CUDA fp32, or a value head size other than the query's) the tokens are laid out padded per
    sample, (B, H, K, d), for SDPA's causal kernel, and packed back.
    """
    dev = q.device.type
    if torch.is_autocast_enabled(dev):  # as autocast casts SDPA's inputs (the varlen kernels are custom ops it skips)
        dtype = torch.get_autocast_dtype(dev)
        q, k, v = (x.to(dtype) for x in (q, k, v))  # e.g. fp32 q, k after rotary, bf16 v
    if v.size(-1) != q.size(-1):  # value head size != query/key head size (MLA-style): the flash kernels refuse it
        return _padded_attention(q, k, v, pad_idx, pack_idx, scale, enable_gqa)
    varlen = _varlen_kernel(q)
    if varlen is not None:
        return varlen(q, k, v, cu_seqlens, pad_idx.size(1), scale, enable_gqa)
    if dev == "cpu":
        return varlen_sdpa_cpu(q, k, v, cu_seqlens, scale)[0]  # (1, H, N, d)
    return _padded_attention(q, k, v, pad_idx, pack_idx, scale, enable_gqa)


def _padded_attention(q, k, v, pad_idx, pack_idx, scale, enable_gqa):
    """SDPA's causal kernel on the per-sample padded view (B, H, K, d) of packed q, k, v (1, H, N, d)."""
    b, kk = pad_idx.shape
    flat = pad_idx.flatten()  # (B*K,)

    def padded(x):  # (1, H, N, d) -> (B, H, K, d)
        return x[0][:, flat].unflatten(1, (b, kk)).transpose(0, 1)

    o = torch.nn.functional.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=enable_gqa
    )  # (B, H, K, d)
    return o.transpose(0, 1).flatten(1, 2)[:, pack_idx].unsqueeze(0)  # (1, H, N, d)


def _varlen_kernel(q: torch.Tensor):
    """The varlen attention this device and dtype can run, or None (SDPA on the padded layout)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.size(-1) > 256:
        return None
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401

        return _flash_attn_varlen
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return None
    return _torch_varlen


def _flash_attn_varlen(q, k, v, cu, max_len, scale, enable_gqa):
    from flash_attn import flash_attn_varlen_func

    nhd = [x[0].transpose(0, 1) for x in (q, k, v)]  # (N, H, d)
    o = flash_attn_varlen_func(*nhd, cu, cu, max_len, max_len, causal=True, softmax_scale=scale)  # (N, H, d)
    return o.transpose(0, 1).unsqueeze(0)  # (1, H, N, d)


def _torch_varlen(q, k, v, cu, max_len, scale, enable_gqa):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params:  # older torch: repeat the kv heads
        k, v = (_kv_heads(x, q.size(1)) for x in (k, v))
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
        if k.size(1) != q.size(1):
            kw["enable_gqa"] = True
    else:
        kw["is_causal"] = True
    qn, kn, vn = (x[0].transpose(0, 1) for x in (q, k, v))  # (N, H, d)
    o = varlen_attn(qn, kn, vn, cu, cu, max_len, max_len, **kw)  # (N, H, d)
    return cast(torch.Tensor, o).transpose(0, 1).unsqueeze(0)  # (1, H, N, d); a tuple only with return_aux


# CPU varlen attention: an opaque custom op (AOTAutograd and inductor do not trace into it; its
# loop over samples reads cu_seqlens on the host, free on the CPU). Forward and backward call the
# kernels SDPA itself picks for an unmasked causal call on the CPU, one sample at a time, so the
# step pays sum_b K_b^2 attention scores like the oracle's per-sample calls, not B * K^2.


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spans(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def _kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(1, Hkv, k, d) -> (1, H, k, d): grouped-query kv heads repeated for their query heads."""
    return x if x.size(1) == heads else x.repeat_interleave(heads // x.size(1), dim=1)


@torch.library.custom_op("regate_fx::varlen_sdpa_cpu", mutates_args=(), device_types="cpu")
def varlen_sdpa_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each sample of packed q (1, H, N, d), k, v (1, Hkv, N, d) on the CPU.

    Returns the output (1, H, N, d) and the log-sum-exp (1, H, N) the backward reads.
    """
    out = q.new_empty(q.shape)  # (1, H, N, d)
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))  # (1, H, N)
    h = q.size(1)
    for s, e in _spans(cu_seqlens):
        o, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, s:e], _kv_heads(k[:, :, s:e], h), _kv_heads(v[:, :, s:e], h), 0.0, True, scale=scale
        )
        out[:, :, s:e] = o  # (1, H, K_b, d)
        lse[:, :, s:e] = lse_b  # (1, H, K_b)
    return out, lse


@varlen_sdpa_cpu.register_fake
def _(q, k, v, cu_seqlens, scale=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("regate_fx::varlen_sdpa_cpu_backward", mutates_args=(), device_types="cpu")
def _varlen_sdpa_cpu_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the spans tile [0, N)
    h, hkv = q.size(1), k.size(1)
    for s, e in _spans(cu_seqlens):
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad[:, :, s:e],
            q[:, :, s:e],
            _kv_heads(k[:, :, s:e], h),
            _kv_heads(v[:, :, s:e], h),
            out[:, :, s:e],
            lse[:, :, s:e],
            0.0,
            True,
            scale=scale,
        )  # (1, H, K_b, d) each
        if hkv != h:  # sum the repeated heads back onto their kv head
            gk, gv = (g.unflatten(1, (hkv, h // hkv)).sum(2) for g in (gk, gv))  # (1, Hkv, K_b, d)
        dq[:, :, s:e], dk[:, :, s:e], dv[:, :, s:e] = gq, gk, gv
    return dq, dk, dv


@_varlen_sdpa_cpu_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.scale = scale


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_sdpa_cpu_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.scale)
    return dq, dk, dv, None, None


varlen_sdpa_cpu.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def packed_rows(x: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, T, ...) value at the kept tokens, packed: (N, ...)."""
    return x.flatten(0, 1)[flat_idx]  # (N, ...)


@torch._dynamo.allow_in_graph
def kept_rows_packed(
    x: torch.Tensor, flat_idx: torch.Tensor, pad_idx: torch.Tensor, pack_idx: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Rows of a (B, T, ...) model output at the kept tokens, packed: (N, ...).

    The marker of the packed layout; its other arguments bring the layout into the graph.
    """
    return packed_rows(x, flat_idx)


# Every layout's marker (`regate_fx/layouts/`: each step calls its own on the model's output).
MARKERS = (kept_rows, kept_rows_packed)

KERNELS = frozenset(
    {
        gather_tokens,
        scatter_tokens,
        sdpa_key_mask,
        mask_keys_scores,
        mask_keys_weights,
        pack_tokens,
        unpack_tokens,
        packed_attention,
        packed_rows,
    }
)


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    from regate_fx import __version__

    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read() + __version__.encode()).hexdigest()[:32]


def mark_cacheable(node: fx.Node) -> None:
    """Mark a call to one of `KERNELS` as a wrapped function with a cache hash, the form
    AOTAutograd's cache accepts (``autograd_cache.check_node_safe``); aot_autograd still traces
    through it, so inductor fuses the kernel's ops with their neighbours."""
    node.meta["is_wrapped"] = True
    name = cast(Callable[..., Any], node.target).__name__  # one of KERNELS: a function
    node.meta["user_cache_hash"] = f"regate_fx.kernels.{name}.{_source_hash()}"
