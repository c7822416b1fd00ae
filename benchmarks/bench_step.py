"""One benchmark command: a training step (forward + backward) of dense vs ReGATE-sparse vs the oracle.

For every cell (backend x sequence length x attention-mask mode) it times, interleaved in every
round after untimed warm-up rounds (so drifting machine load hits all variants alike):

    dense          the plain model on all T tokens: plain PyTorch for --backends eager, plain
                   ``torch.compile(backend=...)`` of the same step otherwise
    sparse_r<rho>  ``regate_fx.sparsify(model, backend=...)`` with the default SparsifyConfig and a
                   keep mask of K = ceil(rho * T) random positions per sample (a new mask each
                   round); rho = 1 keeps every real token (the schedule's dense steps)
    oracle_r<rho>  the plain model on the kept subsequence alone: the (B, K) kept tokens, their
                   original position ids, an all-ones attention mask, the original next-token
                   labels (same backend as dense). The physical limit: nothing can compute less.
    sparse_logits_r<rho>   (--logits-variant) the same with SparsifyConfig(return_logits=True)
    sparse_padded_r<rho>   (--padded-variant) the same with SparsifyConfig(layout="padded"); the
                   default layout "auto" packs the kept tokens of a step whose (B, K) layout would
                   be >= 10% padding (--lengths mixed)
    nokeep         (--nokeep-variant) the sparsified model called without keep_mask

Every variant computes the mean cross-entropy of its counted predictions and calls backward.

Per variant: median / min step time, and the peak memory of one step above the memory allocated
before it (gradients included): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
allocator's own accounting as recorded by ``torch.profiler`` (``profile_memory=True``: every
allocation and free of PyTorch's CPU allocator, summed in order, maximum taken), in a separate
untimed step.

``--lengths mixed``: LLaVA-like samples (an image block of ``--image-frac`` x T tokens, then a
text tail) of lengths uniform in [25%, 100%] of T (the first sample is the longest), right-padded;
keep masks come from the runtime's own selection (image tokens protected, ceil(rho * |V_b|) of
each sample's candidates). Reports the padding waste of the dense (B, T) batch and of the sparse
(B, K) kept layout. The oracle is then each sample's kept subsequence run alone (B calls).

``--compile-time``: the first step (capture + pass + inner compile + the first run) of plain
``torch.compile`` and of ``sparsify``, each in a fresh process, with a cold and then a warm
compile cache (``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` in a fresh directory), broken
down by ``torch._dynamo.utils.compile_times()`` and a timer around the inner backend, with what
AOTAutograd's cache did. ``--compile-variants dense_dynamic`` adds plain
``torch.compile(dynamic=True)``, ``sparse_dynamic`` adds ``SparsifyConfig(dynamic=True)`` (symbolic
sizes from the first call; the default ``dynamic=None`` compiles the first graph for its sizes, as
plain ``torch.compile`` does). ``--second-seq N`` runs the second step at length N, as training on
batches of varying length does: plain ``torch.compile`` and the default sparse step then recompile
(with symbolic sizes), ``sparse_dynamic`` does not; the table adds the first two steps together.

Output: a rich table per cell, a summary table, and one JSON line per cell (``--out`` appends them).

    python benchmarks/bench_step.py                                  # the full matrix (long on CPU)
    python benchmarks/bench_step.py --seqs 2048 --backends eager --rhos 1 0.4 --attention-mask both
    python benchmarks/bench_step.py --lengths mixed --seqs 2048 --backends eager
    python benchmarks/bench_step.py --compile-time --backends inductor --seqs 512 --layers 4
    python benchmarks/bench_step.py --device cuda --dtype bf16 --preset 1b --seqs 4096 --rhos 0.4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's regate_fx, not an installed one
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import regate_fx  # noqa: E402
from regate_fx.runtime.selection import keep_from_scores  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Llama-style shapes. "small": the CPU model of docs/benchmarks.md; "1b": Llama-3.2-1B's shape
# (1.24 B parameters with tied embeddings), random weights.
PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tie=False),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=8192, tie=False),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True),
}

IGNORE = -100


# --- model and steps ----------------------------------------------------------------------------

def model_config(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    if getattr(args, "family", "llama") == "mixtral":
        cfg.update(family="mixtral", experts=args.num_experts, top_k=2, experts_impl=args.experts_impl)
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    return cfg


def build_model(args, device: torch.device) -> torch.nn.Module:
    c = model_config(args)
    torch.manual_seed(args.seed)
    common = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                  num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                  num_key_value_heads=c["kv_heads"], max_position_embeddings=max(max(args.seqs), 2048),
                  pad_token_id=0, tie_word_embeddings=c["tie"])
    if args.family == "mixtral":  # token-choice MoE: --num-experts experts, top-2, each expert the preset's MLP
        cfg = tf.MixtralConfig(**common, num_local_experts=args.num_experts, num_experts_per_tok=2)
        cfg._experts_implementation = args.experts_impl
        model_cls = tf.MixtralForCausalLM
    else:
        cfg, model_cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    cfg._attn_implementation = args.attn
    with torch.device(device):
        model = model_cls(cfg)
    return model.to(DTYPES[args.dtype]).train()


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 (logits (B, N, V), target (B, N))."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE)


def plain_step(model, input_ids, attention_mask, position_ids, target):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    return ce(logits, target)


def plain_step_cached(model, input_ids, attention_mask, position_ids, target):
    """plain_step with the model's default use_cache (True for Llama), as a training loop that
    passes no flag calls it. Under torch.compile transformers then skips its packed-sequence
    detection and, without an attention_mask, calls SDPA with is_causal=True instead of building
    a (B, 1, T, T) mask (docs/benchmarks.md)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return ce(logits, target)


_COPIES = iter(range(10**9))


def fresh_function(fn):
    """A copy of `fn` with its own code object: dynamo caches (and counts recompiles) per code
    object, so each compiled variant gets its own cache and recompile budget."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COPIES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def compiled_plain(backend: str, dynamic: bool | None = False, inner=None, step=plain_step):
    """A plain step as a user would run it: plain PyTorch for eager, torch.compile otherwise."""
    if backend == "eager" and inner is None:
        return step
    return torch.compile(fresh_function(step), backend=inner or backend, dynamic=dynamic)


# --- batches and keep masks ---------------------------------------------------------------------

def keep_exact(b: int, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A bool (B, T) mask with exactly k random positions per sample (all of them when k == t)."""
    if k >= t:
        return torch.ones(b, t, dtype=torch.bool)
    idx = torch.rand(b, t, generator=g).topk(k, dim=1).indices  # (B, K)
    return torch.zeros(b, t, dtype=torch.bool).scatter_(1, idx, True)


def mixed_batch(b: int, t: int, vocab: int, image_frac: float, g: torch.Generator) -> dict:
    """LLaVA-like right-padded batch: lengths uniform in [T/4, T] (sample 0 has T), an image block
    of round(image_frac * T) tokens (labels -100, protected) then a supervised text tail."""
    n_img = max(1, round(image_frac * t))
    lo = max(n_img + 2, math.ceil(t / 4))
    lengths = [t] + [int(x) for x in torch.randint(lo, t + 1, (b - 1,), generator=g)]
    ids = torch.randint(3, vocab, (b, t), generator=g)
    pos = torch.arange(t)[None, :]
    real = pos < torch.tensor(lengths)[:, None]  # (B, T)
    image = pos < n_img  # (1, T) -> broadcast
    image = image.expand(b, t) & real
    ids = ids.masked_fill(~real, 0)
    labels = ids.masked_fill(~real | image, IGNORE)
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels, "protected": image,
            "lengths": lengths, "image_tokens": n_img}


def runtime_keep(batch: dict, rho: float, g: torch.Generator) -> torch.Tensor:
    """The runtime's selection (protected + top ceil(rho |V_b|) of the candidates) on random scores."""
    real = batch["attention_mask"].bool()
    labels = batch["labels"]
    supervised = torch.zeros_like(real)
    supervised[:, :-1] = (labels[:, 1:] != IGNORE) & real[:, 1:] & real[:, :-1]
    candidates = supervised & ~batch["protected"]
    scores = torch.rand(real.shape, generator=g)
    return keep_from_scores(scores, real, batch["protected"], candidates, rho)


def layout_waste(keep: torch.Tensor) -> dict:
    counts = keep.sum(1)
    k = int(counts.max())
    return {"K": k, "kept": [int(c) for c in counts],
            "padding_waste": round(1 - float(counts.sum()) / (keep.size(0) * k), 4)}


# --- measurement --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler library's start/stop lines on fd 2 (exceptions still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes held by tensors allocated during fn() (PyTorch's CPU allocator, via the profiler's
    memory events: every allocation and free, summed in order)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch._C._autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
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
    while True:
        idle = _cpu_idle_fraction(0.5)
        if idle is None or idle >= threshold or time.monotonic() >= deadline:
            return idle


def machine(device: torch.device) -> dict:
    m = {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
         "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
         "torch": torch.__version__, "transformers": tf.__version__, "git": _git_state(),
         "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": str(device)}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    try:
        m["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return m


def rho_tag(rho: float) -> str:
    return f"r{rho:g}"


# --- one cell -----------------------------------------------------------------------------------

def run_cell(args, model, smodels: dict, backend: str, seq: int, mask_mode: str, device: torch.device,
             console: Console, status) -> dict:
    """Time every variant of one (backend, seq, mask mode) cell, interleaved."""
    mixed = args.lengths == "mixed"
    b = args.batch or (4 if mixed else 2)
    t = seq
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    if mixed:
        data = mixed_batch(b, t, vocab, args.image_frac, g)
        ids, am, labels = data["input_ids"], data["attention_mask"], data["labels"]
    else:
        ids = torch.randint(3, vocab, (b, t), generator=g)
        labels = ids.clone()
        am = torch.ones(b, t, dtype=torch.long) if mask_mode == "ones" else None
    ids, labels = ids.to(device), labels.to(device)
    am = am.to(device) if am is not None else None
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T): label of the prediction at p
    if am is not None:
        target = target.masked_fill(am == 0, IGNORE)
    # The sparse model marks its input tensors dynamic (torch._dynamo.maybe_mark_dynamic); a
    # compiled dense / oracle step given the same tensor objects would then recompile once.
    own = {"ids": ids.clone(), "am": am.clone() if am is not None else None, "target": target.clone()}
    plain = plain_step_cached if args.plain_use_cache else plain_step
    dense_fn = compiled_plain(backend, step=plain)
    oracle_fns = {rho: compiled_plain(backend, dynamic=None if mixed else False, step=plain) for rho in args.rhos}
    # The oracle's all-ones mask; with --plain-use-cache none (the cache makes transformers skip
    # its packed-sequence reading of the gapped positions, so no mask means plain causal).
    oracle_ones = not args.plain_use_cache
    smodel = smodels["default"]

    def keep_for(rho: float) -> torch.Tensor:
        if mixed:
            return runtime_keep(data, rho, g)
        return keep_exact(b, t, math.ceil(rho * t), g)

    variants: list[tuple[str, float | None]] = [("dense", None)]
    for rho in args.rhos:
        variants += [(f"sparse_{rho_tag(rho)}", rho), (f"oracle_{rho_tag(rho)}", rho)]
        if args.logits_variant:
            variants.append((f"sparse_logits_{rho_tag(rho)}", rho))
        if args.padded_variant:
            variants.append((f"sparse_padded_{rho_tag(rho)}", rho))
    if args.nokeep_variant:
        variants.append(("nokeep", None))

    def step(name: str, rho: float | None, keep: torch.Tensor | None):
        """The closure timing runs: everything the variant does from its inputs to its gradients."""
        kw = {"input_ids": ids, "labels": labels}
        if am is not None:
            kw["attention_mask"] = am
        if name == "dense":
            return lambda: plain_step_call(dense_fn, own["ids"], own["am"], None, own["target"])
        if name == "nokeep":
            return lambda: smodel(**kw).loss
        if name.startswith("sparse_logits"):
            return lambda: smodels["logits"](**kw, keep_mask=keep).loss
        if name.startswith("sparse_padded"):
            return lambda: smodels["padded"](**kw, keep_mask=keep).loss
        if name.startswith("sparse"):
            return lambda: smodel(**kw, keep_mask=keep).loss
        # oracle: gathered outside the timed region (the oracle is given its batch)
        fn = oracle_fns[rho]
        if not mixed:
            k = int(keep.sum(1)[0])
            idx = keep.nonzero()[:, 1].view(b, k)  # (B, K) kept positions, ascending
            sub = (own["ids"].gather(1, idx), torch.ones(b, k, dtype=torch.long, device=device) if oracle_ones else None,
                   idx, own["target"].gather(1, idx))
            return lambda: plain_step_call(fn, *sub)
        subs = []
        for i in range(b):
            idx = keep[i].nonzero()[:, 0][None]  # (1, K_b)
            subs.append((own["ids"][i:i + 1].gather(1, idx), torch.ones_like(idx) if oracle_ones else None, idx,
                         own["target"][i:i + 1].gather(1, idx)))

        def per_sample():  # sum of per-sample mean losses weighted by counts = the batch loss
            total, count = 0.0, 0
            for s in subs:
                n = int((s[3] != IGNORE).sum())
                loss = plain_step_call(fn, *s)
                total, count = total + loss * n, count + n
            return total / max(count, 1)
        return per_sample

    def plain_step_call(fn, i_, a_, p_, tgt):
        return fn(model, i_, a_, p_, tgt)

    times: dict[str, list[float]] = {v: [] for v, _ in variants}
    cpu: dict[str, list[float]] = {v: [] for v, _ in variants}  # process CPU time: robust to load with --threads 1
    losses: dict[str, float] = {}
    waste: dict[str, dict] = {}
    idle_seen = []
    order_rng = random.Random(args.seed)
    for r in range(args.warmup + args.rounds):
        keeps = {rho: keep_for(rho).to(device) for rho in args.rhos}
        for rho, keep in keeps.items():
            waste.setdefault(rho_tag(rho), layout_waste(keep.cpu()))
        if args.wait_idle > 0 and r >= args.warmup:
            status.update(f"{backend} T={t} {mask_mode}: round {r + 1}, waiting for idle CPUs")
            idle = wait_for_idle(args.wait_idle)
            if idle is not None:
                idle_seen.append(round(idle, 2))
        order = list(variants)
        order_rng.shuffle(order)
        for name, rho in order:
            phase = "warm-up (compiles)" if r < args.warmup else "timed"
            status.update(f"{backend} T={t} {mask_mode}: round {r + 1}/{args.warmup + args.rounds} {phase}: {name}")
            fn = step(name, rho, keeps.get(rho))
            model.zero_grad(set_to_none=True)
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            loss = fn()
            loss.backward()
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
            if r == args.warmup:
                losses[name] = float(loss.detach())
    model.zero_grad(set_to_none=True)

    peaks: dict[str, int] = {}
    if args.memory:
        for name, rho in variants:
            status.update(f"{backend} T={t} {mask_mode}: peak memory of {name}")
            fn = step(name, rho, keep_for(rho).to(device) if rho is not None else None)
            model.zero_grad(set_to_none=True)
            peaks[name] = peak_bytes(lambda: fn().backward(), device)
            model.zero_grad(set_to_none=True)

    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    ratios = {}
    for rho in args.rhos:
        tag = rho_tag(rho)
        ratios[f"sparse_{tag}/dense"] = med[f"sparse_{tag}"] / med["dense"]
        ratios[f"sparse_{tag}/oracle_{tag}"] = med[f"sparse_{tag}"] / med[f"oracle_{tag}"]
        if args.logits_variant:
            ratios[f"sparse_logits_{tag}/oracle_{tag}"] = med[f"sparse_logits_{tag}"] / med[f"oracle_{tag}"]
        if args.padded_variant:
            ratios[f"sparse_padded_{tag}/oracle_{tag}"] = med[f"sparse_padded_{tag}"] / med[f"oracle_{tag}"]
            ratios[f"sparse_{tag}/sparse_padded_{tag}"] = med[f"sparse_{tag}"] / med[f"sparse_padded_{tag}"]
        if peaks:
            ratios[f"mem sparse_{tag}/dense"] = peaks[f"sparse_{tag}"] / max(peaks["dense"], 1)
    if args.nokeep_variant:
        ratios["nokeep/dense"] = med["nokeep"] / med["dense"]
    check = {f"|loss sparse_{rho_tag(r_)} - oracle|": abs(losses[f"sparse_{rho_tag(r_)}"] - losses[f"oracle_{rho_tag(r_)}"])
             for r_ in args.rhos}
    result = {
        "bench": "bench_step", "kind": "step", "backend": backend, "seq": t, "batch": b,
        "attention_mask": "padding" if mixed else mask_mode, "lengths": args.lengths,
        "dtype": args.dtype, "attn": args.attn, "model": model_config(args),
        "plain_use_cache": args.plain_use_cache,
        "params": sum(p.numel() for p in model.parameters()), "rounds": args.rounds, "warmup": args.warmup,
        "machine": machine(device),
        "median_s": {v: round(m, 5) for v, m in med.items()},
        "min_s": {v: round(min(ts), 5) for v, ts in times.items()},
        "times_s": {v: [round(x, 5) for x in ts] for v, ts in times.items()},
        "median_cpu_s": {v: round(m, 5) for v, m in med_cpu.items()},
        "ratios_cpu": {k_: round(med_cpu[k_.split("/")[0]] / med_cpu[k_.split("/")[1]], 4)
                       for k_ in ratios if not k_.startswith("mem")},
        "peak_mib": {v: round(p / 2**20, 1) for v, p in peaks.items()},
        "memory_method": ("torch.cuda.max_memory_allocated above memory_allocated before the step"
                          if device.type == "cuda" else
                          "torch.profiler(profile_memory=True): CPU allocator allocations minus frees during the step, peak"),
        "ratios": {k_: round(v, 4) for k_, v in ratios.items()},
        "kept_layout": waste,
        "check": {k_: float(f"{v:.3g}") for k_, v in check.items()},
        "idle_before_rounds": idle_seen,
    }
    graph = smodel.regate_report.sparse_graph
    if graph is not None:  # what the pass did: a slow number is read against this
        result["rewrite"] = {"branches_rewritten": smodel.regate_report.num_rewritten,
                             "refused": len(smodel.regate_report.refused), "regions": len(graph.regions),
                             "tail_on_kept": graph.tail_on_kept, "causal_masks": graph.causal_masks,
                             "layouts": sorted({g.layout for g in smodel.regate_report.graphs if g.sparse}),
                             "gathered_inputs": list(graph.gathered_inputs or [])}
    if mixed:
        lengths = data["lengths"]
        result["lengths_per_sample"] = lengths
        result["image_tokens"] = data["image_tokens"]
        result["dense_padding_waste"] = round(1 - sum(lengths) / (b * t), 4)

    table = Table(title=f"{backend}, T={t}, B={b}, attention_mask={result['attention_mask']}, "
                        f"lengths={args.lengths}, {args.dtype}, {result['params'] / 1e6:.1f} M params")
    for col in ("variant", "median s", "min s", "x dense", "x oracle", "CPU s", "CPU x oracle", "peak MiB",
                "mem x dense", "K", "layout waste"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, rho in variants:
        ref = f"oracle_{rho_tag(rho)}" if rho is not None else None
        w = waste.get(rho_tag(rho)) if rho is not None else None
        table.add_row(name, f"{med[name]:.4f}", f"{min(times[name]):.4f}", f"{med[name] / med['dense']:.3f}",
                      f"{med[name] / med[ref]:.3f}" if ref and name != ref else "",
                      f"{med_cpu[name]:.3f}", f"{med_cpu[name] / med_cpu[ref]:.3f}" if ref and name != ref else "",
                      f"{peaks[name] / 2**20:.0f}" if name in peaks else "",
                      f"{peaks[name] / max(peaks['dense'], 1):.2f}" if name in peaks else "",
                      str(w["K"]) if w else "", f"{w['padding_waste']:.1%}" if w and name.startswith("sparse") else "")
    console.print(table)
    if "rewrite" in result:
        console.print("rewrite: " + ", ".join(f"{k_} {v}" for k_, v in result["rewrite"].items()))
    console.print("check: " + ", ".join(f"{k_} {v:.2e}" for k_, v in check.items())
                  + (f"; dense padding waste {result['dense_padding_waste']:.1%}" if mixed else ""))
    return result


def summary(results: list[dict], console: Console) -> None:
    steps = [r for r in results if r["kind"] == "step"]
    if not steps:
        return
    rhos = sorted({k.split("_r")[1] for r in steps for k in r["median_s"] if k.startswith("sparse_r")},
                  key=float, reverse=True)
    table = Table(title="summary: sparse / dense, sparse / oracle (step time medians), sparse / dense (peak memory)")
    table.add_column("backend")
    table.add_column("T", justify="right")
    table.add_column("mask")
    for rho in rhos:
        table.add_column(f"rho {rho}: x dense / x oracle / mem", justify="right")
    for r in steps:
        cells = []
        for rho in rhos:
            tag = f"r{rho}"
            rs = r["ratios"]
            if f"sparse_{tag}/dense" not in rs:
                cells.append("")
                continue
            mem = rs.get(f"mem sparse_{tag}/dense")
            cells.append(f"{rs[f'sparse_{tag}/dense']:.3f} / {rs[f'sparse_{tag}/oracle_{tag}']:.3f}"
                         + (f" / {mem:.2f}" if mem is not None else ""))
        table.add_row(r["backend"], str(r["seq"]), f"{r['attention_mask']} ({r['lengths']})", *cells)
    console.print(table)


# --- compile time -------------------------------------------------------------------------------

class TimedBackend:
    """Wraps the inner compiler (what runs after the ReGATE pass, or plain torch.compile's) with a timer."""

    def __init__(self, backend: str):
        if backend == "eager":
            self.inner = lambda gm, example_inputs: gm.forward
        else:
            self.inner = torch._dynamo.lookup_backend(backend)
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        t0 = time.perf_counter()
        try:
            return self.inner(gm, example_inputs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def probe(args) -> dict:
    """In this (fresh) process: the first and second step of one variant; prints one JSON line."""
    from torch._dynamo.utils import compile_times, counters

    device = torch.device(args.device)
    backend, seq, variant = args.backends[0], args.seqs[0], args.probe
    t_build = time.perf_counter()
    model = build_model(args, device)
    t_build = time.perf_counter() - t_build
    b, t = args.batch or 2, seq
    g = torch.Generator().manual_seed(args.seed)
    timed = TimedBackend(backend)
    if variant in ("dense", "dense_dynamic"):  # torch.compile(dynamic=False) / (dynamic=True)
        # dynamic=False is the default's first compile; a new length then recompiles (automatic dynamic)
        fn = compiled_plain(backend, dynamic=None if variant == "dense" else True, inner=timed)
        def step(ids, am, keep):
            return fn(model, ids, am, None, F.pad(ids[:, 1:], (0, 1), value=IGNORE))
    else:
        # eager by name: the pass then skips the fake values only a compiler reads (a callable may read them)
        smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(
            progress=False, dynamic=True if variant == "sparse_dynamic" else None),
            backend="eager" if backend == "eager" else timed)
        def step(ids, am, keep):
            return smodel(input_ids=ids, attention_mask=am, labels=ids, keep_mask=keep).loss
    rows = []
    for i, ti in enumerate((t, args.second_seq or t)):
        ids = torch.randint(3, model.config.vocab_size, (b, ti), generator=g).to(device)
        am = torch.ones(b, ti, dtype=torch.long, device=device)
        keep = keep_exact(b, ti, math.ceil(0.4 * ti), g).to(device)
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        loss = step(ids, am, keep)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1))
    names, values = compile_times(repr="csv", aggregate=True)
    ct = {n: round(float(v), 4) for n, v in zip(names, values)}
    backend_s = ct.get("OutputGraph.call_user_compiler", 0.0)
    (f1, b1), (f2, b2) = rows
    return {
        "bench": "bench_step", "kind": "compile", "backend": backend, "variant": variant, "seq": t, "batch": b,
        "cache": args.cache_label, "model": model_config(args), "dtype": args.dtype, "machine": machine(device),
        "build_model_s": round(t_build, 3),
        "first_step_s": round(f1 + b1, 3), "first_fwd_s": round(f1, 3), "first_bwd_s": round(b1, 3),
        "second_step_s": round(f2 + b2, 3), "second_seq": args.second_seq or t,
        "graphs_compiled": counters["stats"].get("unique_graphs", 0),
        "breakdown_s": {
            "dynamo_total": ct.get("_compile.compile_inner", 0.0),
            "capture (bytecode_tracing)": ct.get("bytecode_tracing", 0.0),
            "guards": ct.get("build_guards", 0.0),
            "backend (pass + inner)": backend_s,
            "regate pass": round(max(backend_s - timed.seconds, 0.0), 4) if variant.startswith("sparse") else 0.0,
            # the inner compiler's forward, and its backward where AOTAutograd compiles it at once
            # (it does for the dynamic sparse graph; plain torch.compile's static one compiles the
            # backward lazily, at the first backward: the next entry)
            "inner compile (backend call)": round(timed.seconds, 4),
            "first backward beyond a steady one (lazy backward compile)": round(max(b1 - b2, 0.0), 4),
        },
        "inner_calls": timed.calls,
        "inductor_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "aot_autograd_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "compile_times": ct,
    }


def _aot_cache_state(r: dict) -> str:
    """'hit', 'miss' or 'bypass' from AOTAutograd's cache counters ('' for the eager backend)."""
    c = r.get("aot_autograd_cache", {})
    return next((k for k in ("bypass", "miss", "hit") if c.get(f"autograd_cache_{k}")), "")


def _two_steps(r: dict) -> float:
    return r["first_step_s"] + r["second_step_s"]


def compile_time(args, console: Console) -> list[dict]:
    """Cold then warm cache, each in a fresh process, for plain torch.compile and for sparsify."""
    results = []
    base = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype,
            "--preset", args.preset, "--attn", args.attn, "--seed", str(args.seed)]
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch"):
        if getattr(args, k) is not None:
            base += [f"--{k.replace('_', '-')}", str(getattr(args, k))]

    def probe_once(backend, seq, variant, label, cache):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        cmd = base + ["--backends", backend, "--seqs", str(seq), "--probe", variant, "--cache-label", label]
        if args.second_seq:
            cmd += ["--second-seq", str(args.second_seq)]
        with console.status(f"compile time: {backend} {variant} ({label} cache, fresh process)"):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
        if out.returncode != 0 or line is None:
            console.print(f"[red]probe failed[/red] ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
            return None
        return json.loads(line)

    # Each variant: one cold process, then --repeat warm processes on its cache, the variants'
    # warm processes interleaved (a load change hits all of them); rows are the warm medians.
    warm_runs: dict = {}
    for backend in args.backends:
        for seq in args.seqs[:1]:
            caches = {v: tempfile.mkdtemp(prefix="regate-bench-cache-") for v in args.compile_variants}
            try:
                for variant in args.compile_variants:
                    r = probe_once(backend, seq, variant, "cold", caches[variant])
                    if r is not None:
                        results.append(r)
                for _ in range(args.repeat):
                    for variant in args.compile_variants:
                        r = probe_once(backend, seq, variant, "warm", caches[variant])
                        if r is not None:
                            warm_runs.setdefault((backend, variant), []).append(r)
            finally:
                for c in caches.values():
                    shutil.rmtree(c, ignore_errors=True)
    for (backend, variant), runs in warm_runs.items():
        runs.sort(key=lambda r: r["first_step_s"])
        med = dict(runs[len(runs) // 2])
        med["warm_first_steps_s"] = [r["first_step_s"] for r in runs]  # every warm process, sorted
        results.append(med)
    table = Table(title="first step (fresh process): capture, pass, inner compile")
    for col in ("backend", "layers", "variant", "cache", "first step s", "capture s", "pass s", "inner s",
                "lazy bwd s", "second step s", "aot cache", "x plain compile", "steps 1+2 x plain"):
        table.add_column(col, justify="left" if col in ("backend", "variant", "cache") else "right")
    by = {(r["backend"], r["variant"], r["cache"]): r for r in results}
    for r in results:
        plain = by.get((r["backend"], "dense", r["cache"]))
        bd = r["breakdown_s"]
        table.add_row(r["backend"], str(r["model"].get("layers", "")), r["variant"], r["cache"],
                      f"{r['first_step_s']:.2f}",
                      f"{bd['capture (bytecode_tracing)']:.2f}", f"{bd['regate pass']:.2f}",
                      f"{bd['inner compile (backend call)']:.2f}",
                      f"{bd['first backward beyond a steady one (lazy backward compile)']:.2f}",
                      f"{r['second_step_s']:.3f}", _aot_cache_state(r),
                      f"{r['first_step_s'] / plain['first_step_s']:.2f}" if plain else "",
                      f"{_two_steps(r) / _two_steps(plain):.2f}" if plain else "")
    console.print(table)
    return results


# --- main ---------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description="training step: dense vs ReGATE-sparse vs oracle (time, memory, compile)")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model shape (default: small)")
    ap.add_argument("--family", default="llama", choices=["llama", "mixtral"],
                    help="llama (dense MLP) or mixtral (token-choice MoE, top-2 of --num-experts)")
    ap.add_argument("--num-experts", type=int, default=8, help="--family mixtral: experts per layer")
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "batched_mm"],
                    help="--family mixtral: transformers' experts implementation (default: its own default)")
    for k in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    ap.add_argument("--batch", type=int, default=None, help="default 2 (4 with --lengths mixed)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.6, 0.4, 0.2])
    ap.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=["eager", "aot_eager", "inductor"])
    ap.add_argument("--attention-mask", default="both", choices=["ones", "none", "both"],
                    help="pass an all-ones attention_mask to dense and sparse, none, or both cells "
                         "(the oracle always gets an all-ones mask)")
    ap.add_argument("--lengths", default="equal", choices=["equal", "mixed"])
    ap.add_argument("--image-frac", type=float, default=0.2, help="--lengths mixed: image tokens / T")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compiles happen here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory steps")
    ap.add_argument("--logits-variant", action="store_true", help="also time SparsifyConfig(return_logits=True)")
    ap.add_argument("--padded-variant", action="store_true",
                    help="also time SparsifyConfig(layout='padded') (the default 'auto' packs uneven steps)")
    ap.add_argument("--nokeep-variant", action="store_true", help="also time the sparsified model without keep_mask")
    ap.add_argument("--plain-use-cache", action="store_true",
                    help="dense and oracle call the model with its default use_cache instead of use_cache=False "
                         "(the oracle then without a mask): under torch.compile their SDPA gets is_causal=True")
    ap.add_argument("--compile-time", action="store_true",
                    help="only measure the first step, cold and warm cache, in fresh processes")
    ap.add_argument("--compile-variants", nargs="+", default=["dense", "sparse"],
                    choices=["dense", "dense_dynamic", "sparse", "sparse_dynamic"],
                    help="--compile-time: dense_dynamic is plain torch.compile(dynamic=True), every axis "
                         "symbolic from the first call; sparse_dynamic is SparsifyConfig(dynamic=True)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="--compile-time: warm-cache processes per variant, interleaved; the row is their median")
    ap.add_argument("--second-seq", type=int, default=None,
                    help="--compile-time: run the second step at this length (a new length recompiles plain "
                         "torch.compile and the default sparse step, once)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each timed round, wait up to this many seconds for the CPUs to be >= 90%% idle")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--probe", choices=["dense", "dense_dynamic", "sparse", "sparse_dynamic"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-label", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(not 0.0 < r <= 1.0 for r in args.rhos):
        ap.error("--rhos must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.probe:
        print(json.dumps(probe(args)), flush=True)
        return 0
    console = Console() if sys.stdout.isatty() else Console(width=160)
    device = torch.device(args.device)
    results: list[dict] = []
    t_start = time.perf_counter()
    if args.compile_time:
        results = compile_time(args, console)
    else:
        model = build_model(args, device)
        masks = ["ones", "none"] if args.attention_mask == "both" else [args.attention_mask]
        if args.lengths == "mixed":
            masks = ["padding"]
        with console.status("benchmarking") as status:
            for backend in args.backends:
                smodels = {"default": regate_fx.sparsify(model, regate_fx.SparsifyConfig(progress=False), backend=backend)}
                if args.logits_variant:
                    smodels["logits"] = regate_fx.sparsify(  # in place: a copy (same weights) of its own
                        copy.deepcopy(model), regate_fx.SparsifyConfig(return_logits=True, progress=False),
                        backend=backend)
                if args.padded_variant:
                    smodels["padded"] = regate_fx.sparsify(
                        copy.deepcopy(model), regate_fx.SparsifyConfig(layout="padded", progress=False),
                        backend=backend)
                for seq in args.seqs:
                    for mask_mode in masks:
                        res = run_cell(args, model, smodels, backend, seq, mask_mode, device, console, status)
                        res["command"] = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
                        results.append(res)
                        if args.out:  # one line per cell as soon as it is measured
                            with open(args.out, "a") as f:
                                f.write(json.dumps(res) + "\n")
        summary(results, console)
    if args.compile_time and args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    for r in results:
        print(json.dumps(r))
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
