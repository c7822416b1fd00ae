"""One seed of the study: its data, tokenizer, pretraining, teacher pass, and its runs in lockstep."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import regate_fx

from . import data as D
from . import models as M
from .plan import Plan, Plateau, write_json
from .train import RunSpec, batch_of, evaluate, generate_exact_match, make_run, restore, snapshot, train_step, warm_up


def log(msg: str) -> None:
    print(msg, flush=True)


def pretrain_key(seed: int, args) -> str:
    return (
        f"s{seed}-h{args.hidden}x{args.layers}-i{args.intermediate}-n{args.train_size}-b{args.backbone_steps}"
        f"-v{args.vision_steps}"
    )


def pretrain_seconds(seed: int, out: Path, args) -> float | None:
    """The seed's pretraining time (vision tower + backbone), when this output folder did it."""
    p = out / "pretrained" / f"pretrain-time-{pretrain_key(seed, args)}.json"
    return json.loads(p.read_text())["pretrain_s"] if p.exists() else None


def prepare(seed: int, out: Path, args) -> dict:
    """One seed's world: its own data (train/val/test drawn from ``seed``), its own pretrained vision
    tower and text-only backbone (seeded by ``seed``; cached in ``out/pretrained``), its tokenizer."""
    t0 = time.perf_counter()
    size = M.ModelSize(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate
    )
    tok = M.build_tokenizer()
    pre = out / "pretrained"
    pre.mkdir(parents=True, exist_ok=True)
    if not (pre / "tokenizer" / "tokenizer.json").exists():
        tok.save_pretrained(pre / "tokenizer")
    raw = {
        s: D.generate(n, seed, s, turns=args.turns)
        for s, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size))
    }
    enc = {s: [M.encode(x, tok, i) for i, x in enumerate(v)] for s, v in raw.items()}
    log(f"seed {seed} data: {', '.join(f'{s} {len(v)}' for s, v in enc.items())} samples; vocabulary {len(tok)} words")
    key = pretrain_key(seed, args)
    vpath, bpath = pre / f"vision-{key}.pt", pre / f"backbone-{key}.pt"
    tpath = pre / f"pretrain-time-{key}.json"
    if vpath.exists() and bpath.exists():
        tower = M.tf.CLIPVisionModel(M.clip_config(size))
        tower.load_state_dict(torch.load(vpath))
        backbone = M.tf.LlamaForCausalLM(M.llama_config(len(tok), size))
        backbone.load_state_dict(torch.load(bpath))
        log(f"seed {seed}: pretrained vision tower and backbone loaded from {pre}")
    else:
        log(f"seed {seed}: pretraining the vision tower (names every cell's colour, shape and size)")
        tower, _ = M.pretrain_vision(raw["train"], size, args.vision_steps, seed, log=log)
        log(f"seed {seed}: pretraining the text-only backbone on the training conversations (the teacher)")
        backbone = M.pretrain_backbone(enc["train"], len(tok), size, args.backbone_steps, seed, bs=16, log=log)
        for obj, path in ((tower, vpath), (backbone, bpath)):  # atomic; parallel processes may race here
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(obj.state_dict(), tmp)
            tmp.replace(path)
        write_json(tpath, {"pretrain_s": time.perf_counter() - t0})
    tower.eval()
    backbone.eval()
    pre_s = json.loads(tpath.read_text())["pretrain_s"] if tpath.exists() else None
    return {
        "seed": seed,
        "tok": tok,
        "raw": raw,
        "enc": enc,
        "size": size,
        "tower": tower,
        "backbone": backbone,
        "prep_s": pre_s,
    }


def teacher_ratio(cache, train: list[dict]) -> dict:
    """Mean reference loss of image words and of text-predictable answer words."""
    img, txt = [], []
    for e in train:
        r = cache.sample(int(e["sample_id"]))  # r[p] = loss of token p + 1
        tg = e["tags"].numpy()[1:]
        rr = r[:-1] if len(r) == len(tg) + 1 else r[: len(tg)]
        img.append(rr[tg == D.IMAGE])
        txt.append(rr[tg == D.TEXT])
    img, txt = np.concatenate(img), np.concatenate(txt)
    return {
        "r_image": float(np.nanmean(img)),
        "r_text": float(np.nanmean(txt)),
        "teacher_ratio": float(np.nanmean(img) / max(np.nanmean(txt), 1e-9)),
    }


def run_group(phase: str, specs: list[RunSpec], prep: dict, out: Path, plan: Plan, args) -> None:
    """Train the unfinished runs of one seed in lockstep, each to its plateau; save each run's record
    (atomically) as soon as it stops. Finished runs (records on disk) are skipped."""
    seed = prep["seed"]
    todo = [s for s in specs if not plan.done(phase, seed, s.name, s.lr)]
    if not todo:
        log(f"[{phase} seed {seed}] all {len(specs)} runs already finished: skipped")
        return
    log(
        f"[{phase} seed {seed}] runs {', '.join(f'{s.name} (lr {s.lr:g})' for s in todo)} in lockstep, to the "
        f"plateau (eval every {args.eval_every}, patience {args.patience}, cap {args.max_steps} steps)"
        + (
            f"; finished, skipped: {', '.join(s.name for s in specs if s not in todo)}"
            if len(todo) < len(specs)
            else ""
        )
    )
    torch.manual_seed(seed)
    enc = prep["enc"]
    train = enc["train"]
    mllm = M.build_mllm(prep["backbone"], prep["tower"], prep["size"], seed)
    teacher_s = 0.0
    cache = None
    if any(
        s.regate is not None and s.regate.get("lam", 0.5) > 0 and s.regate.get("selection") != "random" for s in todo
    ):  # a run reads the reference loss r
        t0 = time.perf_counter()
        teacher = regate_fx.text_only_teacher(mllm)
        cdir = out / "teacher-cache" / f"{phase}-seed{seed}-{os.getpid()}"  # fresh: its time is measured
        if cdir.exists():
            shutil.rmtree(cdir)
        cache = regate_fx.TeacherCache.compute(cdir, teacher, train, batch_size=64, progress=not args.no_progress)
        teacher_s = time.perf_counter() - t0
        tr = teacher_ratio(cache, train)
        log(
            f"  teacher pass: {cache.num_samples} samples in {teacher_s:.1f} s; mean reference loss "
            f"{tr['r_image']:.3f} nats on image words vs {tr['r_text']:.3f} on text answer words "
            f"(ratio {tr['teacher_ratio']:.1f}x)"
        )
    else:
        tr = None
    runs = [make_run(s, mllm, cache, len(train), args.lr_warmup, args.backend, seed) for s in todo]
    wb = [
        batch_of(train, list(range(k * args.batch_size, (k + 1) * args.batch_size))) for k in range(args.warm_batches)
    ]
    for r in runs:
        warm_up(r, wb, seed)
    log("  compile / first calls: " + ", ".join(f"{r.spec.name} {r.warmup_s:.1f} s" for r in runs))
    rules = {r.spec.name: Plateau(args.eval_every, args.patience, args.max_steps, args.min_steps) for r in runs}
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    t_start = time.perf_counter()
    active = list(runs)

    def finish(r) -> None:
        rule = rules[r.spec.name]
        t0 = time.perf_counter()
        restore(r.model, r.best_state)
        test = evaluate(r.model, enc["test"])
        gen = generate_exact_match(r.model, enc["test"][: args.gen_samples])
        best = next(c for c in r.curve if c["step"] == rule.best_step)
        rec = {
            "phase": phase,
            "seed": seed,
            "name": r.spec.name,
            "lr": r.spec.lr,
            "regate_config": r.spec.regate,
            "masked": r.spec.masked,
            "stopped": rule.stopped,
            "stopped_step": r.stopped_step,
            "best_step": rule.best_step,
            "best_val_acc": rule.best,
            "best_val_text_acc": best["val_text_acc"],
            "best_val_loss": best["val_loss"],
            "test_acc": test["acc"],
            "test_text_acc": test["text_acc"],
            "test_loss": test["loss"],
            "gen_exact_match": gen["exact_match"],
            "gen_answers": gen["answers"],
            "tokens_fraction": r.tokens / r.tokens_dense,
            "text_tokens_fraction": r.text_tokens / r.text_tokens_dense,
            "tokens": r.tokens,
            "text_tokens": r.text_tokens,
            "train_s": r.wall,
            "compile_s": r.warmup_s,
            "teacher_s": teacher_s if r.rg is not None and r.rg.config.needs_reference else 0.0,
            "median_step_s": float(np.median(r.step_times)),
            "image_words_kept_at_sparse_steps": (
                r.image_words_kept / r.image_words_sparse if r.image_words_sparse else None
            ),
            "teacher": tr,
            "test_eval_s": time.perf_counter() - t0,
            "curve": r.curve,
        }
        rec["end_to_end_s"] = rec["teacher_s"] + rec["compile_s"] + rec["train_s"]
        if args.fig5 and phase == "main" and r.spec.name == "regate":
            try:
                f5 = fig5_data(r, train, cache, prep["tok"], args)
                write_json(out / "figure5-data" / f"seed{seed}.json", f5)
            except Exception as exc:  # the view is an extra; never lose a run for it
                log(f"  figure 5 view skipped: {exc}")
        plan.save(phase, seed, r.spec.name, rec)
        log(
            f"  done: {phase} seed {seed} {r.spec.name}: best val acc {rule.best:.3f} at step {rule.best_step} "
            f"({rule.stopped} at {r.stopped_step}); test {test['acc']:.3f}; generated exact match "
            f"{gen['exact_match']:.3f}  {plan.progress()}"
        )

    def do_eval(step: int) -> None:
        for r in list(active):
            ev = evaluate(r.model, enc["val"])
            r.curve.append(
                {
                    "step": step,
                    "tokens": r.tokens,
                    "text_tokens": r.text_tokens,
                    "wall_s": r.wall,
                    "tokens_dense": r.tokens_dense,
                    "text_tokens_dense": r.text_tokens_dense,
                    "val_acc": ev["acc"],
                    "val_text_acc": ev["text_acc"],
                    "val_loss": ev["loss"],
                }
            )
            rule = rules[r.spec.name]
            rule.update(step, ev["acc"])
            if rule.best_step == step:
                r.best_state = snapshot(r.model)
            if rule.stopped:
                r.stopped_step = step
                active.remove(r)
                finish(r)
        log(
            f"  [{phase} seed {seed}] step {step:4d}/{args.max_steps}  "
            + "  ".join(f"{r.spec.name} {r.curve[-1]['val_acc']:.3f}" for r in runs if r.curve[-1]["step"] == step)
            + f"   ({len(active)} active, {time.perf_counter() - t_start:.0f} s)"
        )

    do_eval(0)
    step = 0
    while active:
        if len(order) < args.batch_size:
            order += torch.randperm(len(train), generator=g).tolist()
        idx, order = order[: args.batch_size], order[args.batch_size :]
        b, pix, tags = batch_of(train, idx)
        for r in active:  # lockstep: every active run takes step `step` on the same batch
            train_step(r, b, pix, tags, step)
        step += 1
        if step % args.eval_every == 0 or step == args.max_steps:
            do_eval(step)
    if cache is not None:
        shutil.rmtree(cdir, ignore_errors=True)


def fig5_data(run, train, cache, tok, args) -> dict:
    """One training sample's words with reference loss r, student difficulty D, and kept/pruned
    at a sparse step after the ReGATE run's last step."""
    cfg = run.rg.config
    sid = args.fig5_sample
    b, pix, tags = batch_of(train, [sid])
    step = run.stopped_step  # a step after training; pick the next sparse one
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
        rows.append(
            {
                "word": words[p],
                "tag": int(tags[0, p]),
                "supervised": bool(pb.supervised[0, p - 1]),
                "r": None if math.isnan(float(r[p - 1])) else float(r[p - 1]),
                "D": None if math.isnan(float(d[p - 1])) else float(d[p - 1]),
                "kept": bool(keep[p - 1]),
                "context": not bool(pb.supervised[0, p - 1]),
            }
        )
    return {
        "run": run.spec.name,
        "sample_id": sid,
        "step": step,
        "rho": run.rg.rho(step),
        "lam": cfg.lam,
        "keep_context": cfg.keep_context,
        "tokens": rows,
    }
