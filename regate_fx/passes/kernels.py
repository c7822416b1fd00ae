"""Functions the rewritten graph calls. aot_autograd and inductor trace through them.

`kept_rows` is also a marker: `sparsify`'s step function calls it on the model's output (the
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

import torch
import torch.fx as fx

__all__ = ["KERNELS", "gather_tokens", "kept_rows", "mark_cacheable", "mask_keys_scores", "mask_keys_weights",
           "scatter_tokens", "sdpa_key_mask"]


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


def scatter_tokens(base: torch.Tensor, kept: torch.Tensor, scatter_idx: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
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


KERNELS = frozenset({gather_tokens, scatter_tokens, sdpa_key_mask, mask_keys_scores, mask_keys_weights})


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
    node.meta["user_cache_hash"] = f"regate_fx.kernels.{node.target.__name__}.{_source_hash()}"
