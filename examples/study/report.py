"""The study's report: ``summary.json``, a markdown table, PNG plots, the Figure-5-style view."""

from __future__ import annotations

import html
import json
import math
import platform
import statistics as st
from pathlib import Path

import torch

NAMES = ("dense", "regate", "regate_lam0", "regate_lam1", "random", "regate_context")
LABELS = {
    "dense": "dense",
    "regate": "ReGATE, prompt pruned (keep_context=False)",
    "regate_lam0": "ReGATE lam 0 (student only)",
    "regate_lam1": "ReGATE lam 1 (teacher only)",
    "random": "random dropping",
    "regate_context": "ReGATE, prompt kept visible (lam 0.5)",
}
COLORS = {"dense": "black", "regate": "tab:brown", "regate_lam0": "tab:orange", "regate_lam1": "tab:purple",
          "random": "tab:blue", "regate_context": "tab:red"}
KEYS = ("tokens_fraction", "text_tokens_fraction", "wall_s", "best_val_acc", "final_test_acc")
EXTRA = ("compile_s", "median_step_s", "final_val_acc", "final_test_text_acc", "final_test_loss", "min_val_loss",
         "image_words_kept_at_sparse_steps")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None]
    return st.stdev(xs) if len(xs) > 1 else 0.0


def summarise(per_seed: list[dict], args, prep, total_s: float) -> dict:
    names = [n for n in NAMES if n in per_seed[0]["runs"]] + \
            [n for n in per_seed[0]["runs"] if n not in NAMES]
    runs = {}
    for n in names:
        rs = [s["runs"][n] for s in per_seed]
        d = {k: _mean([r[k] for r in rs]) for k in KEYS}
        d.update({k: _mean([r[k] for r in rs]) for k in EXTRA})
        d["std"] = {k: _sd([r[k] for r in rs]) for k in ("best_val_acc", "final_test_acc", "wall_s")}
        d["per_seed"] = {k: [r[k] for r in rs] for k in KEYS}
        d["wall_vs_dense"] = d["wall_s"] / runs["dense"]["wall_s"] if "dense" in runs else None
        d["regate_config"] = rs[0]["regate_config"]
        runs[n] = d
    if "dense" in runs:
        runs["dense"]["wall_vs_dense"] = 1.0
    # Steps (and dense tokens) each sparse run needs to first reach dense's best val accuracy.
    for n in names:
        hits = []
        for s in per_seed:
            target = max(c["val_acc"] for c in s["runs"]["dense"]["curve"]) if "dense" in s["runs"] else None
            step = None
            if target is not None:
                for c in s["runs"][n]["curve"]:
                    if c["val_acc"] >= target - 1e-9:
                        step = c["step"]
                        break
            hits.append(step)
        runs[n]["first_step_at_dense_best"] = hits
    tr = [s["teacher"] for s in per_seed]
    return {
        "runs": runs,
        "teacher_ratio": _mean([t["teacher_ratio"] for t in tr]),
        "teacher": {"r_image": _mean([t["r_image"] for t in tr]), "r_text": _mean([t["r_text"] for t in tr])},
        "seeds": [s["seed"] for s in per_seed],
        "config": {k: v for k, v in vars(args).items() if k not in ("set", "out")} | {"set": args.set},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
                    or platform.machine()},
        "total_s": total_s,
        "prep_s": prep["prep_s"],
        "teacher_s": _mean([s["teacher_s"] for s in per_seed]),
    }


def table(summary: dict) -> str:
    n = len(summary["seeds"])
    pm = (lambda m, s: f"{m:.3f} ± {s:.3f}") if n > 1 else (lambda m, s: f"{m:.3f}")
    lines = [
        f"Seeds: {', '.join(map(str, summary['seeds']))} (mean" + (" ± sd" if n > 1 else "") + "). "
        f"Tokens: share of dense's LLM tokens (all = visual + text; text = text only). Wall: training "
        f"steps only (forward, backward, optimiser, selection), runs interleaved step by step. Accuracy: "
        f"teacher-forced argmax on the answer words that need the image. "
        f"teacher_ratio = {summary['teacher_ratio']:.1f} "
        f"({summary['teacher']['r_image']:.2f} vs {summary['teacher']['r_text']:.3f} nats).",
        "",
        "| run | tokens (all) | tokens (text) | wall s | wall / dense | best val acc | final test acc "
        "| image words kept at sparse steps | val loss (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["runs"].items():
        kept = r["image_words_kept_at_sparse_steps"]
        lines.append(
            f"| {LABELS.get(name, name)} (`{name}`) | {r['tokens_fraction']:.2f} | {r['text_tokens_fraction']:.2f} "
            f"| {r['wall_s']:.0f} | {r['wall_vs_dense']:.2f} | {pm(r['best_val_acc'], r['std']['best_val_acc'])} "
            f"| {pm(r['final_test_acc'], r['std']['final_test_acc'])} | "
            f"{'-' if kept is None else f'{kept:.0%}'} | {r['min_val_loss']:.3f} |")
    if n > 1:
        lines += ["", "Per seed (best val acc / final test acc / wall s):", ""]
        lines.append("| run | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " |")
        lines.append("|---|" + "---|" * n)
        for name, r in summary["runs"].items():
            ps = r["per_seed"]
            lines.append(f"| `{name}` | " + " | ".join(
                f"{ps['best_val_acc'][i]:.3f} / {ps['final_test_acc'][i]:.3f} / {ps['wall_s'][i]:.0f}"
                for i in range(n)) + " |")
    return "\n".join(lines) + "\n"


def _curves(per_seed, name):
    """Mean over seeds at each evaluation: (tokens share, text share, wall s, step, acc, sd)."""
    cs = [s["runs"][name]["curve"] for s in per_seed]
    m = min(len(c) for c in cs)
    out = []
    for i in range(m):
        pts = [c[i] for c in cs]
        dense_total = [s["runs"]["dense"]["curve"][-1]["tokens_dense"] if "dense" in s["runs"] else
                       pts[0]["tokens_dense"] for s in per_seed]
        text_total = [s["runs"]["dense"]["curve"][-1]["text_tokens_dense"] if "dense" in s["runs"] else
                      pts[0]["text_tokens_dense"] for s in per_seed]
        accs = [p["val_acc"] for p in pts]
        out.append((_mean([p["tokens"] / t for p, t in zip(pts, dense_total)]),
                    _mean([p["text_tokens"] / t for p, t in zip(pts, text_total)]),
                    _mean([p["wall_s"] for p in pts]), pts[0]["step"], _mean(accs), _sd(accs)))
    return out


def plots(out: Path, per_seed: list[dict], summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(per_seed)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for name in summary["runs"]:
        cv = _curves(per_seed, name)
        for ax, xi in zip(axes, (1, 0, 2)):
            xs = [c[xi] for c in cv]
            ys = [c[4] for c in cv]
            ax.plot(xs, ys, label=LABELS.get(name, name), color=COLORS.get(name), lw=1.8)
            if n > 1:
                ax.fill_between(xs, [c[4] - c[5] for c in cv], [c[4] + c[5] for c in cv],
                                color=COLORS.get(name), alpha=0.12)
    dense_best = summary["runs"].get("dense", {}).get("best_val_acc")
    for ax, xl in zip(axes, ("text tokens processed (share of dense's total)",
                             "all LLM tokens processed (share of dense's total)",
                             "training wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val accuracy on image words")
        ax.grid(alpha=0.3)
        if dense_best is not None:
            ax.axhline(dense_best, color="black", ls=":", lw=1)
    axes[0].legend(fontsize=8, loc="lower right")
    seeds = f"mean of {n} seeds (band: ± sd)" if n > 1 else f"seed {per_seed[0]['seed']}"
    fig.suptitle(f"Held-out accuracy on the words that need the image, against tokens processed and wall "
                 f"time ({seeds}; dotted: dense's best)", fontsize=11)
    fig.tight_layout()
    p1 = out / "accuracy.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in summary["runs"]:
        cs = [s["runs"][name]["curve"] for s in per_seed]
        m = min(len(c) for c in cs)
        steps = [cs[0][i]["step"] for i in range(m)]
        axes[0].plot(steps, [_mean([c[i]["val_acc"] for c in cs]) for i in range(m)],
                     label=LABELS.get(name, name), color=COLORS.get(name))
        axes[1].plot(steps, [_mean([c[i]["val_loss"] for c in cs]) for i in range(m)],
                     label=LABELS.get(name, name), color=COLORS.get(name))
    axes[0].set_ylabel("val accuracy on image words")
    axes[1].set_ylabel("val loss (all answer tokens)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "steps.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


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
                ax.text(x + w / 2, y + 0.02, t["word"], ha="center", va="center", fontsize=9,
                        fontweight="bold" if t["kept"] else "normal",
                        color="black" if t["kept"] else "#999999")
                if t["kept"]:
                    ax.add_patch(Rectangle((x, y - 0.3), w, 0.84, fill=False, ec="black", lw=0.9))
            else:
                ax.text(x + w / 2, y + 0.02, t["word"], ha="center", va="center", fontsize=9,
                        color="#2a7a2a" if (t["kept"] or f5["keep_context"]) else "#bbbbbb", style="italic")
            x += w + 0.35
    import textwrap

    caption = (f"Sample {f5['sample_id']} at a sparse step (rho {f5['rho']:.2f}) of `{f5['run']}` after "
            f"training. Answer words: top bar = teacher reference loss r (red, max {vmax_r:.2f} nats), bottom bar = "
            f"student difficulty D (blue, max {vmax_d:.2f}); boxed bold = kept, grey = pruned. Italic green = "
            f"prompt (context, " + ("kept visible" if f5["keep_context"] else "not supervised") + ").")
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
            tip = (f"r = {t['r']:.3f} nats" if t["r"] is not None else "r = -") + \
                  (f", D = {t['D']:.3f}" if t["D"] is not None else ", D = unobserved") + \
                  (", kept" if t["kept"] else ", pruned") + (", needs the image" if t["tag"] == 2 else "")
            spans.append(
                f'<span class="w {"kept" if t["kept"] else "pruned"}" title="{tip}" '
                f'style="border-top-color:{hexc(_rgb(t["r"], vmax_r, red))};'
                f'border-bottom-color:{hexc(_rgb(t["D"], vmax_d, blue))}">{word}</span>')
        if t["word"] == "[EOS]":
            spans.append("<br>")
    page = f"""<!doctype html><meta charset="utf-8"><title>ReGATE: which words are kept</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:2.6}}
.w{{border-top:7px solid;border-bottom:7px solid;padding:0 3px;margin:0 1px}}
.kept{{font-weight:bold;outline:1px solid #333}} .pruned{{color:#999}} .ctx{{color:#2a7a2a;font-style:italic;margin:0 3px}}
p{{line-height:1.4}}</style>
<h2>Sample {f5['sample_id']}: reference loss, student difficulty, kept / pruned</h2>
<p>Run <code>{f5['run']}</code> (lam {f5['lam']}, keep_context {f5['keep_context']}), a sparse step
(rho {f5['rho']:.2f}) after training. Each answer word has a <b style="color:#d22">top bar</b>: the frozen
text-only teacher's reference loss r (darker = higher, max {vmax_r:.2f} nats) and a
<b style="color:#25d">bottom bar</b>: the student's running difficulty D (max {vmax_d:.2f}).
Bold boxed words are kept (their prediction is computed), grey words are pruned. Green italic words are
the prompt (not supervised). Hover a word for its numbers.</p>
<p>{' '.join(spans)}</p>"""
    ph = out / "figure5.html"
    ph.write_text(page)
    return [p, ph]


def write(out: Path, per_seed: list[dict], args, prep, total_s: float) -> dict:
    summary = summarise(per_seed, args, prep, total_s)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = table(summary)
    (out / "results.md").write_text(md)
    print(md, flush=True)
    plots(out, per_seed, summary)
    f5 = next((s["fig5"] for s in per_seed if s.get("fig5")), None)
    if f5:
        figure5(out, f5)
        (out / "figure5.json").write_text(json.dumps(f5, indent=1))
    return summary
