"""Launched by tests/stacks/test_torchrun.py with `python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/stacks/torchrun_worker.py OUT`: the env:// rendezvous a user's torchrun job
has (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by torchrun), gloo on CPU.

Each rank runs, on its own batch and keep mask (the spawn tests' `_rank_inputs`):
- DDP over a sparsified Llama above DDP's first gradient bucket (tests/test_distributed.py);
- per-layer FSDP2 (`fully_shard` on every decoder layer, then the root) with
  `SparsifyConfig(execution="gathered")` (tests/test_fsdp_per_layer.py), then `ReGate.update`;
and saves its loss and full gradients to OUT/rank{RANK}.pt for the launching test to compare.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import regate_fx
from tests.helpers import grads
from tests.runtime.runtime_helpers import exit_rank
from tests.test_distributed import BIG
from tests.test_distributed import _rank_inputs as ddp_inputs
from tests.test_fsdp_per_layer import TINY, _build
from tests.test_fsdp_per_layer import _rank_inputs as fsdp_inputs


def _ddp(rank: int) -> dict:
    model = BIG("sdpa").train()
    ddp = torch.nn.parallel.DistributedDataParallel(regate_fx.sparsify(model, backend="aot_eager"))
    batch, keep = ddp_inputs(rank)
    out = ddp(**batch, keep_mask=keep)
    out.loss.backward()
    return {"loss": out.loss.detach(), "grads": grads(model),
            "sparse_graphs": sum(1 for g in model.regate_report.graphs if g.sparse)}


def _fsdp_per_layer(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = _build(TINY, "shard_then_sparsify", False, False, mesh, sparse=True)  # execution="gathered"
    batch, keep = fsdp_inputs(TINY, rank)
    out = model(**batch, keep_mask=keep)
    out.loss.backward()
    batch["sample_id"] = torch.tensor([2 * rank, 2 * rank + 1])
    rg = regate_fx.ReGate(regate_fx.ReGateConfig(lam=0.0), num_samples=2 * world)
    rg.update(batch, out.token_loss.detach(), keep)  # a collective: the same state on every rank
    return {"loss": out.loss.detach().float(),
            "grads": {n: p.grad.full_tensor().float() for n, p in model.named_parameters()},
            "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "regate": rg.state_dict()["store"]}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://, from torchrun's variables
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        res = {"world": world, "package": regate_fx.__file__, "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
               "ddp": _ddp(rank), "fsdp_per_layer": _fsdp_per_layer(rank, world)}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


if __name__ == "__main__":
    main(sys.argv[1])
