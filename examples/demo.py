"""regate_fx demo: sparsify a tiny model, check it against the dense oracle, train with ReGATE.

Run with ``bash scripts/demo.sh`` (sets up .venv first) or ``.venv/bin/python examples/demo.py``.

1. Build a tiny random-weight Llama (nothing is downloaded) and sparsify it.
2. Print the rewrite report: which residual branches run on kept tokens only.
3. Check the sparse model at rho = 0.4 against the oracle (the dense model run on each sample's
   kept subsequence alone, original position ids, all-ones attention mask): logits at kept
   positions, loss and every parameter gradient. Also rho = 1 against the unsparsified model, and
   the same checks for a tiny LLaVA (CLIP tower + Llama; ``--no-llava`` skips it). Exits 1 on
   any FAIL.
4. Build a small synthetic instruction dataset, compute the text-only teacher cache, and run a
   short ReGATE training loop (dual-cycle schedule, top-k by ``lam * r + (1 - lam) * D``).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import regate_fx

VOCAB = 256
PAD = 0
IMAGE_TOKEN = VOCAB - 1
IMAGE_TOKENS = 5  # LLaVA below: 16x16 image, 8x8 patches + CLS ("full" strategy)
ATOL, RTOL = 2e-5, 2e-4

console = Console()
if not console.is_terminal:  # piped output: wide enough for the report's module paths
    console = Console(width=120)


# --------------------------------------------------------------------------- models
def tiny_llama(attn: str = "sdpa") -> torch.nn.Module:
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads) with random weights."""
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=PAD)
    cfg._attn_implementation = attn
    return tf.LlamaForCausalLM(cfg)


def tiny_llava(attn: str = "sdpa") -> torch.nn.Module:
    """A tiny LLaVA: 2-layer CLIP vision tower, projector, 2-layer Llama."""
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32)
    text = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=PAD)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return tf.LlavaForConditionalGeneration(cfg)


# --------------------------------------------------------------------------- oracle check
def check_batch(multimodal: bool, seed: int, batch: int = 3, seq: int = 40) -> dict:
    """Right-padded random batch (lengths vary), labels = ids at real text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (batch, seq), generator=g)
    lengths = [seq] + [int(x) for x in torch.randint(seq // 2, seq, (batch - 1,), generator=g)]
    am = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, :n] = 1
    ids = ids.masked_fill(am == 0, PAD)
    out = {"input_ids": ids, "attention_mask": am}
    if multimodal:
        ids[:, 1:1 + IMAGE_TOKENS] = IMAGE_TOKEN  # every sample: <bos>, then the image
        out["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=g)
    labels = ids.masked_fill(am == 0, -100).masked_fill(ids == IMAGE_TOKEN, -100)
    out["labels"] = labels
    return out


def keep_exact(batch: dict, rho: float, seed: int, always: torch.Tensor | None = None) -> torch.Tensor:
    """Keep ceil(rho * n) random real positions of each sample (plus `always`)."""
    g = torch.Generator().manual_seed(seed)
    real = batch["attention_mask"].bool()
    scores = torch.rand(real.shape, generator=g).masked_fill(~real, -1.0)
    keep = torch.zeros_like(real)
    for b in range(real.size(0)):
        k = math.ceil(rho * int(real[b].sum()))
        keep[b, scores[b].topk(k).indices] = True
    if always is not None:
        keep |= always & real
    return keep


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(pairs) -> tuple[float, bool]:
    """Max abs error over (actual, expected) pairs, and whether all are within atol + rtol*|ref|."""
    err, ok = 0.0, True
    for a, e in pairs:
        a, e = a.detach().float(), e.detach().float()
        if a.numel() == 0:
            continue
        err = max(err, float((a - e).abs().max()))
        ok = ok and bool(torch.allclose(a, e, atol=ATOL, rtol=RTOL))
    return err, ok


def grad_pairs(g_a: dict, g_e: dict):
    zero = torch.zeros(())
    for n in sorted(set(g_a) | set(g_e)):  # a grad present on one side only must be zero
        yield g_a.get(n, zero), g_e.get(n, zero)


def check_model(name: str, model, smodel, batch: dict, rho: float, seed: int, table: Table) -> bool:
    """Sparse at rho vs the oracle, and rho = 1 vs the unsparsified model; rows into `table`."""
    always = batch["input_ids"] == IMAGE_TOKEN  # visual tokens are always kept (as ReGATE does)
    ok_all = True
    for label, keep in ((f"rho={rho}", keep_exact(batch, rho, seed, always)),
                        ("rho=1", batch["attention_mask"].bool())):
        model.zero_grad(set_to_none=True)
        out = smodel(**batch, keep_mask=keep)
        out.loss.backward()
        g_sparse = grads(model)
        model.zero_grad(set_to_none=True)
        if label == "rho=1":  # reference: the plain (unsparsified, uncompiled) model
            ref = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            counted = target != -100
            ref_loss = F.cross_entropy(ref[counted].float(), target[counted])
            ref_logits = [ref[b, keep[b]] for b in range(keep.size(0))]
        else:
            ref_logits, ref_loss = regate_fx.oracle(model, batch, keep)
        ref_loss.backward()
        g_ref = grads(model)
        model.zero_grad(set_to_none=True)
        # A training step (labels given) returns no (B, T, V) logits; a call without labels does.
        logits = smodel(**{k: v for k, v in batch.items() if k != "labels"}, keep_mask=keep).logits
        e_logits, ok_logits = compare((logits[b, keep[b]], r) for b, r in enumerate(ref_logits))
        pruned_zero = float(logits.detach()[~keep].abs().sum()) == 0.0
        e_loss, ok_loss = compare([(out.loss, ref_loss)])
        e_grad, ok_grad = compare(grad_pairs(g_sparse, g_ref))
        ok = ok_logits and pruned_zero and ok_loss and ok_grad
        ok_all &= ok
        kept = f"{int(keep.sum())}/{int(batch['attention_mask'].sum())}"
        table.add_row(name, label, kept, f"{e_logits:.2e}", f"{e_loss:.2e}", f"{e_grad:.2e}",
                      "[green]PASS" if ok else "[bold red]FAIL")
    return ok_all


# --------------------------------------------------------------------------- data
def synthetic_dataset(n: int, seed: int) -> list[dict]:
    """Prompt (random tokens, labels -100) + answer (supervised) following x' = (5x + 17) mod V.

    The answer rule is learnable from the current token alone, so the loss visibly falls within a
    few dozen steps; the prompt is noise the model only reads as context.
    """
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        p_len = int(torch.randint(8, 17, (1,), generator=g))
        a_len = int(torch.randint(16, 49, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (p_len,), generator=g)
        answer = [int(torch.randint(3, VOCAB, (1,), generator=g))]
        for _ in range(a_len - 1):
            nxt = (5 * answer[-1] + 17) % VOCAB
            answer.append(nxt if nxt >= 3 else nxt + 3)
        ids = torch.cat([torch.tensor([1]), prompt, torch.tensor(answer)])  # <bos> prompt answer
        labels = ids.clone()
        labels[: 1 + p_len] = -100
        data.append({"input_ids": ids, "labels": labels, "sample_id": i})
    return data


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="ReGATE training steps (default 30)")
    ap.add_argument("--backend", default="eager", choices=["eager", "aot_eager", "inductor"],
                    help="torch.compile backend after the ReGATE pass (default eager: fastest to compile on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="teacher cache directory (default: a temp dir)")
    ap.add_argument("--rho", type=float, default=0.4, help="keep fraction of the oracle check and the sparse steps")
    ap.add_argument("--llava", action=argparse.BooleanOptionalAction, default=True,
                    help="also check a tiny LLaVA (CLIP + Llama) against the oracle (default: yes)")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    console.rule("[bold]regate_fx demo")
    console.print(f"torch {torch.__version__}, transformers {tf.__version__}, backend [bold]{args.backend}[/], "
                  f"{torch.get_num_threads()} threads")

    # 1-2. sparsify + report ---------------------------------------------------------------
    model = tiny_llama().train()
    smodel = regate_fx.sparsify(model, backend=args.backend)
    checks = Table(title=f"Sparse vs dense oracle (fp32, atol {ATOL:g}, rtol {RTOL:g})")
    for col in ("model", "keep", "kept/real", "max |d logits|", "|d loss|", "max |d grad|", "result"):
        checks.add_column(col)
    ok = check_model("llama", model, smodel, check_batch(False, args.seed), args.rho, args.seed, checks)
    console.print(smodel.regate_report)  # filled by the first sparse call above
    if args.llava:
        torch.manual_seed(args.seed)
        mm = tiny_llava().train()
        smm = regate_fx.sparsify(mm, backend=args.backend)
        ok &= check_model("llava", mm, smm, check_batch(True, args.seed), args.rho, args.seed, checks)
        console.print(smm.regate_report)
    console.print(checks)
    console.print("[bold green]oracle check: PASS" if ok else "[bold red]oracle check: FAIL")

    # 3. data + teacher cache -------------------------------------------------------------
    dataset = synthetic_dataset(48, args.seed)
    with tempfile.TemporaryDirectory(prefix="regate-demo-") as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "teacher"
        teacher = regate_fx.text_only_teacher(model)  # the student at init, before training
        try:
            cache = regate_fx.TeacherCache.compute(cache_dir, teacher, dataset, batch_size=8)
        except regate_fx.CacheError as e:  # e.g. --cache-dir holds the cache of another --seed
            console.print(f"[bold red]{type(e).__name__}:[/] {e}")
            return 2
        console.print(f"teacher cache: {cache.num_samples} samples, {int(cache.lengths.sum())} tokens, in {cache_dir}")

        # 4. ReGATE training ---------------------------------------------------------------
        cfg = regate_fx.ReGateConfig(warmup_steps=5, cycle_steps=5, dense_steps=1, rho_min=args.rho,
                                     seed=args.seed)
        rg = regate_fx.ReGate(cfg, num_samples=len(dataset), teacher_cache=cache)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(args.seed)
        order: list[int] = []
        losses, sparse_steps = [], 0
        columns = [TextColumn("[bold]ReGATE training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("rho {task.fields[rho]:.2f}  loss {task.fields[loss]:.3f}  kept {task.fields[kept]}")]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=args.steps, rho=1.0, loss=float("nan"), kept="-")
            for step in range(args.steps):
                if len(order) < args.batch_size:
                    order += torch.randperm(len(dataset), generator=g).tolist()
                idx, order = order[: args.batch_size], order[args.batch_size:]
                batch = regate_fx.collate([dataset[i] for i in idx], pad_token_id=PAD, indices=idx)
                keep = rg.keep_mask(batch, step)  # (B, T) bool
                rho = rg.rho(step)
                sparse_steps += rho < 1.0
                out = smodel(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], keep_mask=keep)  # rho = 1: every real token
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                rg.update(batch, out.token_loss, keep)
                losses.append(out.loss.item())
                kept = f"{int(keep.sum())}/{int(batch['attention_mask'].sum())}"
                progress.update(task, advance=1, rho=rho, loss=losses[-1], kept=kept)

    # 5. summary ----------------------------------------------------------------------------
    stats = rg.token_stats()
    n = min(5, len(losses))
    summary = Table(title="ReGATE training summary")
    summary.add_column("")
    summary.add_column("value", justify="right")
    summary.add_row("steps (sparse)", f"{len(losses)} ({sparse_steps})")
    summary.add_row("tokens processed / dense",
                    f"{stats['tokens_processed']} / {stats['tokens_dense']} ({stats['kept_fraction']:.1%})")
    if losses:
        summary.add_row(f"loss, mean of first {n} steps", f"{sum(losses[:n]) / n:.3f}")
        summary.add_row(f"loss, mean of last {n} steps", f"{sum(losses[-n:]) / n:.3f}")
    summary.add_row("oracle check", "[green]PASS" if ok else "[bold red]FAIL")
    summary.add_row("wall time", f"{time.perf_counter() - t0:.1f} s")
    console.print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
