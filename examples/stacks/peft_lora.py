"""ReGATE with PEFT LoRA: sparsify the model, wrap it with get_peft_model; only adapters train.

    python examples/stacks/peft_lora.py --steps 8

The keep mask passes through the PeftModel to the sparsified base model. The adapter is saved and
reloaded as usual (``PeftModel.from_pretrained``). Replace ``tiny.*`` with your model and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import regate_fx

try:
    from examples.stacks import tiny
except ImportError:  # run as a script from this folder
    import tiny


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backend", default="eager", help="torch.compile backend after the pass (inductor on GPU)")
    ap.add_argument("--out", default="out/peft_lora")
    args = ap.parse_args(argv)
    out = Path(args.out)

    base = tiny.llava()
    data = tiny.dataset(32, images=True)
    teacher = regate_fx.text_only_teacher(base)  # the frozen base, before any adapter
    cache = regate_fx.TeacherCache.compute(out / "teacher-cache", teacher, data, progress=False)
    rg = regate_fx.ReGate(regate_fx.ReGateConfig(visual_token_ids=teacher.visual_token_ids, warmup_steps=1,
                                                 cycle_steps=3, dense_steps=1),
                          num_samples=len(data), teacher_cache=cache)

    regate_fx.sparsify(base, regate_fx.SparsifyConfig(return_logits=False, progress=False), backend=args.backend)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    model.print_trainable_parameters()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.steps):
        idx = [(step * args.batch + i) % len(data) for i in range(args.batch)]
        batch = regate_fx.collate([data[i] for i in idx], pad_token_id=tiny.PAD, indices=idx)
        keep = rg.keep_mask(batch, step)
        out_ = model(**regate_fx.model_inputs(batch), keep_mask=keep)
        out_.loss.backward()  # one micro-batch per step: the mean over its kept supervised tokens
        opt.step()
        opt.zero_grad(set_to_none=True)
        rg.update(batch, out_.token_loss, keep)
        print(f"step {step:3d}  rho {rg.rho(step):.2f}  loss {float(out_.loss.detach()):.4f}")

    model.save_pretrained(out / "adapter")  # adapter weights only, standard PEFT format
    reloaded = PeftModel.from_pretrained(tiny.llava(), out / "adapter")
    same = all(torch.equal(a, b) for (n, a), (_, b) in zip(
        sorted((n, p) for n, p in model.named_parameters() if "lora_" in n),
        sorted((n, p) for n, p in reloaded.named_parameters() if "lora_" in n)))
    print(f"adapter reloaded: {same}; tokens elided {100 * rg.token_stats()['reduction']:.1f}%")
    return {"stats": rg.token_stats(), "reloaded_equal": same}


if __name__ == "__main__":
    main()
