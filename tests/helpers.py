"""The one comparison helper every correctness test uses: batches, keep masks, the oracle.

The oracle itself (method.md) is public: `regate_fx.oracle`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from regate_fx.verify import oracle
from tests.models import VOCAB, TinyModel

IMAGE_TOKENS = 5  # CLIP 16x16 image, 8x8 patches, CLS kept ("full" strategy)
ATOL = 2e-5
RTOL = 2e-4
LOSS_ATOL = 1e-5


def make_batch(model: TinyModel, batch: int, seq: int, *, pad: str = "none", seed: int = 0,
               lengths: list[int] | None = None, positions: bool = True) -> dict:
    """Random input_ids / attention_mask / labels (+ pixel_values for an MLLM); pad 'left'|'right'|'none'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if pad != "none":
        if lengths is None:
            lengths = [int(x) for x in torch.randint(max(2, seq // 2), seq + 1, (batch,), generator=g)]
        for b, n in enumerate(lengths):
            if pad == "left":
                am[b, : seq - n] = 0
            else:
                am[b, n:] = 0
    ids = ids.masked_fill(am == 0, 0)
    out = {"input_ids": ids, "attention_mask": am}
    if model.multimodal:
        for b in range(batch):
            real = am[b].nonzero().flatten()
            assert len(real) >= IMAGE_TOKENS + 1, "sequence too short for the image"
            ids[b, real[:IMAGE_TOKENS]] = VOCAB - 1
        out["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
    labels = ids.masked_fill(am == 0, -100)
    if model.multimodal:
        labels = labels.masked_fill(ids == VOCAB - 1, -100)
    out["labels"] = labels
    if positions:  # explicit original position ids: OPT-style models derive them from the mask
        out["position_ids"] = (am.cumsum(1) - 1).clamp(min=0)
    return out


def random_keep(batch: dict, rho: float, seed: int = 0) -> torch.Tensor:
    """Keep each real token with probability rho; at least one per sample."""
    g = torch.Generator().manual_seed(seed)
    am = batch["attention_mask"].bool()
    keep = (torch.rand(am.shape, generator=g) < rho) & am
    first = am.float().argmax(1)
    keep[torch.arange(am.size(0)), first] = True
    return keep


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_grads_close(actual: dict, expected: dict, atol: float = ATOL, rtol: float = RTOL,
                       scale: float = 0.0) -> None:
    """Every gradient equal. `scale` > 0 widens each tensor's atol by scale * its largest |grad|:
    float32 noise of a gradient that sums many large terms (an MLLM projector's)."""
    names = set(actual) | set(expected)
    for n in sorted(names):
        a = actual.get(n)
        e = expected.get(n)
        if a is None or e is None:  # a parameter that only one side reached must have zero grad
            other = a if a is not None else e
            assert float(other.abs().max()) == 0.0, f"grad of {n} exists on one side only"
            continue
        assert_close(a, e, f"grad of {n}", atol=atol + scale * float(e.abs().max()), rtol=rtol)


def sparse_logits(smodel, batch: dict, keep: torch.Tensor, out) -> torch.Tensor | None:
    """The (B, T, V) logits of a sparse step: from `out` when the call returned them
    (``return_logits=True``), else from a second call without labels (the default config returns
    logits exactly when the call has none). None only for ``return_logits=False``."""
    fwd = getattr(smodel, "_regate_forward", None)  # the SparsifyConfig (sparsify works in place)
    wanted = fwd.config.return_logits if fwd is not None else True  # not sparsified: logits as returned
    if wanted is False:
        assert out.logits is None, "return_logits=False must not return logits"
        return None
    if wanted is None:
        assert out.logits is None, "a sparse step with labels returns no logits by default"
        return smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep).logits
    assert out.logits is not None, "return_logits=True must return logits"
    return out.logits


def check_against_oracle(smodel, model, batch: dict, keep: torch.Tensor, window: int | None = None,
                         grad_scale: float = 0.0, chunk: int | None = None) -> None:
    """Sparse logits at kept positions, loss and every parameter gradient equal the oracle's.

    Logits are compared for every config except ``return_logits=False`` (where their absence is
    asserted): with the default config they come from a second call without labels."""
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    logits = sparse_logits(smodel, batch, keep, out)
    ref_logits, ref_loss = oracle(model, batch, keep, window=window, chunk=chunk)
    ref_loss.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    for b, ref in enumerate(ref_logits if logits is not None else []):
        pos = keep[b].nonzero().flatten()
        assert_close(logits[b, pos].detach(), ref.detach(), f"logits of sample {b}")
        pruned = ~keep[b]
        assert float(logits[b, pruned].detach().abs().sum()) == 0.0, "pruned logits must be zero"
    # Absolute tolerance: relative to a loss of ~4.5, 2e-4 would also pass a fully dense run.
    assert_close(out.loss.detach(), ref_loss.detach(), "loss", atol=LOSS_ATOL, rtol=0)
    assert_grads_close(g_sparse, g_ref, scale=grad_scale)
    # token_loss: the per-position CE at counted kept positions, zero elsewhere
    counted = keep & (F.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100)
    assert float(out.token_loss[~counted].detach().abs().sum()) == 0.0
    if counted.any():
        assert math.isclose(float(out.token_loss[counted].detach().mean()), float(out.loss.detach()), rel_tol=1e-4, abs_tol=1e-5)
