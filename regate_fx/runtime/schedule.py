"""Keep-fraction schedules: pure functions of the global step."""

from __future__ import annotations

import operator

from regate_fx.runtime.config import ReGateConfig

__all__ = ["constant_rho", "dual_cycle_rho", "mean_rho", "schedule_rho"]


def _check_step(step: int) -> int:
    """``step`` as an int (Python, numpy or 0-d integer tensor) >= 0; bools and floats refused."""
    try:
        value = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"step must be an int >= 0 (the global training step), got {step!r}")
    return value


def dual_cycle_rho(step: int, *, warmup_steps: int, cycle_steps: int, dense_steps: int, rho_min: float) -> float:
    """Keep fraction of the dual-cycle schedule (paper Sec. 3.2, Eq. 4).

    ``step < W`` gives 1; otherwise with ``u = (step - W) mod C``, ``u < C_d`` gives 1 and any
    other ``u`` gives ``rho_min``.

    Args:
        step: global training step, from 0.
        warmup_steps: W.
        cycle_steps: C (>= 1).
        dense_steps: C_d (0 <= C_d <= C).
        rho_min: keep fraction of the sparse steps.

    Returns:
        The fraction rho of candidate positions to keep at ``step``.
    """
    step = _check_step(step)
    if step < warmup_steps:
        return 1.0
    u = (step - warmup_steps) % cycle_steps
    return 1.0 if u < dense_steps else float(rho_min)


def constant_rho(step: int, *, rho: float, warmup_steps: int = 0) -> float:
    """Keep fraction of the constant schedule: 1 during the warm-up, then ``rho``.

    Args:
        step: global training step, from 0.
        rho: keep fraction after the warm-up.
        warmup_steps: dense steps first (0 for a schedule constant from step 0).

    Returns:
        The fraction rho of candidate positions to keep at ``step``.
    """
    step = _check_step(step)
    return 1.0 if step < warmup_steps else float(rho)


def schedule_rho(config: ReGateConfig, step: int) -> float:
    """Keep fraction at ``step`` under ``config``'s schedule."""
    if config.schedule == "constant":
        return constant_rho(step, rho=config.rho_min, warmup_steps=config.warmup_steps)
    return dual_cycle_rho(
        step,
        warmup_steps=config.warmup_steps,
        cycle_steps=config.cycle_steps,
        dense_steps=config.dense_steps,
        rho_min=config.rho_min,
    )


def mean_rho(config: ReGateConfig, num_steps: int) -> float:
    """Mean keep fraction over steps ``0 .. num_steps - 1`` (the schedule's average budget).

    With the defaults this tends to ``(C_d + (C - C_d) * rho_min) / C = 0.58`` for long runs.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    return sum(schedule_rho(config, t) for t in range(num_steps)) / num_steps
