"""The fuzzer's verdict on one (model, batch, keep mask): refused with a structured reason, or exact.

Everything here is independent of regate_fx's own reference code: the oracle runs the dense model
on each sample's kept subsequence alone (original position ids, all-ones attention mask) and the
loss is recomputed from its definition (``ReGateOutput.loss``: mean cross-entropy over the kept
positions p whose label of p + 1 is supervised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from regate_fx import KeepMaskError, Reason, RewriteError, SparsifyConfig, sparsify

IGNORE = -100
# fp32 on a few hundred flops per output: reduction order moves results by ~1e-6. A pruned token
# leaking into a kept one moves them by ~1e-2 and more.
ATOL, RTOL = 1e-5, 1e-4
LOSS_ATOL = 1e-5
INVARIANCE_ATOL = 1e-6


@dataclass(frozen=True)
class BatchSpec:
    """How to build one padded batch and its keep mask.

    Attributes:
        batch: number of samples; ``seq``: padded length.
        pad: ``"none"``, ``"left"`` or ``"right"``.
        lengths: real tokens per sample (None without padding).
        positions: pass explicit ``position_ids`` (HF style, ``cumsum(mask) - 1``); else the model
            uses ``arange(T)``.
        rho: keep probability of each real token (1.0 keeps every real token).
        seed: seed of the token ids, unsupervised labels and keep mask.
        even: keep an even number of tokens in every sample (models that pair up tokens are only
            defined on even lengths, and the oracle runs them on each kept subsequence).
    """

    batch: int
    seq: int
    pad: str = "none"
    lengths: tuple[int, ...] | None = None
    positions: bool = True
    rho: float = 0.5
    seed: int = 0
    even: bool = False


def make_batch(bs: BatchSpec, vocab: int) -> tuple[dict, torch.Tensor]:
    """Return (batch, keep): input_ids, attention_mask, labels (-100 at padding and ~20% of the real
    tokens), optionally position_ids; keep is bool (B, T), >= 1 real token kept per sample."""
    g = torch.Generator().manual_seed(bs.seed)
    b, t = bs.batch, bs.seq
    ids = torch.randint(1, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    if bs.pad != "none":
        for i, n in enumerate(bs.lengths):
            if bs.pad == "left":
                am[i, : t - n] = 0
            else:
                am[i, n:] = 0
    ids = ids.masked_fill(am == 0, 0)
    labels = ids.masked_fill((am == 0) | (torch.rand(b, t, generator=g) < 0.2), IGNORE)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    if bs.positions:
        batch["position_ids"] = (am.cumsum(1) - 1).clamp(min=0)
    real = am.bool()
    keep = real if bs.rho >= 1.0 else (torch.rand(b, t, generator=g) < bs.rho) & real
    first = real.float().argmax(1)  # every sample keeps at least one position
    keep = keep.clone()
    keep[torch.arange(b), first] = True
    if bs.even:
        for i in range(b):
            pos = keep[i].nonzero().flatten()
            if len(pos) % 2:  # drop the last kept token, or keep a second one
                extra = pos[-1] if len(pos) > 1 else real[i].nonzero().flatten()[1]
                keep[i, extra] = not keep[i, extra]
    return batch, keep


def original_positions(batch: dict) -> torch.Tensor:
    """The position id of every token in the full-length call (B, T)."""
    ids = batch["input_ids"]
    if "position_ids" in batch:
        return batch["position_ids"]
    return torch.arange(ids.size(1))[None].expand_as(ids)


def _target(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T): label of p + 1


def oracle(model, batch: dict, keep: torch.Tensor, **extra) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Dense model on each kept subsequence alone: (logits per sample (K_b, V), loss)."""
    orig = original_positions(batch)
    target = _target(batch["labels"])
    logits_out, total, count = [], 0.0, 0
    for b in range(keep.size(0)):
        pos = keep[b].nonzero().flatten()  # (K_b,)
        ids = batch["input_ids"][b, pos][None]  # (1, K_b)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=orig[b, pos][None],
                       use_cache=False, **extra).logits[0]  # (K_b, V)
        logits_out.append(logits)
        tb = target[b, pos]
        m = tb != IGNORE
        total = total + 0.0 * logits.sum()  # a graph even when nothing is counted
        if m.any():
            total = total + F.cross_entropy(logits[m].float(), tb[m], reduction="sum")
            count += int(m.sum())
    return logits_out, total / max(count, 1)


def dense_reference(model, batch: dict, keep: torch.Tensor, **extra) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The unsparsified model at the kept positions: (logits per sample (K_b, V), loss)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, **extra).logits  # (B, T, V)
    counted = keep & (_target(batch["labels"]) != IGNORE)
    loss = 0.0 * logits.sum() + F.cross_entropy(logits[counted].float(), _target(batch["labels"])[counted],
                                                reduction="sum") / max(int(counted.sum()), 1)
    return [logits[b, keep[b]] for b in range(keep.size(0))], loss


def grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros where none reached it)."""
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def _close(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_same(out, keep: torch.Tensor, g_sparse: dict, ref_logits, ref_loss, g_ref: dict,
                what: str = "vs oracle") -> None:
    """Sparse logits at kept positions (zero elsewhere), loss and every gradient equal the reference."""
    for b, ref in enumerate(ref_logits):
        _close(out.logits[b, keep[b]].detach(), ref.detach(), f"{what}: logits of sample {b} at kept positions")
    assert float(out.logits[~keep].detach().abs().sum()) == 0.0, f"{what}: logits at pruned positions are not zero"
    _close(out.loss.detach(), ref_loss.detach(), f"{what}: loss", atol=LOSS_ATOL, rtol=0.0)
    for name in sorted(g_ref):
        _close(g_sparse[name], g_ref[name], f"{what}: grad of {name}")


def assert_structured_refusal(err: Exception) -> None:
    """A refusal must say why in the report: a refused branch, a token-mixing node outside every
    branch (with its module), or a graph-level `Reason`."""
    report = getattr(err, "report", None)
    assert report is not None, f"{type(err).__name__} without a report: {err}"
    graph = report.sparse_graph
    assert graph is not None, f"{type(err).__name__}: the report has no sparse graph: {err}"
    reasons = ([b.reason for b in graph.refused] + [o.reason for o in graph.outside if o.module]
               + ([graph.reason] if graph.reason is not None else []))
    assert reasons and all(isinstance(r, Reason) for r in reasons), (
        f"{type(err).__name__} without a structured reason: {err}")


def new_sparse(model, layout: str = "auto"):
    """A fresh sparsified model: strict, eager backend, no spinner."""
    return sparsify(model, SparsifyConfig(strict=True, progress=False, return_logits=True, layout=layout),
                    backend="eager")


def sparse_step(smodel, model, batch: dict, keep: torch.Tensor):
    """One sparse forward + backward: (output, grads), or None when the pass refused the model
    with a structured reason. Any other exception propagates."""
    model.zero_grad(set_to_none=True)
    try:
        out = smodel(**batch, keep_mask=keep)
    except (RewriteError, KeepMaskError) as err:
        assert_structured_refusal(err)
        return None
    out.loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return out, g


def reference_step(fn, model, batch: dict, keep: torch.Tensor, **extra):
    """(logits per sample, loss, grads) of a reference (`oracle` or `dense_reference`)."""
    model.zero_grad(set_to_none=True)
    logits, loss = fn(model, batch, keep, **extra)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return logits, loss, g


def replace_pruned_ids(batch: dict, keep: torch.Tensor, vocab: int, seed: int) -> dict:
    """The batch with a different ordinary token id (1..vocab-1) at every pruned position."""
    g = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"]
    shift = torch.randint(1, vocab - 1, ids.shape, generator=g)
    other = 1 + (ids.clamp(min=1) - 1 + shift) % (vocab - 1)  # != ids wherever ids >= 1
    return {**batch, "input_ids": torch.where(keep, ids, other)}


def assert_pruned_ids_ignored(smodel, batch: dict, keep: torch.Tensor, out, vocab: int, seed: int = 0) -> None:
    """Oracle-free: other token ids at pruned positions leave the kept logits unchanged."""
    other = smodel(**replace_pruned_ids(batch, keep, vocab, seed), keep_mask=keep)  # same grad mode: no recompile
    for b in range(keep.size(0)):
        _close(other.logits[b, keep[b]].detach(), out.logits[b, keep[b]].detach(),
               f"sample {b}: kept logits changed when only pruned token ids changed",
               atol=INVARIANCE_ATOL, rtol=0.0)


def check_refused_or_exact(model, batch: dict, keep: torch.Tensor, vocab: int, *, reference=oracle,
                           invariance: bool = True, then_keep_all: bool = False, layout: str = "auto",
                           **extra) -> str:
    """The fuzzer's property: refused with a structured reason, or exact against `reference`
    (logits, loss, every gradient) and blind to the ids of pruned tokens.

    Args:
        model: the unsparsified model (a fresh sparsified copy is made here).
        batch: input_ids, attention_mask, labels, optionally position_ids.
        keep: bool (B, T) keep mask.
        vocab: the model's vocabulary size (for replacing pruned ids).
        reference: ``oracle`` or ``dense_reference``.
        invariance: also check that pruned token ids do not reach kept logits.
        then_keep_all: afterwards, run the same sparse model with every real token kept and check
            it against the unsparsified model (a second step on the same compiled graph).
        layout: ``SparsifyConfig.layout`` (``"auto"`` packs steps with uneven kept counts).
        **extra: more keyword inputs for every model call.

    Returns:
        ``"refused"``, or ``"exact"`` plus the layout of the first step (``"exact, packed"``).
    """
    smodel = new_sparse(model, layout)
    got = sparse_step(smodel, model, batch, keep)
    if got is None:
        return "refused"
    result = f"exact, {smodel.regate_report.sparse_graph.layout}"
    out, g_sparse = got
    if invariance:  # first: a leak of pruned tokens is the clearest diagnosis
        assert_pruned_ids_ignored(smodel, batch, keep, out, vocab)
    ref_logits, ref_loss, g_ref = reference_step(reference, model, batch, keep, **extra)
    what = "vs oracle" if reference is oracle else "vs unsparsified model"
    assert_same(out, keep, g_sparse, ref_logits, ref_loss, g_ref, what)
    if then_keep_all:
        real = batch["attention_mask"].bool()
        got = sparse_step(smodel, model, batch, real)
        if got is None:
            return "refused"
        assert_same(got[0], real, got[1], *reference_step(dense_reference, model, batch, real, **extra),
                    "second step, every real token kept, vs unsparsified model")
    return result
