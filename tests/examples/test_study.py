"""The study's pipeline end to end in --quick mode (toy sizes): not the accuracy claim, the plumbing.

Data generation, tokenizer, pretraining, teacher pass, the lr sweep, every run kind of the study
through the public API, each to its plateau, summary.json (schema), resume (a finished run is not
redone), the plateau rule, the README's generated block, the plots and the Figure-5 view.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("dense", "regate", "random", "dense_masked", "regate_lam0", "regate_lam1", "regate_pruned")

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _mtimes(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed*/*.json")}


@pytest.mark.timeout(400)
def test_study_quick_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = ["-m", "examples.study", "--quick", "--no-progress", "--out", str(out)]
    t0 = time.perf_counter()
    p = _run(cmd, timeout=380)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    # every run kind, each with its tuned lr, its plateau, its figures
    assert list(s["runs"]) == list(NAMES)
    assert s["lr_grid"] == [1e-3, 3e-3] and s["sweep_seed"] == 100 and s["sweep_seed"] not in s["seeds"]
    assert set(s["sweep"]) == {"dense", "regate"} and all(len(v) == 2 for v in s["sweep"].values())
    for fam in ("dense", "regate"):  # the tuned lr is the sweep's best
        best = max(s["sweep"][fam].items(), key=lambda kv: (kv[1]["best_val_acc"], -float(kv[0])))
        assert s["tuned_lr"][fam] == float(best[0])
    assert s["runs"]["dense"]["lr"] == s["tuned_lr"]["dense"]
    assert all(s["runs"][n]["lr"] == s["tuned_lr"]["regate"] for n in NAMES[1:])
    assert s["plateau_rule"]["patience_evals"] == 3 and s["plateau_rule"]["max_steps"] == 16
    assert set(s["seed_config"]["0"]) >= {"data_seed", "pretrain_seed", "init_seed", "splits", "model"}
    for n in NAMES:
        r = s["runs"][n]
        for k in ("best_val_acc", "test_acc", "gen_exact_match", "train_s", "compile_s", "end_to_end_s"):
            v = r[k]["mean"]
            assert isinstance(v, float) and math.isfinite(v), (n, k, v)
        assert 0.0 <= r["best_val_acc"]["mean"] <= 1.0 and 0.0 <= r["gen_exact_match"]["mean"] <= 1.0
        assert r["stopped"][0] in ("plateau", "max_steps")
        assert r["best_step"]["mean"] <= r["stopped_step"]["mean"] <= 16
        assert "reach_dense_best" in r
    for n in ("dense", "dense_masked"):  # dense compute
        assert s["runs"][n]["text_tokens_fraction"]["mean"] == 1.0
    for n in ("regate", "random", "regate_lam0", "regate_lam1", "regate_pruned"):
        assert s["runs"][n]["text_tokens_fraction"]["mean"] < 1.0
    assert (
        s["runs"]["regate_pruned"]["text_tokens_fraction"]["mean"] < s["runs"]["regate"]["text_tokens_fraction"]["mean"]
    )
    # the teacher pass is charged to the runs that read r, and only to them
    assert s["runs"]["regate"]["teacher_s"]["mean"] > 0 and s["runs"]["dense"]["teacher_s"]["mean"] == 0
    assert s["runs"]["random"]["teacher_s"]["mean"] == 0 and s["runs"]["regate_lam0"]["teacher_s"]["mean"] == 0
    assert set(s["paired"]) == {f"regate - {n}" for n in NAMES if n != "regate"}
    for f in ("accuracy.png", "steps.png", "walltime.png", "figure5.png", "figure5.html", "results.md"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing finished is redone
    before = _mtimes(out)
    assert len(before) == 4 + 7
    p = _run(cmd, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "already finished: skipped" in p.stdout and "lockstep" not in p.stdout
    assert _mtimes(out) == before
    # a lost record is redone, alone
    (out / "runs/main/seed0/random.json").unlink()
    p = _run(cmd, timeout=200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "runs random (lr" in p.stdout and "finished, skipped: dense, regate," in p.stdout
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k.name != "random.json"} == {
        k: v for k, v in before.items() if k.name != "random.json"
    }
    print(f"--quick took {took:.0f} s, then {time.perf_counter() - t0 - took:.0f} s for the two resumes")


def test_plateau_rule() -> None:
    from examples.study.plan import Plateau

    r = Plateau(eval_every=10, patience=2, max_steps=100)
    assert not r.update(0, 0.3) and not r.update(10, 0.5) and not r.update(20, 0.5)  # a tie is not a new best
    assert r.update(30, 0.4) and r.stopped == "plateau" and (r.best, r.best_step) == (0.5, 10)
    r = Plateau(eval_every=10, patience=5, max_steps=30)
    assert not r.update(0, 0.1) and not r.update(10, 0.2) and not r.update(20, 0.3)
    assert r.update(30, 0.4) and r.stopped == "max_steps" and r.best_step == 30
    r = Plateau(eval_every=10, patience=1, max_steps=100, min_delta=0.05)
    assert not r.update(0, 0.3) and r.update(10, 0.34) and r.best_step == 0


def test_write_atomic(tmp_path: Path) -> None:
    from examples.study.plan import write_json

    p = tmp_path / "a" / "b.json"
    write_json(p, {"x": 1})
    write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2} and [q.name for q in p.parent.iterdir()] == ["b.json"]


def test_plan_redoes_runs_the_rule_would_not_produce(tmp_path: Path) -> None:
    from examples.study.plan import Plan, Plateau

    def rule(patience=8, cap=800):
        return Plateau(eval_every=20, patience=patience, max_steps=cap, min_steps=300).rule()

    Plan(tmp_path, 3, rule()).save("main", 0, "capped", {"stopped": "max_steps", "stopped_step": 800})
    Plan(tmp_path, 3, rule()).save("main", 0, "plateau", {"stopped": "plateau", "stopped_step": 600})
    same, raised, lowered = Plan(tmp_path, 3, rule()), Plan(tmp_path, 3, rule(cap=2400)), Plan(tmp_path, 3, rule(cap=500))
    assert same.done("main", 0, "capped") and same.done("main", 0, "plateau") and same.count_done() == 2
    assert not raised.done("main", 0, "capped") and raised.done("main", 0, "plateau") and raised.count_done() == 1
    assert not lowered.done("main", 0, "plateau") and not lowered.done("main", 0, "capped")
    assert Plan(tmp_path, 3, rule(patience=20)).count_done() == 0  # another stopping rule: everything redone
    assert not same.done("main", 0, "never")
    Plan(tmp_path, 3, rule()).save("main", 1, "regate", {"stopped": "plateau", "stopped_step": 600, "lr": 3e-4})
    assert same.done("main", 1, "regate", 3e-4) and same.done("main", 1, "regate")
    assert not same.done("main", 1, "regate", 1e-3)  # the sweep tuned another lr: redone at the new one


def test_readme_block_matches_results() -> None:
    """README.md's study block is what docs/results/**/summary.json generate."""
    from examples.study import readme

    old, new = readme.current(ROOT)
    assert old == new, "README study block is out of date: python -m examples.study.readme"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mechanics_demo() -> None:
    """The old mechanics demo (rewrite report, oracle check, a few ReGATE steps) still runs."""
    p = _run(["examples/demo.py", "--steps", "8", "--no-llava"], timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "oracle check: PASS" in p.stdout
