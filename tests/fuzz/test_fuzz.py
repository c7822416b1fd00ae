"""Architecture fuzzer (issue 6): on every random decoder, the pass is exact or refuses with a reason.

Each example builds a fresh random model (:mod:`tests.fuzz.arch`), sparsifies it (strict, eager
backend) and runs one sparse step. Either the first sparse call raises ``RewriteError`` /
``KeepMaskError`` carrying a structured ``Reason``, or the kept logits, the loss and every gradient
equal an independent reference (:mod:`tests.fuzz.check`) and the kept logits ignore the ids of
pruned tokens. Any other exception fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from tests.fuzz.arch import VOCAB, ArchSpec, FuzzLM, Mixer, arch_specs
from tests.fuzz.check import (BatchSpec, assert_pruned_ids_ignored, assert_same, assert_structured_refusal,
                              check_refused_or_exact, dense_reference, make_batch, new_sparse, oracle,
                              reference_step, sparse_step)
from regate_fx import RewriteError

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
FAST = settings(max_examples=10, deadline=None, suppress_health_check=_HEALTH)
FAST_SMALL = settings(max_examples=6, deadline=None, suppress_health_check=_HEALTH)
SLOW = settings(max_examples=2000, deadline=None, suppress_health_check=_HEALTH)


@dataclass(frozen=True)
class FuzzCase:
    """A drawn architecture and the batch / keep mask it runs on."""

    spec: ArchSpec
    batch: BatchSpec

    def _repr_pretty_(self, p, cycle):  # hypothesis' printer: one line per part
        p.text(f"FuzzCase(\n    spec={self.spec!r},\n    batch={self.batch!r})")

    def build(self):
        return FuzzLM(self.spec), *make_batch(self.batch, VOCAB)


@st.composite
def cases(draw, full_keep: bool = False) -> FuzzCase:
    """A random architecture, a padded batch (B 1-3, T 4-12) and a keep mask at rho in (0, 1]."""
    spec = draw(arch_specs())
    b = draw(st.integers(1, 3))
    t = 2 * draw(st.integers(2, 6)) if spec.even_seq else draw(st.integers(4, 12))
    pad = draw(st.sampled_from(["none", "left", "right"])) if spec.pads else "none"
    if pad == "none":
        lengths = None
    elif spec.even_seq:
        lengths = tuple(2 * draw(st.integers(1, t // 2)) for _ in range(b))
    else:
        lengths = tuple(draw(st.integers(1, t)) for _ in range(b))
    rho = 1.0 if full_keep else draw(st.floats(0.05, 1.0))
    bs = BatchSpec(b, t, pad, lengths, positions=draw(st.booleans()), rho=rho, seed=draw(st.integers(0, 2**16)),
                   even=spec.even_seq)
    return FuzzCase(spec, bs)


def _note(case: FuzzCase, keep) -> None:
    note(f"keep mask:\n{keep.int()}\nreproduce: model = FuzzLM({case.spec!r}); "
         f"batch, keep = make_batch({case.batch!r}, VOCAB)")


def _refused_or_exact(case: FuzzCase) -> None:
    model, batch, keep = case.build()
    _note(case, keep)
    event(check_refused_or_exact(model, batch, keep, VOCAB, then_keep_all=True))


def _rho_one(case: FuzzCase) -> None:
    model, batch, keep = case.build()
    _note(case, keep)
    event(check_refused_or_exact(model, batch, keep, VOCAB, reference=dense_reference, invariance=False))


def _pruned_ids_ignored(case: FuzzCase) -> None:
    model, batch, keep = case.build()
    _note(case, keep)
    smodel = new_sparse(model)
    got = sparse_step(smodel, model, batch, keep)
    event("refused" if got is None else "rewritten")
    if got is not None:
        assert_pruned_ids_ignored(smodel, batch, keep, got[0], VOCAB, seed=case.batch.seed + 1)


# --- default run: 10 examples (6 for the two cheaper checks), one dynamo capture each (~1.5 CPU-s) ---

@pytest.mark.timeout(1800)  # ~1.5 CPU-minutes; shrinking a failure can add 5 min
@FAST
@given(case=cases())
def test_refused_or_exact(case):
    """Refused with a structured reason, or exact against the per-sample oracle at any rho; then
    pruned ids must not reach kept logits, and a second step keeping every real token must equal
    the unsparsified model (same compiled graph, new kept length)."""
    _refused_or_exact(case)


@FAST_SMALL
@given(case=cases(full_keep=True))
def test_keep_all_is_the_unsparsified_model(case):
    """rho = 1: refused, or the unsparsified model's logits, loss and gradients at real positions."""
    _rho_one(case)


@FAST_SMALL
@given(case=cases())
def test_pruned_token_ids_do_not_change_kept_logits(case):
    """Oracle-free: when the model is rewritten, pruned tokens' ids cannot reach kept logits."""
    _pruned_ids_ignored(case)


# --- long run ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
@SLOW
@given(case=cases())
def test_refused_or_exact_long(case):
    _refused_or_exact(case)


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)
@settings(SLOW, max_examples=500)
@given(case=cases(full_keep=True))
def test_keep_all_is_the_unsparsified_model_long(case):
    _rho_one(case)


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)
@settings(SLOW, max_examples=500)
@given(case=cases())
def test_pruned_token_ids_do_not_change_kept_logits_long(case):
    _pruned_ids_ignored(case)


# --- the fuzzer can fail ------------------------------------------------------------------------------

PLAIN = [
    ArchSpec(),
    ArchSpec(attn="eager", kv_heads=2, pos="learned", norm_type="rms", mlp="gated"),
    ArchSpec(block="parallel", mask="additive", tied=True),
    ArchSpec(block="cohere", attn="softcap", gqa="expand", kv_heads=1),
]


class _DenseAsSparse:
    """Pretends to be a sparsified model but runs the dense model on every token."""

    def __init__(self, model):
        self.model = model

    def __call__(self, keep_mask, labels=None, **inputs):
        logits = self.model(**inputs).logits * keep_mask[..., None]  # (B, T, V), zero where pruned
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("spec", PLAIN, ids=repr)
def test_checks_reject_the_dense_model(spec):
    """The oracle and invariance checks fail a model that lets pruned tokens in (rho = 0.5)."""
    model, (batch, keep) = FuzzLM(spec), make_batch(BatchSpec(2, 10, "left", (10, 7), rho=0.5, seed=3), VOCAB)
    logits, loss, g = reference_step(dense_reference, model, batch, keep)
    fake = type("Out", (), {})()
    fake.logits = torch.zeros(2, 10, VOCAB)
    for b in range(2):
        fake.logits[b, keep[b]] = logits[b].detach()
    fake.loss = loss
    ref = reference_step(oracle, model, batch, keep)
    with pytest.raises(AssertionError, match="logits of sample"):
        assert_same(fake, keep, g, *ref)
    with pytest.raises(AssertionError, match="pruned token ids"):
        assert_pruned_ids_ignored(_DenseAsSparse(model), batch, keep, fake, VOCAB)


def test_refusal_without_a_reason_is_not_accepted():
    with pytest.raises(AssertionError, match="without a report"):
        assert_structured_refusal(RewriteError("graph break"))


@pytest.mark.parametrize("spec", PLAIN, ids=repr)
def test_plain_decoders_are_rewritten_and_exact(spec):
    """Token-wise decoders in the fuzzer's space are not just refused: they run sparse, exactly."""
    model, (batch, keep) = FuzzLM(spec), make_batch(BatchSpec(3, 9, "right", (9, 5, 2), rho=0.5, seed=1), VOCAB)
    assert check_refused_or_exact(model, batch, keep, VOCAB).startswith("exact")


def test_mixer_in_fuzz_space_is_refused():
    """A cumsum in an MLP is the classic refused shape: the fuzzer's refusal path is exercised."""
    spec = ArchSpec(mixers=(Mixer("cumsum", "mlp", 1),))
    model, (batch, keep) = FuzzLM(spec), make_batch(BatchSpec(2, 8, rho=0.5), VOCAB)
    assert check_refused_or_exact(model, batch, keep, VOCAB) == "refused"
