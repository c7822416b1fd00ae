"""ReGateConfig: defaults, validation messages, round trips."""

from __future__ import annotations

import dataclasses

import pytest

from regate_fx.runtime.config import ReGateConfig


def test_defaults_are_the_documented_ones():
    c = ReGateConfig()
    assert (c.schedule, c.warmup_steps, c.cycle_steps, c.dense_steps) == ("dual_cycle", 100, 10, 2)
    assert (c.rho_min, c.beta, c.lam) == (0.2, 0.7, 0.5)
    assert c.keep_context  # the study's evidence (docs/runtime.md)
    assert c.selection == "regate" and c.needs_reference
    assert c.visual_token_ids == () and c.special_token_ids == ()


@pytest.mark.parametrize(
    "field, value",
    [
        ("schedule", "cosine"),
        ("selection", "topk"),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("warmup_steps", True),
        ("cycle_steps", 0),
        ("dense_steps", 11),
        ("dense_steps", -1),
        ("rho_min", 0.0),
        ("rho_min", 1.5),
        ("rho_min", float("nan")),
        ("rho_min", "0.4"),
        ("beta", 1.0),
        ("beta", -0.1),
        ("lam", 1.01),
        ("lam", float("inf")),
        ("seed", 1.0),
        ("keep_context", 1),
        ("sample_id_key", ""),
        ("visual_token_ids", (1, -2)),
        ("visual_token_ids", 5),
        ("special_token_ids", ("a",)),
    ],
)
def test_bad_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError) as e:
        ReGateConfig(**{field: value})
    msg = str(e.value)
    assert f"ReGateConfig.{field}" in msg
    assert repr(value) in msg


def test_dense_steps_bound_follows_cycle_steps():
    ReGateConfig(cycle_steps=4, dense_steps=4)  # all dense is allowed
    with pytest.raises(ValueError, match=r"cycle_steps=4"):
        ReGateConfig(cycle_steps=4, dense_steps=5)


def test_lists_become_tuples_and_the_config_is_frozen_and_hashable():
    c = ReGateConfig(visual_token_ids=[7, 5], special_token_ids=[1])
    assert c.visual_token_ids == (7, 5) and c.special_token_ids == (1,)
    hash(c)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta = 0.5  # type: ignore[misc]


def test_dict_round_trip_and_unknown_keys():
    c = ReGateConfig(schedule="constant", rho_min=0.25, lam=0.0, visual_token_ids=(9,), seed=3)
    d = c.to_dict()
    assert d["visual_token_ids"] == [9]
    assert ReGateConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown fields"):
        ReGateConfig.from_dict({**d, "rho": 0.5})


@pytest.mark.parametrize(
    "kw, needs",
    [({}, True), ({"lam": 0.0}, False), ({"lam": 1.0}, True), ({"selection": "random"}, False)],
)
def test_needs_reference(kw, needs):
    assert ReGateConfig(**kw).needs_reference is needs
