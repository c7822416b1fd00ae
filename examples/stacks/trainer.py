"""ReGATE with the Hugging Face Trainer: three lines on top of an ordinary Trainer script.

    python examples/stacks/trainer.py --steps 8
    python examples/stacks/trainer.py --steps 8 --grad-accum 2 --gradient-checkpointing
    python examples/stacks/trainer.py --steps 12 --resume              # from the last checkpoint in --out

The model is an MLLM (a tiny LLaVA): images ride in the samples as ``pixel_values`` and pass through
``regate_fx.ReGateCollator``. Replace ``tiny.*`` with your model and data (examples/stacks/tiny.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import regate_fx

try:
    from examples.stacks import tiny
except ImportError:  # run as a script from this folder
    import tiny


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--backend", default="eager", help="torch.compile backend after the pass (inductor on GPU)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default="out/trainer")
    args = ap.parse_args(argv)
    out = Path(args.out)

    model = tiny.llava()
    train, evaluation = tiny.dataset(64, images=True), tiny.dataset(8, images=True, seed=1)
    teacher = regate_fx.text_only_teacher(model)  # before training: the frozen initial backbone
    cache = regate_fx.TeacherCache.compute(out / "teacher-cache", teacher, train, progress=False)
    cfg = regate_fx.ReGateConfig(visual_token_ids=teacher.visual_token_ids, warmup_steps=2, cycle_steps=4,
                                 dense_steps=1)  # short schedule for a short demo

    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-3, logging_steps=1, save_steps=4, eval_strategy="steps", eval_steps=4,
        report_to=[], use_cpu=True, disable_tqdm=True)

    # --- the ReGATE lines -------------------------------------------------------------------
    model = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False),
                               backend=args.backend)
    rg = regate_fx.ReGate(cfg, num_samples=len(train), teacher_cache=cache)
    trainer = regate_fx.ReGateTrainer(model=model, args=training_args, train_dataset=train,
                                      eval_dataset=evaluation, regate=rg)
    # -----------------------------------------------------------------------------------------
    resume = get_last_checkpoint(str(out)) if args.resume and out.exists() else None
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))  # an ordinary checkpoint: LlavaForConditionalGeneration.from_pretrained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    print(f"last loss {logs[-1]['loss']:.4f}, kept {100 * logs[-1]['regate/kept_fraction']:.1f}% of the tokens"
          + (f", eval loss (dense) {evals[-1]:.4f}" if evals else ""))
    return {"log_history": trainer.state.log_history, "stats": rg.token_stats()}


if __name__ == "__main__":
    main()
