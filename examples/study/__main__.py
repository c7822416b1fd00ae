"""The ReGATE study: does a small multimodal model learn faster, or better, with ReGATE? (``--help``)

    python -m examples.study            # the default run: 1 seed; dense, regate, random; the tuned lrs
    python -m examples.study --full     # the full study: lr sweep on seed 100, then seeds 0 1 2, every run
    python -m examples.study --quick    # the pipeline end to end at toy sizes (CI)

Every run trains to its plateau (early stopping on validation accuracy, the same rule for all) and
writes its record to OUT/runs/ when it stops; a rerun skips the finished runs (resumable).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from .train import RunSpec

# The study's ReGATE schedule (docs/study.md says how it was chosen): W = 30, cycles of C = 10 steps
# whose first C_d = 2 are dense, rho_min = 0.2, beta = 0.7; the prompt kept visible (keep_context).
BASE = dict(warmup_steps=30, cycle_steps=10, dense_steps=2, rho_min=0.2, beta=0.7, keep_context=True)

# name -> (ReGateConfig fields or None for dense, masked, the lr it uses: tuned for "dense" or "regate")
ALL_RUNS = {
    "dense": (None, False, "dense"),  # the plain model, every token
    "regate": (dict(BASE, lam=0.5), False, "regate"),  # ReGATE, prompt kept visible
    "random": (dict(BASE, selection="random"), False, "regate"),  # same budget, random positions
    "dense_masked": (dict(BASE, lam=0.5), True, "regate"),  # dense compute, loss on ReGATE's picks
    "regate_lam0": (dict(BASE, lam=0.0), False, "regate"),  # student difficulty only
    "regate_lam1": (dict(BASE, lam=1.0), False, "regate"),  # teacher reference loss only
    "regate_pruned": (dict(BASE, lam=0.5, keep_context=False), False, "regate"),  # the paper read literally
}
DEFAULT_RUNS = ["dense", "regate", "random"]
SWEPT = ("dense", "regate")
GRID = [3e-4, 1e-3, 3e-3, 1e-2]
# The lrs the full study's sweep chose (docs/results/full/summary.json, "tuned_lr"); the default run uses them.
TUNED_LR = {"dense": 1e-3, "regate": 3e-4}


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m examples.study", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="study-out", help="output folder (default: study-out)")
    ap.add_argument("--full", action="store_true", help="the full study: lr sweep, seeds 0 1 2, every run")
    ap.add_argument("--quick", action="store_true", help="toy sizes: the pipeline end to end (CI)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="reported seeds (default 0; --full 0 1 2)")
    ap.add_argument("--runs", nargs="+", default=None, choices=list(ALL_RUNS))
    ap.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the lr sweep first (default: with --full / --quick)",
    )
    ap.add_argument("--sweep-seed", type=int, default=100, help="the sweep's seed (never a reported one)")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(GRID))
    ap.add_argument(
        "--sweep-lrs",
        type=float,
        nargs="+",
        default=None,
        help="run only these lrs of the grid now (parallel sweep processes; scripts/study.sh)",
    )
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep (no main runs, no report)")
    ap.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="no summary (a process of a parallel study; the last invocation writes it)",
    )
    ap.add_argument("--lr-dense", type=float, default=TUNED_LR["dense"], help="dense's lr without a sweep")
    ap.add_argument(
        "--lr-regate", type=float, default=TUNED_LR["regate"], help="lr of ReGATE and its controls without a sweep"
    )
    ap.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="the plateau rule's step cap (default 6000 with --full, 400 for the short default run)",
    )
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--min-steps", type=int, default=300, help="no plateau stop before this step")
    ap.add_argument(
        "--patience",
        type=int,
        default=None,
        help="evaluations without a new best before stopping (default 20 with --full, 8 for the short default run)",
    )
    ap.add_argument("--lr-warmup", type=int, default=20, help="linear lr warm-up steps (then constant)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warm-batches", type=int, default=3, help="batches of capture / first calls before timing")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=192)
    ap.add_argument("--test-size", type=int, default=512)
    ap.add_argument("--gen-samples", type=int, default=128, help="test samples whose answers are generated")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--backbone-steps", type=int, default=300)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--backend", default="eager", choices=["eager", "aot_eager", "inductor"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fig5-sample", type=int, default=3)
    ap.add_argument("--no-fig5", dest="fig5", action="store_false")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.quick_base = {}
    if args.quick:
        for k, v in dict(
            max_steps=16,
            eval_every=4,
            patience=3,
            min_steps=8,
            train_size=128,
            val_size=32,
            test_size=32,
            gen_samples=8,
            hidden=32,
            layers=2,
            heads=2,
            kv_heads=1,
            intermediate=64,
            backbone_steps=12,
            vision_steps=12,
            lr_warmup=4,
            warm_batches=1,
        ).items():
            setattr(args, k, v)
        if args.lr_grid == GRID:
            args.lr_grid = [1e-3, 3e-3]
        args.quick_base = dict(warmup_steps=4, cycle_steps=5, dense_steps=1)
    if args.max_steps is None:
        args.max_steps = 6000 if args.full else 400
    if args.patience is None:  # accuracy can sit flat for a few hundred steps and then climb again
        args.patience = 20 if args.full else 8
    if args.seeds is None:
        args.seeds = [0, 1, 2] if args.full else [0]
    if args.runs is None:
        args.runs = list(ALL_RUNS) if (args.full or args.quick) else list(DEFAULT_RUNS)
    if args.sweep is None:
        args.sweep = args.full or args.quick
    if args.sweep and args.sweep_seed in args.seeds:
        ap.error(f"--sweep-seed {args.sweep_seed} is a reported seed: tune on another one")
    return args


def specs(args, lr: dict) -> list[RunSpec]:
    """The main runs, each at the lr tuned for its family."""
    out = []
    for name in args.runs:
        cfg, masked, fam = ALL_RUNS[name]
        cfg = None if cfg is None else dict(cfg, **args.quick_base)
        out.append(RunSpec(name, cfg, lr=lr[fam], masked=masked))
    return out


def sweep_specs(args, lrs=None) -> list[RunSpec]:
    out = []
    for fam in SWEPT:
        cfg = ALL_RUNS[fam][0]
        for lr in lrs or args.lr_grid:
            out.append(RunSpec(f"{fam}_lr{lr:g}", None if cfg is None else dict(cfg, **args.quick_base), lr=lr))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from . import pipeline, report
    from .plan import Plan, Plateau

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_sweep = len(sweep_specs(args)) if args.sweep else 0
    rule = Plateau(args.eval_every, args.patience, args.max_steps, args.min_steps).rule()
    plan = Plan(out, n_sweep + len(args.runs) * len(args.seeds), rule)
    pipeline.log(
        f"plan: {n_sweep} sweep runs (seed {args.sweep_seed}) + {len(args.runs)} runs x seeds "
        f"{args.seeds}; {plan.progress()}"
    )
    prep_s = {}
    lr = {"dense": args.lr_dense, "regate": args.lr_regate}
    if args.sweep:
        sw = sweep_specs(args, args.sweep_lrs)
        if not all(plan.done("sweep", args.sweep_seed, s.name, s.lr) for s in sw):
            prep = pipeline.prepare(args.sweep_seed, out, args)
            prep_s[args.sweep_seed] = prep["prep_s"]
            pipeline.run_group("sweep", sw, prep, out, plan, args)
        if args.sweep_only:
            pipeline.log(f"sweep runs done: {', '.join(s.name for s in sw)} ({time.perf_counter() - t0:.0f} s)")
            return 0
        lr = report.tuned_lr(plan, args)
        pipeline.log(
            f"tuned lr (best val acc on seed {args.sweep_seed}): " + ", ".join(f"{k} {v:g}" for k, v in lr.items())
        )
    for seed in args.seeds:
        sp = specs(args, lr)
        if all(plan.done("main", seed, s.name, s.lr) for s in sp):
            pipeline.log(f"[main seed {seed}] all {len(sp)} runs already finished: skipped")
            continue
        prep = pipeline.prepare(seed, out, args)
        prep_s[seed] = prep["prep_s"]
        pipeline.run_group("main", sp, prep, out, plan, args)
    if args.report:
        report.write(out, plan, args, lr, prep_s, time.perf_counter() - t0)
    pipeline.log(f"total {time.perf_counter() - t0:.0f} s this invocation; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
