"""One seed of the study: data, tokenizer, pretraining, teacher cache, the runs in lockstep."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import regate_fx

from . import data as D
from . import models as M
from .train import RunSpec, batch_of, evaluate, make_run, train_step, warm_up


def log(msg: str) -> None:
    print(msg, flush=True)


def prepare(out: Path, args) -> dict:
    """Data, tokenizer, pretrained vision tower and backbone (cached in ``out/pretrained``)."""
    t0 = time.perf_counter()
    size = M.ModelSize(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate)
    tok = M.build_tokenizer()
    pre = out / "pretrained"
    pre.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(pre / "tokenizer")
    raw = {s: D.generate(n, args.data_seed, s, turns=args.turns)
           for s, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size))}
    enc = {s: [M.encode(x, tok, i) for i, x in enumerate(v)] for s, v in raw.items()}
    log(f"data: {', '.join(f'{s} {len(v)}' for s, v in enc.items())} samples; vocabulary {len(tok)} words "
        f"({time.perf_counter() - t0:.0f} s)")
    key = f"h{args.hidden}x{args.layers}-i{args.intermediate}-n{args.train_size}-d{args.data_seed}-b{args.backbone_steps}-v{args.vision_steps}"
    vpath, bpath = pre / f"vision-{key}.pt", pre / f"backbone-{key}.pt"
    if vpath.exists() and bpath.exists():
        tower = M.tf.CLIPVisionModel(M.clip_config(size))
        tower.load_state_dict(torch.load(vpath))
        backbone = M.tf.LlamaForCausalLM(M.llama_config(len(tok), size))
        backbone.load_state_dict(torch.load(bpath))
        log(f"pretrained vision tower and backbone loaded from {pre}")
    else:
        log("pretraining the vision tower (names every cell's colour, shape and size)")
        tower, cell_acc = M.pretrain_vision(raw["train"], size, args.vision_steps, args.data_seed, log=log)
        log("pretraining the text-only backbone on the training conversations (the teacher)")
        backbone = M.pretrain_backbone(enc["train"], len(tok), size, args.backbone_steps, args.data_seed, bs=16, log=log)
        torch.save(tower.state_dict(), vpath)
        torch.save(backbone.state_dict(), bpath)
    tower.eval(); backbone.eval()
    return {"tok": tok, "raw": raw, "enc": enc, "size": size, "tower": tower, "backbone": backbone,
            "prep_s": time.perf_counter() - t0}


def teacher_ratio(cache, train: list[dict]) -> dict:
    """Mean reference loss of image words and of text-predictable answer words."""
    img, txt = [], []
    for e in train:
        r = cache.sample(int(e["sample_id"]))  # r[p] = loss of token p + 1
        tg = e["tags"].numpy()[1:]
        rr = r[:-1] if len(r) == len(tg) + 1 else r[: len(tg)]
        img.append(rr[tg == D.IMAGE]); txt.append(rr[tg == D.TEXT])
    img, txt = np.concatenate(img), np.concatenate(txt)
    return {"r_image": float(np.nanmean(img)), "r_text": float(np.nanmean(txt)),
            "teacher_ratio": float(np.nanmean(img) / max(np.nanmean(txt), 1e-9))}


def run_seed(seed: int, specs: list[RunSpec], prep: dict, out: Path, args) -> dict:
    torch.manual_seed(seed)
    enc = prep["enc"]
    train = enc["train"]
    mllm = M.build_mllm(prep["backbone"], prep["tower"], prep["size"], seed)
    t0 = time.perf_counter()
    teacher = regate_fx.text_only_teacher(mllm)
    cache = regate_fx.TeacherCache.compute(out / f"seed{seed}" / "teacher-cache", teacher, train,
                                           batch_size=64, progress=not args.no_progress)
    teacher_s = time.perf_counter() - t0
    tr = teacher_ratio(cache, train)
    log(f"teacher cache: {cache.num_samples} samples in {teacher_s:.1f} s; mean reference loss "
        f"{tr['r_image']:.3f} nats on image words vs {tr['r_text']:.3f} on text answer words "
        f"(ratio {tr['teacher_ratio']:.1f}x)")
    runs = [make_run(s, mllm, cache, len(train), args.steps, args.lr, args.backend, seed) for s in specs]
    wb = [batch_of(train, list(range(k * args.batch_size, (k + 1) * args.batch_size))) for k in range(3)]
    for r in runs:
        warm_up(r, wb, seed)
    log("compile / first calls (outside wall_s): " + ", ".join(f"{r.spec.name} {r.warmup_s:.1f} s" for r in runs))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    evals = sorted(set(list(range(0, args.steps + 1, args.eval_every)) + [args.steps]))
    val_sub = enc["val"]
    t_start = time.perf_counter()

    def do_eval(step: int) -> None:
        for r in runs:
            ev = evaluate(r.model, val_sub)
            r.curve.append({"step": step, "tokens": r.tokens, "text_tokens": r.text_tokens, "wall_s": r.wall,
                            "tokens_dense": r.tokens_dense, "text_tokens_dense": r.text_tokens_dense,
                            "val_acc": ev["acc"], "val_text_acc": ev["text_acc"], "val_loss": ev["loss"]})
        log(f"  step {step:4d}  " + "  ".join(f"{r.spec.name} {r.curve[-1]['val_acc']:.3f}" for r in runs)
            + f"   ({time.perf_counter() - t_start:.0f} s)")

    do_eval(0)
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += torch.randperm(len(train), generator=g).tolist()
        idx, order = order[: args.batch_size], order[args.batch_size:]
        b, pix, tags = batch_of(train, idx)
        for r in runs:  # lockstep: every run takes step `step` on the same batch
            train_step(r, b, pix, tags, step)
        if step + 1 in evals:
            do_eval(step + 1)
    results = {}
    for r in runs:
        test = evaluate(r.model, enc["test"])
        best = max(c["val_acc"] for c in r.curve)
        results[r.spec.name] = {
            "tokens_fraction": r.tokens / r.tokens_dense,
            "text_tokens_fraction": r.text_tokens / r.text_tokens_dense,
            "wall_s": r.wall,
            "compile_s": r.warmup_s,
            "median_step_s": float(np.median(r.step_times)),
            "best_val_acc": best,
            "final_val_acc": r.curve[-1]["val_acc"],
            "final_test_acc": test["acc"],
            "final_test_text_acc": test["text_acc"],
            "final_test_loss": test["loss"],
            "min_val_loss": min(c["val_loss"] for c in r.curve),
            "image_words_kept_at_sparse_steps": (r.image_words_kept / r.image_words_sparse
                                                  if r.image_words_sparse else None),
            "regate_config": r.spec.regate,
            "curve": r.curve,
        }
    return {"seed": seed, "runs": results, "teacher": tr, "teacher_s": teacher_s,
            "fig5": fig5_data(runs, train, cache, prep["tok"], args) if args.fig5 else None,
            "runs_obj": runs}


def fig5_data(runs, train, cache, tok, args) -> dict | None:
    """One training sample's words with reference loss r, student difficulty D, and kept/pruned
    at a sparse step, for the ReGATE run (the first run with regate selection and lam = 0.5)."""
    cand = [r for r in runs if r.rg is not None and r.rg.config.selection == "regate" and 0 < r.rg.config.lam < 1]
    cand.sort(key=lambda r: not r.rg.config.keep_context)  # the recommended configuration first
    if not cand:
        return None
    run = cand[0]
    cfg = run.rg.config
    sid = args.fig5_sample
    b, pix, tags = batch_of(train, [sid])
    step = args.steps  # a step after training; pick the next sparse one
    while run.rg.rho(step) >= 1.0:
        step += 1
    keep = run.rg.keep_mask(b, step)[0]
    pb = regate_fx.runtime.regate.parse_batch(b, cfg)
    d = run.rg.store.gather(pb.sample_ids, pb.positions, pb.supervised)[0]
    r = torch.from_numpy(np.asarray(cache.sample(sid), dtype=np.float32))
    ids = b["input_ids"][0].tolist()
    words = tok.convert_ids_to_tokens(ids)
    rows = []
    for p in range(1, len(ids)):  # token p, predicted at p - 1
        rows.append({"word": words[p], "tag": int(tags[0, p]), "supervised": bool(pb.supervised[0, p - 1]),
                     "r": None if math.isnan(float(r[p - 1])) else float(r[p - 1]),
                     "D": None if math.isnan(float(d[p - 1])) else float(d[p - 1]),
                     "kept": bool(keep[p - 1]), "context": not bool(pb.supervised[0, p - 1])})
    return {"run": run.spec.name, "sample_id": sid, "step": step, "rho": run.rg.rho(step), "lam": cfg.lam,
            "keep_context": cfg.keep_context, "tokens": rows}
