"""DDP and FSDP2 over a sparsified model: 2 gloo ranks, each with its own batch and keep mask, end a
step with the same gradients, equal to the mean of what each rank's sparse step computes alone."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import regate_fx
from tests.helpers import assert_grads_close, grads, make_batch, random_keep
from tests.models import BY_NAME
from tests.runtime.runtime_helpers import exit_rank, file_store, spawn_ranks

WORLD = 2
TM = BY_NAME["llama"]


def _rank_inputs(rank: int):
    batch = make_batch(TM, 2, 10 + 2 * rank, pad="left", seed=rank)  # ranks differ in T and K too
    return batch, random_keep(batch, 0.5, seed=10 + rank)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = TM("sdpa").train()
        ddp = torch.nn.parallel.DistributedDataParallel(regate_fx.sparsify(model, backend="eager"))
        batch, keep = _rank_inputs(rank)
        ddp(**batch, keep_mask=keep).loss.backward()
        torch.save(grads(model), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_ddp_of_a_sparsified_model_averages_the_sparse_gradients(tmp_path):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path)), WORLD)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    want = _want_mean_of_ranks()
    for r in range(WORLD):
        assert_grads_close(got[r], want)


def _fsdp_worker(rank: int, init: str, out: str, per_layer: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = regate_fx.sparsify(TM("sdpa").train(), backend="eager")
        if per_layer:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # after sparsify: FSDP2's hooks wrap the sparse forward
        batch, keep = _rank_inputs(rank)
        try:
            model(**batch, keep_mask=keep).loss.backward()
        except regate_fx.RewriteError as e:
            torch.save(str(e), os.path.join(out, f"rank{rank}.pt"))
            dist.barrier()  # both ranks refused: leave together (no rank tears the group down early)
        else:
            full = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # gathers the shards
            sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
            torch.save((sharded, full), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def _want_mean_of_ranks():
    model = TM("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    per_rank = []
    for r in range(WORLD):
        model.zero_grad(set_to_none=True)
        batch, keep = _rank_inputs(r)
        smodel(**batch, keep_mask=keep).loss.backward()
        per_rank.append(grads(model))
    return {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}


def test_fsdp2_of_a_sparsified_model_equals_one_process(tmp_path):
    spawn_ranks(_fsdp_worker, (file_store(tmp_path), str(tmp_path), False), WORLD)
    want = _want_mean_of_ranks()
    for r in range(WORLD):
        sharded, got = torch.load(tmp_path / f"rank{r}.pt")
        assert sharded  # parameters are DTensor shards between steps
        assert_grads_close(got, want)


def test_fsdp2_per_layer_sharding_is_a_clear_refusal(tmp_path):
    spawn_ranks(_fsdp_worker, (file_store(tmp_path), str(tmp_path), True), WORLD)
    msg = torch.load(tmp_path / "rank0.pt")
    assert "fully_shard(model) only" in msg and "model.layers.0" in msg
