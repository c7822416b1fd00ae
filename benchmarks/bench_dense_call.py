"""Cost of a call *without* keep_mask on a sparsified model: the model's own forward plus one Python call.

Times the same model before and after ``regate_fx.sparsify`` (interleaved rounds, medians), forward +
backward, and the bare dispatch cost on a module whose forward does nothing.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_dense_call.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers as tf

import regate_fx


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4)
    plain = tf.LlamaForCausalLM(cfg).train()
    sparse = regate_fx.sparsify(copy.deepcopy(plain), backend="eager")
    ids = torch.randint(3, 512, (args.batch, args.seq))
    am = torch.ones_like(ids)

    def step(m):
        t0 = time.perf_counter()
        m(input_ids=ids, attention_mask=am, labels=ids).loss.backward()
        return time.perf_counter() - t0

    for m in (plain, sparse):  # warm-up
        step(m)
    times = {"plain": [], "sparsified": []}
    for _ in range(args.rounds):
        times["plain"].append(step(plain))
        times["sparsified"].append(step(sparse))
    med = {k: statistics.median(v) for k, v in times.items()}

    class Nothing(torch.nn.Module):
        def forward(self, x):
            return x

    a, b = Nothing(), regate_fx.sparsify(Nothing(), backend="eager")
    x = torch.ones(1)

    def per_call(m, n=20000):
        t0 = time.perf_counter()
        for _ in range(n):
            m(x)
        return (time.perf_counter() - t0) / n

    overhead = statistics.median(per_call(b) - per_call(a) for _ in range(7))
    line = {"bench": "bench_dense_call", "config": vars(args), "median_s": med,
            "ratio": med["sparsified"] / med["plain"], "dispatch_overhead_us": overhead * 1e6}
    print(f"fwd+bwd median: plain {med['plain'] * 1e3:.2f} ms, sparsified (no keep_mask) "
          f"{med['sparsified'] * 1e3:.2f} ms, ratio {line['ratio']:.3f}; dispatch overhead "
          f"{line['dispatch_overhead_us']:.2f} us per call")
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
