"""A resumable run plan: one JSON record per finished run, written atomically; a rerun skips them.

Records live in ``OUT/runs/<phase>/seed<seed>/<name>.json``. A run is either finished (its record
exists, complete) or not started: an interrupted run leaves no record and is redone from scratch on
the next invocation (its seed's other unfinished runs with it, in lockstep). Each record keeps the
plateau rule it ran under: a run is redone when the rule changes (patience, floor, evaluation
interval), and when the step cap is raised past a run that stopped at the old cap (training is
deterministic and every run of a seed reads the same batch order, so its first steps repeat exactly
and it goes on to its plateau); a run that stopped at its plateau within the new cap is kept. The plateau rule
(:class:`Plateau`) is the study's early-stopping rule, the same for every run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    """``write_atomic`` of ``obj`` as indented JSON."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


@dataclass
class Plateau:
    """Early stopping on validation accuracy, the same rule for every run.

    Evaluate every ``eval_every`` steps (and at step 0). A run stops at the evaluation that is the
    ``patience``-th in a row without a new best (a new best beats the old one by more than
    ``min_delta``), but not before ``min_steps`` (accuracy first dips while the fresh projector
    settles, so an early stretch without progress is not a plateau), or at ``max_steps``. Its
    result is the best evaluation (the checkpoint there).
    """

    eval_every: int
    patience: int
    max_steps: int
    min_steps: int = 0
    min_delta: float = 0.0
    best: float = -1.0
    best_step: int = -1
    since: int = 0
    stopped: str | None = None
    history: list = field(default_factory=list)

    def update(self, step: int, acc: float) -> bool:
        """Record the evaluation at ``step``; True if the run is now stopped (and why in ``stopped``)."""
        self.history.append((step, acc))
        if acc > self.best + self.min_delta:
            self.best, self.best_step, self.since = acc, step, 0
        else:
            self.since += 1
        if self.since >= self.patience and step >= self.min_steps:
            self.stopped = "plateau"
        elif step >= self.max_steps:
            self.stopped = "max_steps"
        return self.stopped is not None

    def rule(self) -> dict:
        """The rule's parameters, as recorded in ``summary.json``."""
        return {
            "metric": "val_acc (teacher-forced argmax on the image words)",
            "eval_every": self.eval_every,
            "patience_evals": self.patience,
            "patience_steps": self.patience * self.eval_every,
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
            "min_delta": self.min_delta,
            "reported": "the best evaluation (its checkpoint is tested and generated from)",
        }


class Plan:
    """The study's runs as records on disk: ``done``, ``load``, ``save``, and a progress line."""

    def __init__(self, out: Path, total: int, rule: dict | None = None) -> None:
        self.root = Path(out) / "runs"
        self.rule = rule  # Plateau.rule() of this invocation: records made under another rule are redone
        self.total = total
        self.t0 = time.perf_counter()
        self.finished_now = 0

    def path(self, phase: str, seed: int, name: str) -> Path:
        return self.root / phase / f"seed{seed}" / f"{name}.json"

    def done(self, phase: str, seed: int, name: str, lr: float | None = None) -> bool:
        """Whether the run has a finished record this invocation would reuse (same rule, and the same
        lr when one is given: a sweep that tunes a different lr redoes the runs trained at the old one)."""
        p = self.path(phase, seed, name)
        if not p.exists():
            return False
        try:
            rec = json.loads(p.read_text())
        except (ValueError, OSError):
            return False
        if not rec.get("finished"):
            return False
        if lr is not None and rec.get("lr") is not None and abs(float(rec["lr"]) - lr) > 1e-12 * max(lr, 1.0):
            return False
        return self.rule is None or self._same_run_under(rec)

    def _same_run_under(self, rec: dict) -> bool:
        """Whether a record is what this invocation's rule would produce: the same stopping rule, and
        a stop this cap allows (a plateau within it, or the same cap)."""
        assert self.rule is not None
        old = rec.get("plateau_rule")
        if old is not None and any(old.get(k) != self.rule[k] for k in ("eval_every", "patience_evals", "min_steps", "min_delta")):
            return False
        cap, stop = self.rule["max_steps"], int(rec.get("stopped_step", 0))
        return stop <= cap and (rec.get("stopped") != "max_steps" or stop == cap)

    def load(self, phase: str, seed: int, name: str) -> dict:
        return json.loads(self.path(phase, seed, name).read_text())

    def save(self, phase: str, seed: int, name: str, record: dict) -> None:
        write_json(self.path(phase, seed, name), dict(record, plateau_rule=self.rule, finished=True))
        self.finished_now += 1

    def count_done(self) -> int:
        recs = (p for p in self.root.glob("*/seed*/*.json") if p.name[0] != ".")
        return sum(1 for p in recs if self.done(p.parent.parent.name, int(p.parent.name[4:]), p.stem))

    def progress(self) -> str:
        n = self.count_done()
        el = time.perf_counter() - self.t0
        bar = "#" * round(20 * n / max(1, self.total))
        eta = (
            f", ~{el / self.finished_now * (self.total - n) / 60:.0f} min left at this pace"
            if self.finished_now
            else ""
        )
        return f"[{bar:<20}] {n}/{self.total} runs done ({el / 60:.1f} min this invocation{eta})"
