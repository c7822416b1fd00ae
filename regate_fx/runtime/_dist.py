"""torch.distributed helpers: ragged all-gather in rank order (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "all_reduce_sum", "distributed_active"]


def distributed_active(flag: bool | None = None) -> bool:
    """Whether to synchronise across ranks: ``flag`` if given, else whether a group is initialised."""
    if flag is not None:
        if flag and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first or pass distributed=None"
            )
        return flag
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (``[n_rank, ...]``, ragged in n) along dim 0, in rank order.

    Returns a CPU tensor; every rank gets the same result.
    """
    dev = _comm_device()
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    m = max(counts)
    buf = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.to(dev)
    outs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(outs, buf)
    return torch.cat([o[:c] for o, c in zip(outs, counts)]).cpu()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks; returns a CPU tensor."""
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()
