"""Training runs through the library's public API (the documented torch loop), interleaved.

All runs of one seed train in lockstep: step t of every run, then step t + 1 of every run. They
see the same batches in the same order, and the machine's background load (a shared CPU) hits
them alike, so their wall times compare. Each step is timed on its own (``perf_counter`` around
the forward, backward and optimiser step, plus the keep-mask selection and the difficulty update
for the sparse runs); evaluation is excluded from the wall time.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import regate_fx

from . import data as D
from .models import ASSISTANT, EOS, IMAGE_TOKEN, PAD

_DEBUG = bool(os.environ.get("STUDY_DEBUG"))


@dataclass
class RunSpec:
    name: str
    regate: dict | None = None  # ReGateConfig fields; None = dense (the plain model)
    lr: float = 1e-3
    masked: bool = False  # dense compute, loss only on the positions ``regate`` selects (RHO-1 style)


@dataclass
class RunState:
    spec: RunSpec
    model: torch.nn.Module
    smodel: object
    opt: torch.optim.Optimizer
    sched: object
    rg: regate_fx.ReGate | None
    wall: float = 0.0
    tokens: int = 0
    tokens_dense: int = 0
    text_tokens: int = 0
    text_tokens_dense: int = 0
    image_words_kept: int = 0
    image_words_sparse: int = 0
    curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    warmup_s: float = 0.0
    best_state: dict | None = None
    stopped_step: int | None = None


def batch_of(dataset: list[dict], idx: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    b = regate_fx.collate([dataset[i] for i in idx], pad_token_id=PAD, indices=idx)
    pix = torch.stack([dataset[i]["pixel_values"] for i in idx])
    T = b["input_ids"].shape[1]
    tags = torch.zeros(len(idx), T, dtype=torch.int8)
    for k, i in enumerate(idx):
        t = dataset[i]["tags"]
        tags[k, : t.numel()] = t
    return b, pix, tags


@torch.no_grad()
def evaluate(model, dataset: list[dict], bs: int = 64) -> dict:
    """Teacher-forced, dense, eval mode: accuracy of the argmax at image words and at text words,
    and the mean cross-entropy over every answer token."""
    was = model.training
    model.eval()
    hit = {D.IMAGE: 0, D.TEXT: 0}
    tot = {D.IMAGE: 0, D.TEXT: 0}
    loss_sum, n = 0.0, 0
    for s in range(0, len(dataset), bs):
        idx = list(range(s, min(len(dataset), s + bs)))
        b, pix, tags = batch_of(dataset, idx)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pix).logits
        pred = logits[:, :-1].argmax(-1)  # prediction of token p + 1
        tgt, tg = b["labels"][:, 1:], tags[:, 1:]
        sup = tgt != -100
        ce = F.cross_entropy(logits[:, :-1][sup].float(), tgt[sup], reduction="sum")
        loss_sum += float(ce)
        n += int(sup.sum())
        for k in (D.IMAGE, D.TEXT):
            m = sup & (tg == k)
            hit[k] += int((pred[m] == tgt[m]).sum())
            tot[k] += int(m.sum())
    model.train(was)
    return {
        "acc": hit[D.IMAGE] / max(1, tot[D.IMAGE]),
        "text_acc": hit[D.TEXT] / max(1, tot[D.TEXT]),
        "loss": loss_sum / max(1, n),
    }


def make_run(spec: RunSpec, base_model, cache, num_samples: int, warm: int, backend: str, seed: int) -> RunState:
    """A run: a copy of the model, AdamW at ``spec.lr`` (linear warm-up over ``warm`` steps, then
    constant: runs stop at their plateau, so no decay horizon), and its ReGate if it selects."""
    model = copy.deepcopy(base_model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warm)))
    rg, smodel = None, None
    if spec.regate is not None:
        cfg = regate_fx.ReGateConfig(visual_token_ids=(IMAGE_TOKEN,), seed=seed, **spec.regate)
        rg = regate_fx.ReGate(cfg, num_samples=num_samples, teacher_cache=cache if cfg.needs_reference else None)
        if not spec.masked:
            smodel = regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=False), backend=backend)
    return RunState(spec, model, smodel, opt, sched, rg)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` cross-entropy of the prediction made at each position (of token p + 1); 0 where
    token p + 1 is not supervised and at the last position (the runtime's ``token_loss`` layout)."""
    B, T = labels.shape
    tgt = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tgt.flatten().clamp(min=0), reduction="none")
    ce = ce.view(B, T - 1).masked_fill(tgt == -100, 0.0)
    return torch.cat([ce, ce.new_zeros(B, 1)], 1)


def warm_up(run: RunState, batches: list[tuple[dict, torch.Tensor, torch.Tensor]], seed: int) -> float:
    """Capture and compile before the timed steps: forward + backward on a few batches, all kept
    and sparse (random keep masks from a throwaway ReGate), gradients discarded, no optimiser step.
    Returns the seconds spent (reported as compile time, outside ``wall_s``)."""
    t0 = time.perf_counter()
    for b, pix, _ in batches:
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], pixel_values=pix)
        if run.rg is None or run.spec.masked:
            run.model(**kw).loss.backward()
        else:
            cfg = regate_fx.ReGateConfig(
                visual_token_ids=(IMAGE_TOKEN,),
                selection="random",
                warmup_steps=0,
                cycle_steps=1,
                dense_steps=0,
                rho_min=run.rg.config.rho_min,
                keep_context=run.rg.config.keep_context,
                seed=seed,
            )
            tmp = regate_fx.ReGate(cfg, num_samples=run.rg.num_samples)
            for keep in (b["attention_mask"].bool(), tmp.keep_mask(b, 0)):
                run.smodel(**kw, keep_mask=keep).loss.backward()
        run.opt.zero_grad(set_to_none=True)
    run.warmup_s = time.perf_counter() - t0
    return run.warmup_s


def train_step(run: RunState, b: dict, pix: torch.Tensor, tags: torch.Tensor, step: int) -> None:
    real = b["attention_mask"].bool()
    text = real & (b["input_ids"] != IMAGE_TOKEN)
    t0 = time.perf_counter()
    if run.rg is None:
        out = run.model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], pixel_values=pix
        )
        keep = real
    elif run.spec.masked:  # dense compute; the loss counts only the positions ReGATE selects
        keep = run.rg.keep_mask(b, step)
        logits = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pix).logits
        tl = token_ce(logits, b["labels"])
        sup = torch.zeros_like(real)
        sup[:, :-1] = b["labels"][:, 1:] != -100
        sel = keep & sup
        out = SimpleNamespace(loss=tl[sel].sum() / sel.sum().clamp(min=1), token_loss=tl)
    else:
        keep = run.rg.keep_mask(b, step)
        out = run.smodel(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            labels=b["labels"],
            pixel_values=pix,
            keep_mask=keep,
        )
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], 1.0)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    if run.rg is not None:
        run.rg.update(b, out.token_loss, keep)
    dt = time.perf_counter() - t0
    run.wall += dt
    run.step_times.append(dt)
    if dt > 3.0 and _DEBUG:
        print(f"    slow step: {run.spec.name} step {step} {dt:.1f} s", flush=True)
    run.losses.append(float(out.loss))
    if run.spec.masked:  # every token was computed
        keep = real
    run.tokens += int((keep & real).sum())
    run.tokens_dense += int(real.sum())
    run.text_tokens += int((keep & text).sum())
    run.text_tokens_dense += int(text.sum())
    if run.rg is not None and not run.spec.masked and run.rg.rho(step) < 1.0:
        # the prediction of an image word at p + 1 is made at p
        img_pred = torch.zeros_like(real)
        img_pred[:, :-1] = (tags[:, 1:] == D.IMAGE) & (b["labels"][:, 1:] != -100)
        run.image_words_kept += int((keep & img_pred).sum())
        run.image_words_sparse += int(img_pred.sum())


def snapshot(model) -> dict:
    """A copy of the trainable weights (the best checkpoint so far)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def restore(model, state: dict) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])


@torch.no_grad()
def generate_exact_match(model, dataset: list[dict], bs: int = 48) -> dict:
    """Greedy ``model.generate`` for every answer turn of ``dataset`` (the earlier turns given, as
    in the data), scored by exact match of the whole answer (every word and the closing [EOS]).

    Untargeted: the selector upweights the image words; this counts an answer right only if all
    its words, template and text included, come out right.
    """
    was = model.training
    model.eval()
    items = []
    for e in dataset:
        ids = e["input_ids"].tolist()
        for p, t in enumerate(ids):
            if t == ASSISTANT:
                end = ids.index(EOS, p + 1)
                items.append((torch.tensor(ids[: p + 1]), ids[p + 1 : end + 1], e["pixel_values"]))
    hit = 0
    for s in range(0, len(items), bs):
        chunk = items[s : s + bs]
        T = max(len(c[0]) for c in chunk)
        ids = torch.full((len(chunk), T), PAD, dtype=torch.long)
        am = torch.zeros_like(ids)
        for k, (p, _, _) in enumerate(chunk):  # left padding
            ids[k, T - len(p) :] = p
            am[k, T - len(p) :] = 1
        pix = torch.stack([c[2] for c in chunk])
        n_new = max(len(c[1]) for c in chunk) + 2
        out = model.generate(
            input_ids=ids,
            attention_mask=am,
            pixel_values=pix,
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
        gen = out[:, T:].tolist()
        for k, (_, tgt, _) in enumerate(chunk):
            hit += gen[k][: len(tgt)] == tgt
    model.train(was)
    return {"exact_match": hit / max(1, len(items)), "answers": len(items)}
