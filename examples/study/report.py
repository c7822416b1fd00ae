"""The study's report: ``summary.json`` from the run records, a markdown table, PNG plots, Figure 5."""

from __future__ import annotations

import html
import json
import platform
import statistics as st
from pathlib import Path

import torch

from .plan import Plateau, write_atomic, write_json

NAMES = ("dense", "regate", "random", "dense_masked", "regate_lam0", "regate_lam1", "regate_pruned")
LABELS = {
    "dense": "dense",
    "regate": "ReGATE (lam 0.5, prompt kept visible)",
    "random": "random dropping, same budget",
    "dense_masked": "dense compute, loss on ReGATE's picks",
    "regate_lam0": "ReGATE lam 0 (student only)",
    "regate_lam1": "ReGATE lam 1 (teacher only)",
    "regate_pruned": "ReGATE lam 0.5, prompt pruned",
}
WHAT = {
    "dense": "the plain model, every token computed and counted",
    "regate": "ReGATE lam 0.5 with the prompt kept visible (keep_context=True, the config default)",
    "random": "random positions at exactly ReGATE's per-sample budget (selection='random')",
    "dense_masked": "every token computed (dense cost), the loss counts only the positions ReGATE (lam 0.5) "
    "selects: RHO-1-style loss reweighting without skipping compute",
    "regate_lam0": "student difficulty D only (lam 0), prompt visible",
    "regate_lam1": "teacher reference loss r only (lam 1), prompt visible",
    "regate_pruned": "ReGATE lam 0.5 with the prompt pruned too (keep_context=False, the paper read literally)",
}
COLORS = {
    "dense": "black",
    "regate": "tab:red",
    "random": "tab:blue",
    "dense_masked": "tab:green",
    "regate_lam0": "tab:orange",
    "regate_lam1": "tab:purple",
    "regate_pruned": "tab:brown",
}
METRICS = (
    "best_val_acc",
    "test_acc",
    "gen_exact_match",
    "test_text_acc",
    "best_step",
    "stopped_step",
    "tokens_fraction",
    "text_tokens_fraction",
    "train_s",
    "compile_s",
    "teacher_s",
    "end_to_end_s",
    "median_step_s",
    "image_words_kept_at_sparse_steps",
)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None]
    return st.stdev(xs) if len(xs) > 1 else 0.0


def _records(plan, phase: str, seeds, names) -> dict:
    return {s: {n: plan.load(phase, s, n) for n in names if plan.done(phase, s, n)} for s in seeds}


def tuned_lr(plan, args) -> dict:
    """Per swept family, the grid lr with the best validation accuracy on the sweep seed (ties: the
    smaller lr)."""
    out = {}
    for fam in ("dense", "regate"):
        recs = [(plan.load("sweep", args.sweep_seed, f"{fam}_lr{lr:g}"), lr) for lr in sorted(args.lr_grid)]
        out[fam] = max(recs, key=lambda rl: (rl[0]["best_val_acc"], -rl[1]))[1]
    return out


def _reach(rec: dict, dense: dict) -> dict:
    """Cost for ``rec`` to first reach dense's best validation accuracy, as a share of dense's cost to
    reach it (tokens, training time, end to end = teacher pass + compile + training)."""
    target = dense["best_val_acc"]
    d = next(c for c in dense["curve"] if c["step"] == dense["best_step"])
    hit = next((c for c in rec["curve"] if c["val_acc"] >= target - 1e-12), None)
    if hit is None:
        return {"reached": False}
    d_e2e = dense["teacher_s"] + dense["compile_s"] + d["wall_s"]
    e2e = rec["teacher_s"] + rec["compile_s"] + hit["wall_s"]
    return {
        "reached": True,
        "step": hit["step"],
        "dense_step": d["step"],
        "tokens_fraction": hit["tokens"] / max(1, d["tokens"]),
        "text_tokens_fraction": hit["text_tokens"] / max(1, d["text_tokens"]),
        "train_time_fraction": hit["wall_s"] / max(1e-9, d["wall_s"]),
        "end_to_end_fraction": e2e / max(1e-9, d_e2e),
    }


def _paired(a: dict, b: dict, seeds, key: str) -> dict:
    diffs = [a[s][key] - b[s][key] for s in seeds]
    return {
        "per_seed": diffs,
        "mean": _mean(diffs),
        "sd": _sd(diffs),
        "a_wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "seeds": len(diffs),
    }


def summarise(plan, args, lr: dict, prep_s: dict, total_s: float) -> dict:
    from .__main__ import ALL_RUNS, SWEPT, specs, sweep_specs
    from .pipeline import pretrain_seconds

    seeds = list(args.seeds)
    main = _records(plan, "main", seeds, args.runs)
    names = [n for n in NAMES if n in args.runs and all(n in main[s] for s in seeds)]
    runs = {}
    for n in names:
        rs = [main[s][n] for s in seeds]
        d = {"what": WHAT[n], "lr": rs[0]["lr"], "regate_config": rs[0]["regate_config"], "masked": rs[0]["masked"]}
        for k in METRICS:
            d[k] = {"mean": _mean([r[k] for r in rs]), "sd": _sd([r[k] for r in rs]), "per_seed": [r[k] for r in rs]}
        d["stopped"] = [r["stopped"] for r in rs]
        if "dense" in names:
            reach = [_reach(main[s][n], main[s]["dense"]) for s in seeds]
            ok = [x for x in reach if x["reached"]]
            d["reach_dense_best"] = {
                "reached": f"{len(ok)}/{len(seeds)}",
                "per_seed": reach,
                **{
                    k: _mean([x[k] for x in ok])
                    for k in ("tokens_fraction", "text_tokens_fraction", "train_time_fraction", "end_to_end_fraction")
                },
            }
            dd = [main[s]["dense"] for s in seeds]
            d["train_time_vs_dense"] = _mean([r["train_s"] for r in rs]) / _mean([r["train_s"] for r in dd])
            d["end_to_end_vs_dense"] = _mean([r["end_to_end_s"] for r in rs]) / _mean([r["end_to_end_s"] for r in dd])
            d["per_step_time_vs_dense"] = _mean([r["median_step_s"] / x["median_step_s"] for r, x in zip(rs, dd)])
        runs[n] = d
    paired = {}
    base = {s: main[s] for s in seeds}
    for n in names:
        if n == "regate" or "regate" not in names:
            continue
        paired[f"regate - {n}"] = {
            k: _paired({s: base[s]["regate"] for s in seeds}, {s: base[s][n] for s in seeds}, seeds, k)
            for k in ("best_val_acc", "test_acc", "gen_exact_match")
        }
    sweep = {}
    if args.sweep:
        sw = _records(plan, "sweep", [args.sweep_seed], [s.name for s in sweep_specs(args)])[args.sweep_seed]
        for fam in SWEPT:
            sweep[fam] = {
                f"{x:g}": {
                    k: sw[f"{fam}_lr{x:g}"][k]
                    for k in ("best_val_acc", "best_step", "stopped_step", "test_acc", "stopped")
                }
                for x in args.lr_grid
            }
    teach = [main[s]["regate"]["teacher"] for s in seeds if "regate" in main[s] and main[s]["regate"]["teacher"]]
    rule = Plateau(args.eval_every, args.patience, args.max_steps, args.min_steps).rule()
    size = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")}
    return {
        "seeds": seeds,
        "seed_config": {
            str(s): {
                "data_seed": s,
                "splits": {"train": args.train_size, "val": args.val_size, "test": args.test_size},
                "pretrain_seed": s,
                "init_seed": s,
                "batch_order_seed": s,
                "selection_seed": s,
                "backbone_steps": args.backbone_steps,
                "vision_steps": args.vision_steps,
                "model": size,
                "pretrain_s": pretrain_seconds(s, Path(args.out), args),
            }
            for s in seeds
        },
        "lr_grid": list(args.lr_grid) if args.sweep else None,
        "sweep_seed": args.sweep_seed if args.sweep else None,
        "sweep": sweep,
        "tuned_lr": lr,
        "lr_source": "sweep" if args.sweep else "defaults (the full study's tuned_lr)",
        "run_lr": {n: runs[n]["lr"] for n in names},
        "plateau_rule": rule,
        "lr_schedule": f"AdamW, linear warm-up {args.lr_warmup} steps then constant; batch {args.batch_size}; "
        "grad-norm clip 1",
        "regate_schedule": {k: v for k, v in (ALL_RUNS["regate"][0] or {}).items()} | dict(args.quick_base),
        "controls": {n: WHAT[n] for n in names},
        "runs": runs,
        "paired": paired,
        "teacher": {
            "r_image": _mean([t["r_image"] for t in teach]),
            "r_text": _mean([t["r_text"] for t in teach]),
            "teacher_ratio": _mean([t["teacher_ratio"] for t in teach]),
        },
        "generation": {
            "metric": "greedy model.generate per answer turn (earlier turns given), exact match of "
            "the whole answer incl. [EOS], on the best checkpoint",
            "test_samples": args.gen_samples,
        },
        "wall_time_note": "train_s: the timed training steps (selection, forward, backward, optimiser, D update) "
        "to the stop, runs interleaved step by step; compile_s: capture and first calls before "
        "them; teacher_s: the seed's teacher pass, charged to every run that reads r; "
        "end_to_end_s = teacher_s + compile_s + train_s. Evaluation is not included. "
        "A 2-core machine shared with other jobs.",
        "sweep_pretrain_s": pretrain_seconds(args.sweep_seed, Path(args.out), args) if args.sweep else None,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "sweep_lrs", "sweep_only", "report")},
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "total_s_last_invocation": total_s,
        "per_seed_specs": {
            n: {"lr": x.lr, "regate": x.regate, "masked": x.masked} for n, x in ((x.name, x) for x in specs(args, lr))
        },
    }


def _f2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pm(d: dict, f: str = ".3f") -> str:
    m, s = d["mean"], d["sd"]
    if m is None:
        return "-"
    return f"{m:{f}} ± {s:{f}}" if s else f"{m:{f}}"


def table(summary: dict) -> str:
    """The results as markdown: settings, the main table, reaching dense's best, per seed, paired."""
    seeds = summary["seeds"]
    runs = summary["runs"]
    rule = summary["plateau_rule"]
    lines = [
        f"Seeds {', '.join(map(str, seeds))} (mean ± sd), each with its own data, pretraining, splits "
        f"and init. lr: {', '.join(f'{k} {v:g}' for k, v in summary['tuned_lr'].items())} "
        f"({summary['lr_source']}"
        + (
            f", grid {', '.join(f'{x:g}' for x in summary['lr_grid'])} on seed {summary['sweep_seed']}"
            if summary["lr_grid"]
            else ""
        )
        + "; every control runs at ReGATE's lr). "
        f"Plateau: eval every {rule['eval_every']} steps, stop after {rule['patience_evals']} evals without a "
        f"new best, cap {rule['max_steps']} steps. Accuracy: teacher-forced argmax on the answer words "
        f"that need the image, at the best checkpoint. Generated EM: greedy `generate`, whole answer exact.",
        "",
        "| run | best val acc | test acc | generated EM | text tokens | steps to best / stop "
        "| train time / dense | end-to-end / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        lines.append(
            f"| `{n}` | {_pm(r['best_val_acc'])} | {_pm(r['test_acc'])} | {_pm(r['gen_exact_match'])} "
            f"| {r['text_tokens_fraction']['mean']:.2f} | {r['best_step']['mean']:.0f} / {r['stopped_step']['mean']:.0f} "
            f"| {r.get('train_time_vs_dense', 1.0):.2f} | {r.get('end_to_end_vs_dense', 1.0):.2f} |"
        )
    if "dense" in runs:
        lines += [
            "",
            "To reach dense's best validation accuracy (per seed: its own dense best), as a share of "
            "dense's cost to reach it (mean over the seeds that reached it):",
            "",
            "| run | reached | text tokens | all tokens | train time | end to end |",
            "|---|---|---|---|---|---|",
        ]
        for n, r in runs.items():
            x = r["reach_dense_best"]
            f = _f2
            lines.append(
                f"| `{n}` | {x['reached']} | {f(x['text_tokens_fraction'])} | {f(x['tokens_fraction'])} "
                f"| {f(x['train_time_fraction'])} | {f(x['end_to_end_fraction'])} |"
            )
    lines += [
        "",
        "Per seed (best val acc / test acc / generated EM):",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for n, r in runs.items():
        lines.append(
            f"| `{n}` | "
            + " | ".join(
                f"{r['best_val_acc']['per_seed'][i]:.3f} / {r['test_acc']['per_seed'][i]:.3f} / "
                f"{r['gen_exact_match']['per_seed'][i]:.3f}"
                for i in range(len(seeds))
            )
            + " |"
        )
    if summary["paired"]:
        lines += [
            "",
            "Paired, ReGATE minus each run, per seed (best val acc; test acc; generated EM):",
            "",
            "| pair | best val acc | wins | test acc | generated EM |",
            "|---|---|---|---|---|",
        ]
        for k, p in summary["paired"].items():
            v, t, g = p["best_val_acc"], p["test_acc"], p["gen_exact_match"]
            lines.append(
                f"| {k} | {v['mean']:+.3f} ({', '.join(f'{x:+.3f}' for x in v['per_seed'])}) "
                f"| {v['a_wins']}/{v['seeds']} | {t['mean']:+.3f} | {g['mean']:+.3f} |"
            )
    lines += [
        "",
        "Wall time, seconds (mean): teacher pass + compile + training = end to end:",
        "",
        "| run | teacher | compile | train | end to end | median step |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in runs.items():
        lines.append(
            f"| `{n}` | {r['teacher_s']['mean']:.1f} | {r['compile_s']['mean']:.1f} | {r['train_s']['mean']:.0f} "
            f"| {r['end_to_end_s']['mean']:.0f} | {r['median_step_s']['mean']:.3f} |"
        )
    if summary["sweep"]:
        lines += [
            "",
            f"lr sweep (seed {summary['sweep_seed']}, best val acc at the plateau):",
            "",
            "| run | " + " | ".join(f"lr {x:g}" for x in summary["lr_grid"]) + " |",
            "|---|" + "---|" * len(summary["lr_grid"]),
        ]
        for fam, d in summary["sweep"].items():
            lines.append(
                f"| `{fam}` | " + " | ".join(f"{d[f'{x:g}']['best_val_acc']:.3f}" for x in summary["lr_grid"]) + " |"
            )
    t = summary["teacher"]
    if t["teacher_ratio"]:
        lines += [
            "",
            f"teacher_ratio {t['teacher_ratio']:.1f} (reference loss {t['r_image']:.2f} nats on image "
            f"words vs {t['r_text']:.3f} on text answer words).",
        ]
    return "\n".join(lines) + "\n"


def plots(out: Path, main: dict, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = summary["seeds"]
    paths = []
    for fname, xkey, xl in (
        ("accuracy.png", "text_tokens", "text tokens processed (millions)"),
        ("steps.png", "step", "optimiser step"),
        ("walltime.png", "wall_s", "training wall time (s)"),
    ):
        fig, axes = plt.subplots(1, len(seeds), figsize=(5.2 * len(seeds), 4.2), squeeze=False)
        for ax, s in zip(axes[0], seeds):
            for n in summary["runs"]:
                c = main[s][n]["curve"]
                xs = [p[xkey] / (1e6 if xkey == "text_tokens" else 1) for p in c]
                ax.plot(xs, [p["val_acc"] for p in c], color=COLORS.get(n), lw=1.5, label=n)
            if "dense" in summary["runs"]:
                ax.axhline(main[s]["dense"]["best_val_acc"], color="black", ls=":", lw=1)
            ax.set_title(f"seed {s}")
            ax.set_xlabel(xl)
            ax.set_ylabel("val accuracy on image words")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, loc="lower right")
        fig.suptitle(
            "Validation accuracy on the words that need the image, each run to its plateau (dotted: dense's best)",
            fontsize=10,
        )
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def _rgb(v, vmax, base):
    a = 0.0 if v is None else max(0.0, min(1.0, v / vmax))
    return tuple(1 - a * (1 - c) for c in base)


def figure5(out: Path, f5: dict) -> list[Path]:
    """One sample's words: reference loss r (top bar), student difficulty D (bottom bar), kept/pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    toks = f5["tokens"]
    vmax_r = max([t["r"] for t in toks if t["r"] is not None] + [1e-3])
    vmax_d = max([t["D"] for t in toks if t["D"] is not None] + [1e-3])
    red, blue = (0.85, 0.15, 0.15), (0.15, 0.35, 0.85)
    # lay words out in lines, breaking after each [EOS]
    lines, cur = [], []
    for t in toks:
        cur.append(t)
        if t["word"] in ("[EOS]",) or (t["word"] == "?" and len(cur) > 1) or len(cur) >= 18:
            lines.append(cur)
            cur = []
    if cur:
        lines.append(cur)
    fig_w, lh = 15, 0.62
    fig, ax = plt.subplots(figsize=(fig_w, 1.2 + lh * len(lines)))
    ax.set_xlim(0, 100)
    ax.set_ylim(-len(lines) * 1.0 - 0.2, 1.2)
    ax.axis("off")
    for li, line in enumerate(lines):
        x, y = 0.5, -li * 1.0
        for t in line:
            w = 0.9 + 0.95 * len(t["word"])
            if t["supervised"]:
                ax.add_patch(Rectangle((x, y + 0.28), w, 0.22, color=_rgb(t["r"], vmax_r, red), lw=0))
                ax.add_patch(Rectangle((x, y - 0.26), w, 0.22, color=_rgb(t["D"], vmax_d, blue), lw=0))
                ax.text(
                    x + w / 2,
                    y + 0.02,
                    t["word"],
                    ha="center",
                    va="center",
                    fontsize=9,
                    fontweight="bold" if t["kept"] else "normal",
                    color="black" if t["kept"] else "#999999",
                )
                if t["kept"]:
                    ax.add_patch(Rectangle((x, y - 0.3), w, 0.84, fill=False, ec="black", lw=0.9))
            else:
                ax.text(
                    x + w / 2,
                    y + 0.02,
                    t["word"],
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="#2a7a2a" if (t["kept"] or f5["keep_context"]) else "#bbbbbb",
                    style="italic",
                )
            x += w + 0.35
    import textwrap

    caption = (
        f"Sample {f5['sample_id']} at a sparse step (rho {f5['rho']:.2f}) of `{f5['run']}` after "
        f"training. Answer words: top bar = teacher reference loss r (red, max {vmax_r:.2f} nats), bottom bar = "
        f"student difficulty D (blue, max {vmax_d:.2f}); boxed bold = kept, grey = pruned. Italic green = "
        f"prompt (context, " + ("kept visible" if f5["keep_context"] else "not supervised") + ")."
    )
    ax.text(0.5, 1.0, textwrap.fill(caption, 190), fontsize=8.5, va="center")
    fig.tight_layout()
    p = out / "figure5.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)

    def hexc(c):
        return "#%02x%02x%02x" % tuple(int(255 * v) for v in c)

    spans = []
    for t in toks:
        word = html.escape(t["word"])
        if not t["supervised"]:
            spans.append(f'<span class="ctx">{word}</span>')
        else:
            tip = (
                (f"r = {t['r']:.3f} nats" if t["r"] is not None else "r = -")
                + (f", D = {t['D']:.3f}" if t["D"] is not None else ", D = unobserved")
                + (", kept" if t["kept"] else ", pruned")
                + (", needs the image" if t["tag"] == 2 else "")
            )
            spans.append(
                f'<span class="w {"kept" if t["kept"] else "pruned"}" title="{tip}" '
                f'style="border-top-color:{hexc(_rgb(t["r"], vmax_r, red))};'
                f'border-bottom-color:{hexc(_rgb(t["D"], vmax_d, blue))}">{word}</span>'
            )
        if t["word"] == "[EOS]":
            spans.append("<br>")
    page = f"""<!doctype html><meta charset="utf-8"><title>ReGATE: which words are kept</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:2.6}}
.w{{border-top:7px solid;border-bottom:7px solid;padding:0 3px;margin:0 1px}}
.kept{{font-weight:bold;outline:1px solid #333}} .pruned{{color:#999}} .ctx{{color:#2a7a2a;font-style:italic;margin:0 3px}}
p{{line-height:1.4}}</style>
<h2>Sample {f5["sample_id"]}: reference loss, student difficulty, kept / pruned</h2>
<p>Run <code>{f5["run"]}</code> (lam {f5["lam"]}, keep_context {f5["keep_context"]}), a sparse step
(rho {f5["rho"]:.2f}) after training. Each answer word has a <b style="color:#d22">top bar</b>: the frozen
text-only teacher's reference loss r (darker = higher, max {vmax_r:.2f} nats) and a
<b style="color:#25d">bottom bar</b>: the student's running difficulty D (max {vmax_d:.2f}).
Bold boxed words are kept (their prediction is computed), grey words are pruned. Green italic words are
the prompt (not supervised). Hover a word for its numbers.</p>
<p>{" ".join(spans)}</p>"""
    ph = out / "figure5.html"
    write_atomic(ph, page)
    return [p, ph]


def write(out: Path, plan, args, lr: dict, prep_s: dict, total_s: float) -> dict:
    """summary.json, results.md, the plots and the Figure-5 view, from the records on disk."""
    summary = summarise(plan, args, lr, prep_s, total_s)
    write_json(out / "summary.json", summary)
    md = table(summary)
    write_atomic(out / "results.md", md)
    print(md, flush=True)
    main = _records(plan, "main", summary["seeds"], list(summary["runs"]))
    plots(out, main, summary)
    f5 = out / "figure5-data" / f"seed{summary['seeds'][0]}.json"
    if args.fig5 and f5.exists():
        figure5(out, json.loads(f5.read_text()))
        write_atomic(out / "figure5.json", f5.read_text())
    return summary
