"""Keep-fraction schedules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_fx.runtime.config import ReGateConfig
from regate_fx.runtime.schedule import constant_rho, dual_cycle_rho, mean_rho, schedule_rho


def test_dual_cycle_by_hand():
    c = ReGateConfig(warmup_steps=3, cycle_steps=4, dense_steps=1, rho_min=0.25)
    got = [schedule_rho(c, t) for t in range(12)]
    assert got == [1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 1.0, 0.25, 0.25, 0.25, 1.0]


def test_defaults_warmup_then_cycles_of_ten():
    c = ReGateConfig()
    assert all(schedule_rho(c, t) == 1.0 for t in range(100))
    cycle = [schedule_rho(c, 100 + u) for u in range(10)]
    assert cycle == [1.0] * 2 + [0.2] * 8
    assert [schedule_rho(c, 110 + u) for u in range(10)] == cycle
    assert mean_rho(c, 100) == 1.0
    assert mean_rho(c, 100 + 10 * 1000) == pytest.approx((100 + 1000 * 3.6) / 10100)


def test_constant_schedule():
    c = ReGateConfig(schedule="constant", warmup_steps=2, rho_min=0.5)
    assert [schedule_rho(c, t) for t in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.5]
    assert constant_rho(0, rho=0.3) == 0.3


def test_degenerate_cycles():
    all_dense = ReGateConfig(warmup_steps=0, cycle_steps=3, dense_steps=3, rho_min=0.2)
    no_dense = ReGateConfig(warmup_steps=0, cycle_steps=3, dense_steps=0, rho_min=0.2)
    assert all(schedule_rho(all_dense, t) == 1.0 for t in range(9))
    assert all(schedule_rho(no_dense, t) == 0.2 for t in range(9))


def test_integer_like_steps_are_accepted():
    import numpy as np
    import torch

    c = ReGateConfig(warmup_steps=0, cycle_steps=2, dense_steps=1, rho_min=0.5)
    assert schedule_rho(c, np.int64(1)) == schedule_rho(c, torch.tensor(1)) == 0.5


@pytest.mark.parametrize("step", [-1, 1.0, True, "3", None])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step must be an int"):
        dual_cycle_rho(step, warmup_steps=0, cycle_steps=2, dense_steps=1, rho_min=0.5)


def test_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        mean_rho(ReGateConfig(), 0)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(0, 20),
    c=st.integers(1, 12),
    data=st.data(),
    rho=st.floats(0.01, 1.0),
    t=st.integers(0, 500),
)
def test_dual_cycle_properties(w, c, data, rho, t):
    cd = data.draw(st.integers(0, c))
    kw = dict(warmup_steps=w, cycle_steps=c, dense_steps=cd, rho_min=rho)
    r = dual_cycle_rho(t, **kw)
    assert r in (1.0, rho)
    if t >= w:
        assert dual_cycle_rho(t + c, **kw) == r  # periodic after the warm-up
        assert (r == 1.0) == ((t - w) % c < cd or rho == 1.0)
    else:
        assert r == 1.0
    # per cycle: exactly C_d dense steps (when rho < 1)
    if rho < 1.0:
        cycle = [dual_cycle_rho(w + k, **kw) for k in range(c)]
        assert cycle.count(1.0) == cd
