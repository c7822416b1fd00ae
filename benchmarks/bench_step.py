"""Time one training step (forward + backward): dense vs ReGATE-sparse vs the oracle.

Variants, run interleaved in every round after a warm-up (so drifting machine load hits all alike):

    dense         the plain model on all T tokens (through torch.compile with --backend unless it
                  is "eager", then plain PyTorch)
    dense_graph   the sparsified model with a keep mask that keeps every token (K = T): the same
                  captured graph and loss code as `sparse`, through the same backend, on all
                  tokens; the fairest dense baseline for the rewrite (a call without keep_mask is
                  the plain model, i.e. `dense`)
    sparse        the sparsified model with a keep mask of exactly K = ceil(rho * T) positions
                  per sample (random, a new mask each round); default SparsifyConfig, so it also
                  returns the (B, T, V) logits, zero at pruned positions
    sparse_nologits  the same with SparsifyConfig(return_logits=False): loss and token_loss only,
                  what a training loop needs
    oracle        the plain model on the kept subsequence alone: a (B, K) batch of the kept
                  tokens, their original position ids, an all-ones attention mask, and the
                  original next-token labels (same backend as `dense`). Nothing can compute less.

Every variant computes logits and the mean cross-entropy of the counted predictions, then
``loss.backward()``. Reports medians (s) and the ratios sparse/dense, sparse/dense_graph,
sparse/oracle and oracle/dense as a rich table and one JSON line (``--out`` appends it to a file).

    .venv/bin/python benchmarks/bench_step.py                       # defaults below
    .venv/bin/python benchmarks/bench_step.py --seq 512 --backend aot_eager --out results.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers as tf
from rich.console import Console
from rich.table import Table

import regate_fx

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

VARIANTS = ("dense", "dense_graph", "sparse", "sparse_nologits", "oracle")


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads,
                         max_position_embeddings=max(args.seq, 2048), pad_token_id=0)
    cfg._attn_implementation = args.attn
    return tf.LlamaForCausalLM(cfg).to(DTYPES[args.dtype]).train()


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 (logits (B, N, V), target (B, N))."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


def plain_step(model, input_ids, attention_mask, position_ids, target):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    return ce(logits, target)


def keep_exact(b: int, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A bool (B, T) mask with exactly k random positions per sample."""
    idx = torch.rand(b, t, generator=g).topk(k, dim=1).indices  # (B, K)
    return torch.zeros(b, t, dtype=torch.bool).scatter_(1, idx, True)


def _git_state() -> str:
    """`<commit>[+dirty]` of the checkout the benchmark runs from, or 'unknown'."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _cpu_idle_fraction(seconds: float) -> float | None:
    """Fraction of all CPUs idle over `seconds` (Linux /proc/stat), None where unavailable."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    try:
        i0, t0 = read()
        time.sleep(seconds)
        i1, t1 = read()
    except OSError:
        return None
    return (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_wait: float, threshold: float = 0.9) -> float | None:
    """Wait (at most `max_wait` s) until other processes leave the CPUs >= `threshold` idle."""
    deadline = time.monotonic() + max_wait
    idle = None
    while True:
        idle = _cpu_idle_fraction(0.5)
        if idle is None or idle >= threshold or time.monotonic() >= deadline:
            return idle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="forward+backward step time: dense vs ReGATE-sparse vs oracle")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="key/value heads (default: --heads)")
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rho", type=float, default=0.4)
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compiles happen here)")
    ap.add_argument("--backend", default="eager", choices=["eager", "aot_eager", "inductor"])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each timed round, wait up to this many seconds for the CPUs to be >= 90%% idle "
                         "(Linux; for shared machines). 0 = off")
    ap.add_argument("--out", default=None, help="append the JSON result line to this file")
    args = ap.parse_args(argv)
    if not 0.0 < args.rho <= 1.0:
        ap.error("--rho must be in (0, 1]")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    console = Console() if sys.stdout.isatty() else Console(width=120)

    model = build_model(args)
    # sparsify works in place: the return_logits=False variant runs on a copy (same weights)
    smodel_nl = regate_fx.sparsify(copy.deepcopy(model), regate_fx.SparsifyConfig(return_logits=False),
                                   backend=args.backend)
    smodel = regate_fx.sparsify(model, backend=args.backend)
    plain = plain_step if args.backend == "eager" else torch.compile(plain_step, backend=args.backend, dynamic=False)

    b, t = args.batch, args.seq
    k = math.ceil(args.rho * t)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, args.vocab, (b, t), generator=g)
    labels = ids.clone()
    target = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): label of the prediction at p
    ones_t = torch.ones(b, t, dtype=torch.long)
    pos_t = torch.arange(t).expand(b, t)
    ones_k = torch.ones(b, k, dtype=torch.long)
    keep_all = torch.ones(b, t, dtype=torch.bool)

    def run(variant: str, keep: torch.Tensor) -> tuple[float, float, float]:
        model.zero_grad(set_to_none=True)
        smodel_nl.zero_grad(set_to_none=True)
        if variant == "oracle":  # gather outside the timed region: the oracle is given its batch
            idx = keep.nonzero()[:, 1].view(b, k)  # (B, K) kept positions, ascending
            sub_ids, sub_target = ids.gather(1, idx), target.gather(1, idx)
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "dense":
            loss = plain(model, ids, ones_t, pos_t, target)
        elif variant == "dense_graph":
            loss = smodel(input_ids=ids, attention_mask=ones_t, labels=labels, keep_mask=keep_all).loss
        elif variant == "sparse":
            loss = smodel(input_ids=ids, attention_mask=ones_t, labels=labels, keep_mask=keep).loss
        elif variant == "sparse_nologits":
            loss = smodel_nl(input_ids=ids, attention_mask=ones_t, labels=labels, keep_mask=keep).loss
        else:
            loss = plain(model, sub_ids, ones_k, idx, sub_target)
        loss.backward()
        return time.perf_counter() - t0, time.process_time() - c0, loss.item()

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    idle_seen: list[float] = []
    check = None
    t_start = time.perf_counter()
    with console.status("benchmarking") as status:
        for r in range(args.warmup + args.rounds):
            keep = keep_exact(b, t, k, g)
            if args.wait_idle > 0 and r >= args.warmup:
                status.update(f"round {r + 1}: waiting for idle CPUs")
                idle = wait_for_idle(args.wait_idle)
                if idle is not None:
                    idle_seen.append(idle)
            losses = {}
            for v in VARIANTS:
                status.update(f"round {r + 1}/{args.warmup + args.rounds} ({'warm-up' if r < args.warmup else 'timed'}): {v}")
                dt, dc, losses[v] = run(v, keep)
                if r >= args.warmup:
                    times[v].append(dt)
                    cpu[v].append(dc)
            if check is None:  # sanity: sparse equals the oracle, dense_graph equals dense
                check = {"sparse_vs_oracle_loss": max(abs(losses[v] - losses["oracle"])
                                                      for v in VARIANTS if v.startswith("sparse")),
                         "dense_graph_vs_dense_loss": abs(losses["dense_graph"] - losses["dense"])}
    load_after = os.getloadavg()

    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    ratios = {
        "sparse/dense": med["sparse"] / med["dense"],
        "sparse/dense_graph": med["sparse"] / med["dense_graph"],
        "sparse/oracle": med["sparse"] / med["oracle"],
        "oracle/dense": med["oracle"] / med["dense"],
    }
    ratios["sparse_nologits/dense"] = med["sparse_nologits"] / med["dense"]
    ratios["sparse_nologits/oracle"] = med["sparse_nologits"] / med["oracle"]
    result = {
        "bench": "bench_step",
        "config": {k_: v for k_, v in vars(args).items() if k_ != "out"} | {"kept_per_sample": k},
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "transformers": tf.__version__,
                    "git": _git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "median_s": {v: round(m, 4) for v, m in med.items()},
        "min_s": {v: round(min(ts), 4) for v, ts in times.items()},
        "median_cpu_s": {v: round(m, 4) for v, m in med_cpu.items()},
        "idle_before_rounds": [round(x, 2) for x in idle_seen],
        "ratios": {k_: round(v, 3) for k_, v in ratios.items()},
        "ratios_cpu": {r_: round(med_cpu[r_.split("/")[0]] / med_cpu[r_.split("/")[1]], 3) for r_ in ratios},
        "check": {k_: float(f"{v:.3g}") for k_, v in (check or {}).items()},
        "total_s": round(time.perf_counter() - t_start, 1),
    }

    console.print(f"train step (fwd+bwd): {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
                  f"B {b}, T {t}, rho {args.rho} (K={k}), {args.dtype}, backend {args.backend}, "
                  f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    table = Table()
    table.add_column("variant")
    table.add_column("median s", justify="right")
    table.add_column("min s", justify="right")
    table.add_column("x dense", justify="right")
    table.add_column("median CPU s", justify="right")
    for v in VARIANTS:
        table.add_row(v, f"{med[v]:.4f}", f"{min(times[v]):.4f}", f"{med[v] / med['dense']:.3f}",
                      f"{med_cpu[v]:.3f}")
    console.print(table)
    console.print("ratios: " + ", ".join(f"{k_} {v:.3f}" for k_, v in ratios.items()))
    console.print(f"check: |loss sparse - oracle| {check['sparse_vs_oracle_loss']:.2e}, "
                  f"|loss dense_graph - dense| {check['dense_graph_vs_dense_loss']:.2e}; "
                  f"load avg before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
