"""Analysis time and sparse step time of one model, for side-by-side runs of two checkouts.

    PYTHONPATH=<checkout> python benchmarks/bench_analysis.py --layers 4 --hidden 256

Builds a random Llama (transformers config, nothing downloaded), sparsifies it (eager backend,
padded layout), and reports as one JSON line:

- ``analysis_s``: the median of ``--repeats`` calls of ``regate_fx.passes.analyse.analyse`` on the
  graph the backend receives (the first sparse call's capture; the pass's own analysis only);
- ``step_s``: the median of ``--steps`` sparse training steps (forward + backward, rho 0.5, a new
  keep mask each step) after two warm-up steps;
- ``regate``: the path regate_fx was imported from (which checkout ran).

Run the two checkouts alternately (A B A B ...) so that drifting load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers as tf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    import regate_fx
    from regate_fx import SparsifyConfig, sparsify
    from regate_fx.passes import analyse as analyse_mod
    from regate_fx.passes import backend as backend_mod

    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4 * args.seq)
    model = tf.LlamaForCausalLM(cfg).float().train()
    times: list[float] = []
    real = analyse_mod.analyse

    def timed(*a, **kw):
        if not times:  # the first sparse graph: time the analysis alone, repeatedly
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                real(*a, **kw)
                times.append(time.perf_counter() - t0)
        return real(*a, **kw)

    backend_mod.analyse = timed
    smodel = sparsify(model, SparsifyConfig(layout="padded", progress=False), backend="eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1024, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    steps = []
    for i in range(args.steps + 2):
        keep = torch.rand(args.batch, args.seq, generator=g) < 0.5
        keep[:, 0] = True
        t0 = time.perf_counter()
        out = smodel(**batch, keep_mask=keep)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            steps.append(time.perf_counter() - t0)
    print(json.dumps({"regate": regate_fx.__file__.rsplit("/", 2)[0], "layers": args.layers, "hidden": args.hidden,
                      "seq": args.seq, "analysis_s": round(statistics.median(times), 4),
                      "step_s": round(statistics.median(steps), 4)}))


if __name__ == "__main__":
    main()
