"""ReGATE with TRL's SFTTrainer: TRL tokenizes the text, and the ReGate is built on what it built.

    python examples/stacks/trl_sft.py --steps 8
    python examples/stacks/trl_sft.py --steps 8 --lora          # PEFT LoRA through SFTTrainer's peft_config

``regate=`` takes a function of the prepared training set, so the teacher cache is computed on exactly
the token ids TRL trains on. Replace ``tiny.*`` with your model, tokenizer and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
from trl import SFTConfig

import regate_fx

try:
    from examples.stacks import tiny
except ImportError:  # run as a script from this folder
    import tiny


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--backend", default="eager", help="torch.compile backend after the pass (inductor on GPU)")
    ap.add_argument("--out", default="out/trl_sft")
    args = ap.parse_args(argv)
    out = Path(args.out)

    model = tiny.llama()
    train = datasets.Dataset.from_list(tiny.text_rows(64))
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                       bf16=False, max_length=None)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    def make_regate(train_dataset) -> regate_fx.ReGate:  # called with TRL's tokenized training set
        teacher = regate_fx.text_only_teacher(model)
        cache = regate_fx.TeacherCache.compute(out / "teacher-cache", teacher, train_dataset, progress=False)
        cfg = regate_fx.ReGateConfig(warmup_steps=2, cycle_steps=4, dense_steps=1)  # short demo schedule
        return regate_fx.ReGate(cfg, num_samples=len(train_dataset), teacher_cache=cache)

    # --- the ReGATE lines -------------------------------------------------------------------
    model = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False),
                               backend=args.backend)
    trainer = regate_fx.ReGateSFTTrainer(model=model, args=config, train_dataset=train,
                                         processing_class=tiny.tokenizer(), regate=make_regate, peft_config=peft_config)
    # -----------------------------------------------------------------------------------------
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    print(f"last loss {logs[-1]['loss']:.4f}, kept {100 * logs[-1]['regate/kept_fraction']:.1f}% of the tokens")
    return {"log_history": trainer.state.log_history, "stats": trainer.regate.token_stats()}


if __name__ == "__main__":
    main()
