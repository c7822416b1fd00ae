"""The sparse step on CUDA against the oracle: fp32 and bf16, SDPA (PyTorch's flash / efficient
kernels), and flash-attn's own attention where that package is installed.

Skipped on machines without CUDA (this project's CPU machines and CI); `benchmarks/gpu_run.sh`
runs them first on a GPU machine.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import regate_fx
from tests.helpers import assert_close, check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _to(batch: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def _batch_and_keep(tm, b: int, pad: str, dtype: torch.dtype, seed: int, keep_seed: int):
    batch = make_batch(tm, b, 16, pad=pad, seed=seed)
    keep = random_keep(batch, 0.5, seed=keep_seed)  # on the CPU batch, then both move
    return _to(batch, "cuda", dtype), keep.cuda()


def _assert_bf16_close(smodel, model, batch: dict, keep: torch.Tensor) -> None:
    """Kept logits and loss equal the bf16 oracle's up to bf16 noise; every gradient is finite."""
    out = smodel(**batch, keep_mask=keep)
    ref_logits, ref_loss = regate_fx.oracle(model, batch, keep)
    for b, ref in enumerate(ref_logits):
        assert_close(out.logits[b, keep[b]].detach().float(), ref.detach().float(), f"sample {b}",
                     atol=3e-2, rtol=3e-2)
    assert_close(out.loss.detach(), ref_loss.detach(), "loss", atol=3e-2, rtol=3e-2)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,pad", [("llama", "left"), ("llama", "none"), ("llava", "right")])
def test_cuda_fp32_matches_oracle(name, pad):
    tm = BY_NAME[name]
    model = tm("sdpa").cuda()
    smodel = regate_fx.sparsify(model, backend="eager")
    batch, keep = _batch_and_keep(tm, 3, pad, torch.float32, seed=2, keep_seed=1)
    check_against_oracle(smodel, model, batch, keep)
    graph = smodel.regate_report.sparse_graph
    assert graph.tail_on_kept and graph.causal_masks == 1 and not smodel.regate_report.refused


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_cuda_bf16_matches_oracle(name):
    """Same kernels on the same rows, up to bf16 noise (as tests/passes/test_dtypes.py on CPU)."""
    tm = BY_NAME[name]
    model = tm("sdpa").to("cuda", torch.bfloat16)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")
    batch, keep = _batch_and_keep(tm, 2, "left", torch.bfloat16, seed=1, keep_seed=2)
    _assert_bf16_close(smodel, model, batch, keep)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="needs flash-attn")
def test_flash_attention_2_model_matches_oracle_or_is_refused_with_a_reason():
    """A model on transformers' flash_attention_2 path: exact against the oracle, or refused by
    name (never silently wrong)."""
    tm = BY_NAME["llama"]
    model = tm("sdpa").to("cuda", torch.bfloat16)
    model.config._attn_implementation = "flash_attention_2"
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")
    batch, keep = _batch_and_keep(tm, 2, "none", torch.bfloat16, seed=1, keep_seed=2)
    try:
        out = smodel(**batch, keep_mask=keep)
    except regate_fx.RewriteError as e:
        assert e.report.refused, str(e)
        return
    ref_logits, _ = regate_fx.oracle(model, batch, keep)
    for b, ref in enumerate(ref_logits):
        assert_close(out.logits[b, keep[b]].detach().float(), ref.detach().float(), f"sample {b}", atol=3e-2, rtol=3e-2)


# --- the packed layout (SparsifyConfig(layout="packed")): varlen attention on CUDA ---------------

def test_cuda_packed_varlen_attention_is_per_sample_causal():
    """bf16 on CUDA takes a varlen kernel (flash-attn, else torch's varlen_attn); the reference is
    causal softmax attention of each sample alone, in fp32."""
    from regate_fx.passes.kernels import _varlen_kernel, packed_attention
    from regate_fx.sparse import packed_layout

    keep = torch.zeros(3, 40, dtype=torch.bool, device="cuda")
    keep[0, :37] = True
    keep[1, ::3] = True
    keep[2, 5:9] = True
    lay = packed_layout(keep)
    n = int(keep.sum())
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    assert _varlen_kernel(q) is not None, "no varlen kernel on this CUDA build"
    got = packed_attention(q, k, v, lay.pad_idx, lay.pack_idx, lay.cu_seqlens).float()
    start = 0
    for c in keep.sum(1).tolist():
        qs, ks, vs = (x[0, :, start:start + c].float() for x in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        assert_close(got[0, :, start:start + c], ref, f"sample at {start}", atol=2e-2, rtol=2e-2)
        start += c


@pytest.mark.parametrize("backend,layout,dtype", [
    ("eager", "packed", torch.float32), ("eager", "packed", torch.bfloat16),
    ("inductor", "padded", torch.float32), ("inductor", "packed", torch.float32),
    ("inductor", "packed", torch.bfloat16)])
def test_cuda_layouts_match_oracle(backend, layout, dtype):
    """fp32: exact against the oracle (packed: SDPA on the per-sample padded view); bf16: the varlen
    kernel, to bf16 noise. Inductor: the rewritten graph through AOTAutograd and triton code."""
    tm = BY_NAME["llama"]
    model = tm("sdpa").to("cuda", dtype)
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(layout=layout, return_logits=True),
                                backend=backend)
    batch, keep = _batch_and_keep(tm, 3, "right", dtype, seed=3, keep_seed=4)
    if dtype == torch.float32:
        check_against_oracle(smodel, model, batch, keep)
    else:
        _assert_bf16_close(smodel, model, batch, keep)
    assert smodel.regate_report.sparse_graph.layout == layout


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_gradient_checkpointing_with_hub_kernel_wrappers_matches_the_oracle(backend):
    """transformers >= 5.25 puts the `kernels` package's forward wrappers on every attention module
    (regate_fx/compat.py::capture_settings): checkpointed layers recomputed on CUDA, fp32, exact."""
    tm = BY_NAME["llama"]
    model = tm("sdpa").cuda().train()
    smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend=backend)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, keep = _batch_and_keep(tm, 3, "left", torch.float32, seed=5, keep_seed=6)
    check_against_oracle(smodel, model, batch, keep)
