"""ReGATE data-parallel: Accelerate (DDP) or FSDP2, the teacher cache computed across the ranks.

    python examples/stacks/accelerate_fsdp.py --steps 6             # spawns 2 CPU processes (gloo), DDP
    python examples/stacks/accelerate_fsdp.py --steps 6 --fsdp2     # the same with fully_shard(model)
    accelerate launch --num_processes 2 examples/stacks/accelerate_fsdp.py --steps 6   # or torchrun

Per rank: a shard of the data; per step: the rank's keep mask, the loss normalised by the kept
supervised tokens of *all* ranks (so the averaged gradient is the one of the global batch), and
``rg.update`` (a collective: every rank ends the step with the same ReGate state). With ``--fsdp2`` the
model is sharded as a whole (``fully_shard(model)``): parameters, gradients and optimizer state stay
sharded between steps and the sparse step gathers them once; per-layer sharding is refused (see
docs/stacks/accelerate-fsdp.md). Replace ``tiny.*`` with your model and data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import regate_fx

try:
    from examples.stacks import tiny
except ImportError:  # run as a script from this folder
    import tiny


def train(args) -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # find_unused_parameters: the tiny LLaVA's vision tower has a layer norm its forward never uses
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(args.out)
    model = tiny.llava()
    data = [{**s, "sample_id": i} for i, s in enumerate(tiny.dataset(64, images=True))]

    # The teacher pass, data-parallel: each rank computes a share of the batches, rank 0 finalises.
    teacher = regate_fx.text_only_teacher(model)
    cache = regate_fx.TeacherCache.compute(out / "teacher-cache", teacher, data, progress=False)
    cfg = regate_fx.ReGateConfig(visual_token_ids=teacher.visual_token_ids, warmup_steps=1, cycle_steps=3,
                                 dense_steps=1)
    rg = regate_fx.ReGate(cfg, num_samples=len(data), teacher_cache=cache)

    regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False), backend=args.backend)
    model.train()
    if args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)  # the whole model: FSDP2's hooks run around the sparse step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                         collate_fn=regate_fx.ReGateCollator(pad_token_id=tiny.PAD))
    if args.fsdp2:
        opt, loader = accelerator.prepare(opt, loader)
    else:
        model, opt, loader = accelerator.prepare(model, opt, loader)  # DDP over the sparsified model

    batches = iter(loader)
    for step in range(args.steps):
        batch = next(batches)
        keep = rg.keep_mask(batch, step)
        n = regate_fx.counted_predictions(keep, batch["labels"]).sum()
        n_all = accelerator.reduce(n, reduction="sum")  # kept supervised tokens of the global batch
        out_ = model(**regate_fx.model_inputs(batch), keep_mask=keep)
        loss = out_.token_loss.sum() / n_all.clamp(min=1) * world  # DDP / FSDP average over ranks
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rg.update(batch, out_.token_loss, keep)  # collective
        mean = accelerator.reduce(loss.detach(), reduction="sum") / world  # the global batch's mean
        if rank == 0:
            print(f"step {step:3d}  rho {rg.rho(step):.2f}  loss {float(mean):.4f}")
    stats = rg.token_stats()  # global counts, the same on every rank
    if rank == 0:
        print(f"{world} ranks; tokens processed {stats['tokens_processed']} of {stats['tokens_dense']}")
    accelerator.wait_for_everyone()
    return stats


def _spawned(rank: int, world: int, init: str, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)  # Accelerate adopts it
    try:
        train(parse(argv))
    finally:
        dist.destroy_process_group()


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="samples per rank and step")
    ap.add_argument("--fsdp2", action="store_true", help="shard the model with torch's fully_shard")
    ap.add_argument("--procs", type=int, default=2, help="processes to spawn when not launched by torchrun")
    ap.add_argument("--backend", default="eager", help="torch.compile backend after the pass (inductor on GPU)")
    ap.add_argument("--out", default="out/accelerate_fsdp")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if "RANK" in os.environ:  # launched by accelerate launch / torchrun
        train(args)
        return
    with tempfile.TemporaryDirectory() as tmp:  # a file rendezvous: no port to pick
        torch.multiprocessing.spawn(_spawned, args=(args.procs, f"file://{tmp}/pg", argv), nprocs=args.procs,
                                    join=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
