"""The ReGATE study: does a small multimodal model learn faster with ReGATE? (``--help``)

    python -m examples.study                 # the default run: one seed, dense / regate / random + Figure 5
    python -m examples.study --full          # the full study: 3 seeds, every run
    python -m examples.study --quick         # the pipeline end to end in under 2 minutes (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from .train import RunSpec

# The study's ReGATE configuration (docs/study.md says how it was chosen): W = 30, cycles of C = 10
# steps whose first C_d = 2 are dense, rho_min = 0.2, beta = 0.7, and the prompt kept visible.
BASE = dict(warmup_steps=30, cycle_steps=10, dense_steps=2, rho_min=0.2, beta=0.7, keep_context=True)

ALL_RUNS = {
    "dense": None,                                        # the plain model, every token
    "regate": dict(BASE, lam=0.5, keep_context=False),    # the paper read literally: the prompt is pruned too
    "regate_lam0": dict(BASE, lam=0.0),                   # student difficulty only
    "regate_lam1": dict(BASE, lam=1.0),                   # teacher reference loss only
    "random": dict(BASE, selection="random"),             # same budget as regate_context, random positions
    "regate_context": dict(BASE, lam=0.5),                # ReGATE with the prompt kept visible (recommended)
}
DEFAULT_RUNS = ["dense", "regate_context", "random"]


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m examples.study", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="study-out", help="output folder (default: study-out)")
    ap.add_argument("--full", action="store_true", help="the full study: --seeds 0 1 2 and every run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the pipeline end to end (<= 2 min)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--runs", nargs="+", default=None, choices=list(ALL_RUNS))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=192)
    ap.add_argument("--test-size", type=int, default=512)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--backbone-steps", type=int, default=300)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--backend", default="eager", choices=["eager", "aot_eager", "inductor"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fig5-sample", type=int, default=3)
    ap.add_argument("--no-fig5", dest="fig5", action="store_false")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="RUN.FIELD=VALUE",
                    help="override a ReGateConfig field of one run (or all: '*.rho_min=0.3')")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in dict(steps=24, train_size=128, val_size=32, test_size=32, hidden=32, layers=2, heads=2,
                         kv_heads=1, intermediate=64, backbone_steps=20, vision_steps=20, eval_every=8).items():
            setattr(args, k, v)
        args.quick_base = dict(warmup_steps=4, cycle_steps=5, dense_steps=1)
    if args.seeds is None:
        args.seeds = [0, 1, 2] if args.full else [0]
    if args.runs is None:
        args.runs = list(ALL_RUNS) if (args.full or args.quick) else list(DEFAULT_RUNS)
    return args


def specs(args) -> list[RunSpec]:
    out = []
    for name in args.runs:
        cfg = None if ALL_RUNS[name] is None else dict(ALL_RUNS[name], **getattr(args, "quick_base", {}))
        for item in args.set:
            key, val = item.split("=", 1)
            run, field = key.split(".", 1)
            if cfg is not None and run in ("*", name):
                cfg[field] = json.loads(val) if val not in ("True", "False") else val == "True"
        out.append(RunSpec(name, cfg))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from . import pipeline, report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prep = pipeline.prepare(out, args)
    per_seed = []
    for seed in args.seeds:
        pipeline.log(f"--- seed {seed}: runs {', '.join(args.runs)} in lockstep, {args.steps} steps each")
        res = pipeline.run_seed(seed, specs(args), prep, out, args)
        res.pop("runs_obj")
        per_seed.append(res)
        (out / f"seed{seed}" / "result.json").write_text(json.dumps(res, indent=1))
    summary = report.write(out, per_seed, args, prep, time.perf_counter() - t0)
    pipeline.log(f"total {time.perf_counter() - t0:.0f} s; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
