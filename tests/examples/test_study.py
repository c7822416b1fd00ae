"""The study's pipeline end to end in --quick mode (tiny sizes): not the accuracy claim, the plumbing.

Data generation, tokenizer, vision/backbone pretraining, teacher cache, every run of the study
through the public API, summary.json (schema), the table, the plots and the Figure-5 view.
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
NAMES = ("dense", "regate", "regate_lam0", "regate_lam1", "random", "regate_context")
KEYS = ("tokens_fraction", "text_tokens_fraction", "wall_s", "best_val_acc", "final_test_acc")

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(300)
def test_study_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.perf_counter()
    p = _run(["-m", "examples.study", "--quick", "--no-progress", "--out", str(out)], timeout=280)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(NAMES) <= set(summary["runs"])
    for name in NAMES:
        run = summary["runs"][name]
        for k in KEYS:
            assert isinstance(run[k], float) and math.isfinite(run[k]), (name, k, run[k])
        assert 0.0 <= run["best_val_acc"] <= 1.0 and 0.0 <= run["final_test_acc"] <= 1.0
        assert run["wall_s"] > 0
    assert summary["runs"]["dense"]["tokens_fraction"] == 1.0
    assert summary["runs"]["dense"]["text_tokens_fraction"] == 1.0
    for name in NAMES[1:]:  # every sparse run processed fewer tokens than dense
        assert summary["runs"][name]["text_tokens_fraction"] < 1.0
        assert summary["runs"][name]["tokens_fraction"] < 1.0
    assert isinstance(summary["teacher_ratio"], float) and summary["teacher_ratio"] > 0
    for f in ("accuracy.png", "steps.png", "figure5.png", "figure5.html", "results.md",
              "pretrained/tokenizer/tokenizer.json"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<span" in (out / "figure5.html").read_text()
    print(f"--quick took {took:.0f} s")


@pytest.mark.timeout(300)
def test_mechanics_demo() -> None:
    """The old mechanics demo (rewrite report, oracle check, a few ReGATE steps) still runs."""
    p = _run(["examples/demo.py", "--steps", "8", "--no-llava"], timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "oracle check: PASS" in p.stdout
