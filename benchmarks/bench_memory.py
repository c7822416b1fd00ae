"""Memory of one training step (forward + backward) with and without gradient checkpointing.

Variants (a Llama-style model built from a config, random weights, nothing downloaded):

    dense         the plain model, eager PyTorch
    dense_ckpt    the same with model.gradient_checkpointing_enable() (Hugging Face's own checkpointing)
    sparse        the sparsified model with a keep mask of ceil(rho * T) positions per sample
    sparse_ckpt   the same with model.gradient_checkpointing_enable(): the checkpointed layers are
                  inlined into the sparse graph and recomputed in the backward (regate_fx/passes/checkpoint.py)

Two figures per variant:

    peak      CUDA only: the highest memory allocated during the step above what was allocated before
              it (parameters, inputs), torch.cuda.max_memory_allocated
    saved     the bytes of the tensors autograd holds for the backward when the forward returns (a
              saved_tensors_hooks count); not meaningful for dense_ckpt, whose checkpoint hides its
              saved tensors from outer hooks (shown as -)

    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py                   # defaults below
    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py --device cuda --seq 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import transformers as tf
from rich.console import Console
from rich.table import Table

import regate_fx

VARIANTS = ("dense", "dense_ckpt", "sparse", "sparse_ckpt")


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 2048))
    return tf.LlamaForCausalLM(cfg).to(args.device).train()


def peak_bytes(fn, device: str) -> int | None:
    """Peak CUDA allocation during ``fn()`` above the allocation at its start (None on CPU: PyTorch
    keeps no CPU allocator statistics, and the process's resident set keeps freed memory)."""
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def saved_bytes(fn) -> tuple[int, object]:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rho", type=float, default=0.4)
    ap.add_argument("--backend", default="aot_eager", choices=["aot_eager", "inductor"],
                    help="sparse variants' backend (eager has no backward partitioner: it runs as aot_eager)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    b, t = args.batch, args.seq
    k = math.ceil(args.rho * t)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (b, t), generator=g).to(args.device)
    am = torch.ones_like(ids)
    keep = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        keep[i, torch.randperm(t, generator=g)[:k]] = True
    keep = keep.to(args.device)

    results = {}
    for variant in VARIANTS:
        model = build(args)
        if variant.startswith("sparse"):
            regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False, progress=False),
                               backend=args.backend)
        if variant.endswith("ckpt"):
            model.gradient_checkpointing_enable()
        kw = dict(input_ids=ids, attention_mask=am, labels=ids)
        if variant.startswith("sparse"):
            kw["keep_mask"] = keep

        def step():
            model.zero_grad(set_to_none=True)
            model(**kw).loss.backward()

        step()  # warm-up (captures and compiles the sparse graph)
        model.zero_grad(set_to_none=True)
        saved, out = saved_bytes(lambda: model(**kw))
        out.loss.backward()
        del out
        model.zero_grad(set_to_none=True)
        results[variant] = {"peak_bytes": peak_bytes(step, args.device),
                            "saved_bytes": None if variant == "dense_ckpt" else saved}
        del model

    table = Table(title=f"memory of one train step: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
                        f"B {b}, T {t}, rho {args.rho} (K={k}), {args.device}, sparse backend {args.backend}")
    for col in ("variant", "peak MiB", "peak x dense", "saved MiB", "saved x dense"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    dense = results["dense"]
    for v, r in results.items():
        peak, saved = r["peak_bytes"], r["saved_bytes"]
        table.add_row(v, "-" if peak is None else f"{peak / 2**20:.1f}",
                      "-" if peak is None else f"{peak / dense['peak_bytes']:.3f}",
                      "-" if saved is None else f"{saved / 2**20:.1f}",
                      "-" if saved is None else f"{saved / dense['saved_bytes']:.3f}")
    (Console() if sys.stdout.isatty() else Console(width=140)).print(table)
    line = {"bench": "bench_memory", "config": vars(args), "kept_per_sample": k,
            "torch": torch.__version__, "results": results}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
