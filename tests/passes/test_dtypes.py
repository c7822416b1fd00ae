"""Half precision: the rewrite keeps dtypes (gathers, scatters and key masks in the model's dtype)."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from tests.helpers import assert_close, make_batch, random_keep
from tests.models import BY_NAME


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "llava"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_oracle(name, dtype):
    tm = BY_NAME[name]
    model = tm("sdpa").to(dtype)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")
    batch = make_batch(tm, 2, 12, pad="left", seed=1)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    keep = random_keep(batch, 0.5, seed=2)
    out = smodel(**batch, keep_mask=keep)
    ref_logits, ref_loss = regate_fx.oracle(model, batch, keep)
    assert out.logits.dtype == dtype
    for b, ref in enumerate(ref_logits):  # same kernels on the same rows: equal up to half-precision noise
        assert_close(out.logits[b, keep[b]].detach().float(), ref.detach().float(), f"sample {b}", atol=2e-2, rtol=2e-2)
    assert_close(out.loss.detach(), ref_loss.detach(), "loss", atol=2e-2, rtol=2e-2)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
