"""DDP and FSDP2 over a sparsified model: 2 gloo ranks, each with its own batch and keep mask, end a
step with the same gradients, equal to the mean of what each rank's sparse step computes alone.

The DDP model is above DDP's first gradient bucket (1 MiB), where dynamo's DDP optimizer would split
the captured step into one graph per bucket and the split pieces would run dense (issue 19)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import regate_fx
from tests.helpers import LOSS_ATOL, assert_close, assert_grads_close, grads, make_batch, random_keep
from tests.models import BY_NAME, LLAMA_ABOVE_FIRST_BUCKET
from tests.runtime.runtime_helpers import exit_rank, file_store, spawn_ranks

WORLD = 2
TM = BY_NAME["llama"]


def _rank_inputs(rank: int):
    batch = make_batch(TM, 2, 10 + 2 * rank, pad="left", seed=rank)  # ranks differ in T and K too
    return batch, random_keep(batch, 0.5, seed=10 + rank)


BIG = LLAMA_ABOVE_FIRST_BUCKET


def _worker(rank: int, init: str, out: str, backend: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = BIG("sdpa").train()
        ddp = torch.nn.parallel.DistributedDataParallel(regate_fx.sparsify(model, backend=backend))
        batch, keep = _rank_inputs(rank)
        res = ddp(**batch, keep_mask=keep)
        res.loss.backward()
        under_ddp = (res.loss.detach(), grads(model))
        # The same model outside DDP: the graph dynamo cached under DDP serves this call too.
        model.zero_grad(set_to_none=True)
        res = model(**batch, keep_mask=keep)
        res.loss.backward()
        torch.save({"ddp": under_ddp, "alone": (res.loss.detach(), grads(model))}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_ddp_of_a_model_above_the_first_bucket_averages_the_sparse_gradients(tmp_path):
    assert sum(p.numel() * p.element_size() for p in BIG().parameters()) > 2 * dist._DEFAULT_FIRST_BUCKET_BYTES
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), "aot_eager"), WORLD)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    losses, per_rank = _sparse_per_rank(BIG)
    want = {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}
    for r in range(WORLD):
        loss, g = got[r]["ddp"]
        assert_close(loss, losses[r], f"rank {r} loss under DDP", atol=LOSS_ATOL, rtol=0)
        assert_grads_close(g, want)  # DDP averages the ranks' gradients
        loss, g = got[r]["alone"]  # then outside DDP: its own sparse step, not averaged
        assert_close(loss, losses[r], f"rank {r} loss outside DDP", atol=LOSS_ATOL, rtol=0)
        assert_grads_close(g, per_rank[r])


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


def _sparse_per_rank(tm):
    """Each rank's loss and gradients, computed in this process; the loss also equals the oracle's."""
    model = tm("sdpa").train()
    smodel = regate_fx.sparsify(model, backend="eager")
    losses, per_rank = [], []
    for r in range(WORLD):
        model.zero_grad(set_to_none=True)
        batch, keep = _rank_inputs(r)
        loss = smodel(**batch, keep_mask=keep).loss
        loss.backward()
        assert_close(loss.detach(), regate_fx.oracle(model, batch, keep)[1].detach(), "loss", atol=LOSS_ATOL, rtol=0)
        losses.append(loss.detach())
        per_rank.append(grads(model))
    return losses, per_rank


def _want_mean_of_ranks():
    per_rank = _sparse_per_rank(TM)[1]
    return {n: sum(g[n] for g in per_rank) / WORLD for n in per_rank[0]}


@pytest.mark.slow  # CI time: per-layer FSDP2 (tests/test_fsdp_per_layer.py, torchrun, accelerate) runs by default
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
    assert "fully_shard(model) only" in msg and "model.layers.0" in msg and "execution='gathered'" in msg
