"""Half precision: the rewrite keeps dtypes (gathers, scatters and key masks in the model's dtype)
and matches the half-precision oracle on logits, loss and every gradient.

Tolerances come from the noise floor of the dtype itself: how far the half-precision oracle is from
the fp32 oracle. Each test also checks that a wrong result (the dense model's kept logits, which
see pruned tokens) lies outside that tolerance, so the comparison can fail.
"""

from __future__ import annotations


import pytest
import torch

import regate_fx
from tests.helpers import grads, make_batch, random_keep
from tests.models import BY_NAME


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


def _oracle(model, batch, keep):
    model.zero_grad(set_to_none=True)
    logits, loss = regate_fx.oracle(model, batch, keep)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return logits, loss.detach().float(), g


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "llava"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_oracle(name, dtype):
    tm = BY_NAME[name]
    model32 = tm("sdpa")
    model = tm("sdpa").to(dtype)  # the same weights (the table seeds every build)
    batch = make_batch(tm, 2, 12, pad="left", seed=1)
    batch16 = dict(batch)
    if "pixel_values" in batch:
        batch16["pixel_values"] = batch["pixel_values"].to(dtype)
    keep = random_keep(batch, 0.5, seed=2)
    out = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")(
        **batch16, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    ref32, loss32, g32 = _oracle(model32, batch, keep)
    ref, loss_ref, g_ref = _oracle(model, batch16, keep)
    assert out.logits.dtype == dtype
    kept = [out.logits[b, keep[b]] for b in range(keep.size(0))]

    # Noise floor of the dtype: half-precision oracle vs fp32 oracle.
    tol_logits = 4 * _max_diff(ref, ref32) + 1e-3
    tol_loss = 4 * float((loss_ref - loss32).abs()) + 1e-3
    tol_grad = {n: 4 * float((g_ref[n].float() - g32[n]).abs().max()) + 1e-3 for n in g_ref}
    assert _max_diff(kept, ref) <= tol_logits
    assert float((out.loss.detach().float() - loss_ref).abs()) <= tol_loss
    assert set(g_sparse) == set(g_ref)
    for n in g_ref:
        assert float((g_sparse[n].float() - g_ref[n].float()).abs().max()) <= tol_grad[n], n

    # A wrong answer fails these tolerances: the dense model's logits at the kept positions.
    with torch.no_grad():
        dense = model32(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    wrong = [dense[b, keep[b]] for b in range(keep.size(0))]
    assert _max_diff(wrong, ref32) > tol_logits


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name,layout,device", [("llama", "padded", "cpu"), ("llama", "packed", "cpu"),
                                                ("llava", "packed", "cpu"),
                                                pytest.param("llama", "packed", "cuda", marks=_CUDA)])
def test_autocast_matches_the_autocast_oracle(name, layout, device):
    """fp32 weights under torch.autocast(bfloat16), as mixed-precision training runs: the kept
    layouts' kernels see the dtypes autocast gives SDPA (rotary leaves q, k in fp32 and v in bf16;
    the packed layout's varlen kernels are custom ops autocast does not cast)."""
    tm = BY_NAME[name]
    model = tm("sdpa").to(device)
    batch = {k: v.to(device) for k, v in make_batch(tm, 3, 12, pad="right", seed=1).items()}
    keep = random_keep(batch, 0.5, seed=2).to(device)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True, layout=layout), backend="eager")
    with torch.autocast(device, dtype=torch.bfloat16):
        out = smodel(**batch, keep_mask=keep)
        out.loss.backward()
        g_sparse = grads(model)
        ref, loss_ref, g_ref = _oracle(model, batch, keep)
    ref32, loss32, g32 = _oracle(model, batch, keep)
    assert {g.layout for g in smodel.regate_report.graphs if g.sparse} == {layout}
    kept = [out.logits[b, keep[b]] for b in range(keep.size(0))]
    tol_logits = 4 * _max_diff(ref, ref32) + 1e-3
    assert _max_diff(kept, ref) <= tol_logits
    assert float((out.loss.detach().float() - loss_ref).abs()) <= 4 * float((loss_ref - loss32).abs()) + 1e-3
    for n in g_ref:
        tol = 4 * float((g_ref[n].float() - g32[n]).abs().max()) + 1e-3
        assert float((g_sparse[n].float() - g_ref[n].float()).abs().max()) <= tol, n
    with torch.no_grad():  # a wrong answer (the dense model's kept logits) fails the tolerance
        dense = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert _max_diff([dense[b, keep[b]] for b in range(keep.size(0))], ref32) > tol_logits
