"""DDP over a sparsified model: 2 gloo ranks, each with its own batch and keep mask, end a step with
the same gradients, equal to the mean of what each rank's sparse step computes alone."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import regate_fx
from tests.helpers import assert_grads_close, grads, make_batch, random_keep
from tests.models import BY_NAME
from tests.runtime.runtime_helpers import free_port

WORLD = 2
TM = BY_NAME["llama"]


def _rank_inputs(rank: int):
    batch = make_batch(TM, 2, 10 + 2 * rank, pad="left", seed=rank)  # ranks differ in T and K too
    return batch, random_keep(batch, 0.5, seed=10 + rank)


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = TM("sdpa").train()
        ddp = torch.nn.parallel.DistributedDataParallel(regate_fx.sparsify(model, backend="eager"))
        batch, keep = _rank_inputs(rank)
        ddp(**batch, keep_mask=keep).loss.backward()
        torch.save(grads(model), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_of_a_sparsified_model_averages_the_sparse_gradients(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = TM("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    per_rank = []
    for r in range(WORLD):
        model.zero_grad(set_to_none=True)
        batch, keep = _rank_inputs(r)
        smodel(**batch, keep_mask=keep).loss.backward()
        per_rank.append(grads(model))
    want = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
    for r in range(WORLD):
        assert_grads_close(got[r], want)
