"""DDP over a sparsified model at the sizes issue 19 names: a Llama with tens of millions of
parameters (21.6M: 86 MB of fp32 gradients, ~90 of DDP's buckets after the first) and a tiny
Qwen2-VL (vision tower, 3-D M-RoPE positions). 2 gloo ranks, each with its own batch and keep mask:
every rank's loss equals the oracle's on its batch, and the gradients after DDP's all-reduce equal the
mean of the ranks' oracle gradients (one process, `_reference`). Slow: the 21M model takes a minute.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import regate_fx
from tests.runtime.runtime_helpers import exit_rank, file_store, spawn_ranks
from tests.test_fsdp_per_layer import MODELS, WORLD, _rank_inputs, _reference


def _worker(rank: int, init: str, out: str, model_name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        tm = MODELS[model_name]
        model = tm("sdpa").train()
        ddp = torch.nn.parallel.DistributedDataParallel(regate_fx.sparsify(model))
        batch, keep = _rank_inputs(tm, rank)
        res = ddp(**batch, keep_mask=keep)
        res.loss.backward()
        report = model.regate_report
        torch.save(
            {
                "loss": res.loss.detach(),
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                "sparse_graphs": sum(1 for g in report.graphs if g.sparse),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["llama_21m", "qwen2_vl"])
def test_ddp_equals_one_process(tmp_path, model_name):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), model_name), WORLD, timeout=1200)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    losses, want = _reference(MODELS[model_name])
    for r in range(WORLD):
        assert got[r]["sparse_graphs"] >= 1, "ran without its sparse graph"
        assert abs(float(got[r]["loss"] - losses[r])) <= 1e-5, (r, float(got[r]["loss"]), float(losses[r]))
        for n in want:
            torch.testing.assert_close(got[r]["grads"][n], want[n], atol=1e-5, rtol=1e-4, msg=f"rank {r} grad {n}")
