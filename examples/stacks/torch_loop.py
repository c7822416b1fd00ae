"""ReGATE in a plain PyTorch training loop: an MLLM (a tiny LLaVA), gradient accumulation, gradient
checkpointing, atomic checkpoints and resume.

    python examples/stacks/torch_loop.py --steps 12
    python examples/stacks/torch_loop.py --steps 12 --grad-accum 2 --gradient-checkpointing
    python examples/stacks/torch_loop.py --steps 20 --resume          # continues from --out/ckpt.pt

Replace ``tiny.llava()`` / ``tiny.dataset()`` with your model and data (see examples/stacks/tiny.py).
On a GPU use ``--backend inductor`` (the default of ``regate_fx.sparsify``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import regate_fx

try:
    from examples.stacks import tiny
except ImportError:  # run as a script from this folder
    import tiny


def batches_of_step(step: int, num_samples: int, micro: int, batch: int) -> list[list[int]]:
    """Dataset indices of the micro-batches of optimizer step ``step``: a fixed permutation per epoch,
    so that a resumed run sees exactly the batches an uninterrupted one would."""
    per_step = micro * batch
    steps_per_epoch = num_samples // per_step
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch)).tolist()
    chunk = order[i * per_step:(i + 1) * per_step]
    return [chunk[m * batch:(m + 1) * batch] for m in range(micro)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps in total")
    ap.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--backend", default="eager", help="torch.compile backend after the pass (inductor on GPU)")
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    ap.add_argument("--out", default="out/torch_loop")
    args = ap.parse_args(argv)
    out = Path(args.out)

    model = tiny.llava()
    data = tiny.dataset(64, images=True)  # each sample's id is its index (collate's default)

    # 1. Once, before training: the frozen text-only teacher's reference losses, cached on disk.
    teacher = regate_fx.text_only_teacher(model)
    cache = regate_fx.TeacherCache.compute(out / "teacher-cache", teacher, data, progress=False)

    # 2. The runtime (keep masks, difficulty EMA) and the sparsified model (in place).
    cfg = regate_fx.ReGateConfig(visual_token_ids=teacher.visual_token_ids, warmup_steps=2, cycle_steps=4,
                                 dense_steps=1)  # short schedule for a short demo; defaults: docs/runtime.md
    rg = regate_fx.ReGate(cfg, num_samples=len(data), teacher_cache=cache)
    regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False), backend=args.backend)
    if args.gradient_checkpointing:  # recomputed inside the sparse graph (docs/stacks/torch.md)
        # transformers >= 5.25 names it activation_checkpointing_enable (the old name warns, and goes in v6)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    start = 0
    ckpt = out / "ckpt.pt"
    if args.resume and ckpt.exists():  # everything a bit-identical continuation needs
        state = regate_fx.load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rg.load_state_dict(state["regate"])  # forgetting this raises ReGateStateError at the next keep_mask
        start = state["step"]

    losses = []
    for step in range(start, args.steps):
        micro = [regate_fx.collate([data[i] for i in idx], pad_token_id=tiny.PAD, indices=idx)
                 for idx in batches_of_step(step, len(data), args.grad_accum, args.batch)]
        # 3. Keep masks for every micro-batch of the step, from the state at its start; the normaliser
        #    is the kept supervised predictions of the whole step (not a mean per micro-batch).
        keeps = [rg.keep_mask(b, step) for b in micro]
        n = sum(int(regate_fx.counted_predictions(k, b["labels"]).sum()) for b, k in zip(micro, keeps))
        total = 0.0
        for b, keep in zip(micro, keeps):
            out_ = model(**regate_fx.model_inputs(b), keep_mask=keep)
            loss = out_.token_loss.sum() / max(n, 1)
            loss.backward()
            rg.update(b, out_.token_loss, keep)  # after each micro-batch
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            regate_fx.save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "regate": rg.state_dict(), "step": step + 1})  # atomic
        print(f"step {step:3d}  rho {rg.rho(step):.2f}  loss {total:.4f}")
    stats = rg.token_stats()
    print(f"tokens processed {stats['tokens_processed']} of {stats['tokens_dense']} "
          f"({100 * stats['reduction']:.1f}% elided)")
    return {"losses": losses, "stats": stats}


if __name__ == "__main__":
    main()
