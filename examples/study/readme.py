"""The README's study block, generated from ``docs/results/summary.json`` (the default run) and
``docs/results/full/summary.json`` (the full study), written between the markers.

    python -m examples.study.readme            # rewrite the block in README.md
    python -m examples.study.readme --check    # exit 1 if the block is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plan import write_atomic

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- study-results:begin (generated: python -m examples.study.readme) -->"
END = "<!-- study-results:end -->"


def _f(v, fmt=".2f"):
    return "-" if v is None else f"{v:{fmt}}"


def _pm(d):
    return f"{d['mean']:.3f} ± {d['sd']:.3f}" if d["sd"] else f"{d['mean']:.3f}"


def _table(s: dict) -> list[str]:
    lines = [
        "| run | best val acc | test acc | generated EM | text tokens | train time, end to end / dense "
        "| reached dense's best: seeds, text tokens, train time, end to end |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in s["runs"].items():
        x = r.get("reach_dense_best", {})
        if n == "dense" or not x:
            reach = "-"
        elif x["text_tokens_fraction"] is None:
            reach = f"{x['reached']}"
        else:
            reach = (
                f"{x['reached']}, {_f(x['text_tokens_fraction'])}, {_f(x['train_time_fraction'])}x, "
                f"{_f(x['end_to_end_fraction'])}x"
            )
        lines.append(
            f"| `{n}` (lr {r['lr']:g}) | {_pm(r['best_val_acc'])} | {_pm(r['test_acc'])} "
            f"| {_pm(r['gen_exact_match'])} | {r['text_tokens_fraction']['mean']:.2f} "
            f"| {_f(r.get('train_time_vs_dense'))}x, {_f(r.get('end_to_end_vs_dense'))}x | {reach} |"
        )
    return lines


def _setting(s: dict) -> str:
    rule = s["plateau_rule"]
    lr = ", ".join(f"{k} {v:g}" for k, v in s["tuned_lr"].items())
    src = (
        f"tuned on seed {s['sweep_seed']} over {', '.join(f'{x:g}' for x in s['lr_grid'])}"
        if s["lr_grid"]
        else "the full study's tuned values"
    )
    capped = ", ".join(f"`{n}` {r['stopped'].count('max_steps')}/{len(r['stopped'])}" for n, r in s["runs"].items())
    return (
        f"lr {lr} ({src}; every control at ReGATE's); each run trained until its plateau (validation every "
        f"{rule['eval_every']} steps, patience {rule['patience_evals']} evaluations, not before step "
        f"{rule.get('min_steps', 0)}) or the {rule['max_steps']}-step cap, and reported at its best checkpoint "
        f"(stopped by the cap, not a plateau: {capped})"
    )


def block(full: dict, demo: dict | None = None) -> str:
    """The README text between the markers."""
    n = len(full["seeds"])
    out = [
        BEGIN,
        "",
        f"**Full study** (`bash scripts/study.sh`; {n} independent seeds "
        f"{', '.join(map(str, full['seeds']))}, each with its own data, pretraining, splits and init; "
        f"mean ± sd; files in [docs/results/full/](docs/results/full/results.md)). {_setting(full)}. "
        "Accuracy: teacher-forced, on the answer words that need the image. Generated EM: greedy "
        "`generate`, whole answer exact match (a metric no part of the method aims at). Text tokens: "
        "share of the text tokens a dense step processes, over the run. Train time and end to end: the "
        "whole run to its stop, over dense's (runs of one seed interleaved step by step). Reaching dense's best: "
        "cost as a share of dense's cost to reach it; end to end counts the teacher pass and "
        "compilation.",
        "",
    ]
    out += _table(full)
    pr = full.get("paired", {})
    if pr:
        out += [
            "",
            "ReGATE minus each run, paired by seed (best val acc; higher in how many seeds; test acc; generated EM):",
            "",
        ]
        for k, p in pr.items():
            v, t, g = p["best_val_acc"], p["test_acc"], p["gen_exact_match"]
            out.append(
                f"- {k.replace('regate - ', 'vs `') + '`'}: {v['mean']:+.3f} "
                f"({', '.join(f'{x:+.3f}' for x in v['per_seed'])}; higher in {v['a_wins']}/{v['seeds']}); "
                f"test {t['mean']:+.3f}; generated EM {g['mean']:+.3f}"
            )
    if pr:
        allw = [k.split(" - ")[1] for k, p in pr.items() if p["best_val_acc"]["a_wins"] == p["best_val_acc"]["seeds"]]
        notw = [
            f"`{k.split(' - ')[1]}` ({p['best_val_acc']['a_wins']}/{p['best_val_acc']['seeds']})"
            for k, p in pr.items()
            if p["best_val_acc"]["a_wins"] < p["best_val_acc"]["seeds"]
        ]
        out += [
            "",
            "In short: ReGATE's best validation accuracy is above "
            + (", ".join(f"`{n}`" for n in allw) or "no run")
            + " in every seed; it is **not** above "
            + (", ".join(notw) or "-")
            + " in every seed (seeds where it is higher in brackets). "
            "What this means, run by run: [docs/study.md](docs/study.md#what-regate-gains-over-each-control-and-what-it-does-not).",
        ]
    if demo is not None:
        out += [
            "",
            f"**Default run** (`bash scripts/demo.sh`; seed {', '.join(map(str, demo['seeds']))}; "
            f"{_setting(demo)}; files in [docs/results/](docs/results/results.md)):",
            "",
        ]
        out += _table(demo)
    out += ["", END]
    return "\n".join(out)


def render(readme: str, text: str) -> str:
    """``readme`` with the text between the markers replaced by ``text`` (markers included)."""
    i, j = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:i] + text + readme[j:]


def current(root: Path = ROOT) -> tuple[str, str]:
    """(README text, the README as it should be)."""
    full = json.loads((root / "docs/results/full/summary.json").read_text())
    dp = root / "docs/results/summary.json"
    demo = json.loads(dp.read_text()) if dp.exists() else None
    readme = (root / "README.md").read_text()
    return readme, render(readme, block(full, demo))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.study.readme", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README block is out of date")
    args = ap.parse_args(argv)
    old, new = current()
    if args.check:
        print("README study block: " + ("up to date" if old == new else "OUT OF DATE"))
        return 0 if old == new else 1
    if old != new:
        write_atomic(ROOT / "README.md", new)
    print("README study block written" if old != new else "README study block already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
