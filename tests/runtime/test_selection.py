"""Candidates, protected positions, the batched top-k, the exact budget and the random baseline."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_fx.runtime.config import ReGateConfig
from regate_fx.runtime.regate import parse_batch
from regate_fx.runtime.selection import (
    IGNORE_INDEX,
    budget,
    keep_from_scores,
    random_scores,
    sample_positions,
    select_topk,
    supervised_mask,
)

VIS, SPECIAL = 19, 18
CFG = ReGateConfig(visual_token_ids=(VIS,), special_token_ids=(SPECIAL,), lam=0.0, keep_context=False)  # the exact count
RHOS = st.one_of(st.just(1.0), st.sampled_from([0.1, 0.3, 0.4, 0.5, 0.7, 0.9]), st.floats(0.01, 1.0))


def exact_budget(rho: float, n: int) -> int:
    return math.ceil(Fraction(rho).limit_denominator(1_000_000) * n)


@st.composite
def batches(draw):
    """A padded batch (left or right) with prompts, visual ids, a visual mask, special ids."""
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 16))
    left = draw(st.booleans())
    flat = lambda n, elems: draw(st.lists(elems, min_size=n, max_size=n))  # noqa: E731
    lengths = flat(B, st.integers(0, T))
    am = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            am[b, T - n :] = 1
        else:
            am[b, :n] = 1
    ids = torch.tensor(flat(B * T, st.integers(0, 19))).view(B, T)
    sup = torch.tensor(flat(B * T, st.booleans())).view(B, T)
    labels = torch.where(sup & am.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "sample_id": torch.arange(B)}
    if draw(st.booleans()):
        batch["visual_mask"] = torch.tensor(flat(B * T, st.booleans())).view(B, T)
    # scores with many ties, and a few NaNs / infinities
    vals = st.one_of(st.integers(0, 3).map(float), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    scores = torch.tensor(flat(B * T, vals), dtype=torch.float32).view(B, T)
    return batch, scores


def reference_keep(batch, scores, rho):
    """A plain per-sample, per-position Python version of method.md's selection."""
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vm = batch.get("visual_mask")
    B, T = ids.shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    n_prot, n_cand = [], []
    for b in range(B):
        real = [bool(am[b, p]) for p in range(T)]
        prot = [
            real[p] and (int(ids[b, p]) in (VIS, SPECIAL) or (vm is not None and bool(vm[b, p])))
            for p in range(T)
        ]
        cand = [
            real[p] and p + 1 < T and real[p + 1] and int(labels[b, p + 1]) != IGNORE_INDEX and not prot[p]
            for p in range(T)
        ]
        n_prot.append(sum(prot))
        n_cand.append(sum(cand))
        if rho == 1.0:
            keep[b] = torch.tensor(real)
            continue

        def key(p, b=b):
            s = float(scores[b, p])
            s = -math.inf if math.isnan(s) else s
            return (-s, p)

        chosen = sorted((p for p in range(T) if cand[p]), key=key)[: exact_budget(rho, sum(cand))]
        for p in range(T):
            keep[b, p] = prot[p] or p in chosen
        if not keep[b].any() and any(real):  # nothing left: the first real position
            keep[b, real.index(True)] = True
    return keep, torch.tensor(n_prot), torch.tensor(n_cand)


@settings(max_examples=150, deadline=None)
@given(batches(), RHOS)
def test_keep_mask_matches_the_plain_reference_and_counts_exactly(data, rho):
    batch, scores = data
    pb = parse_batch(batch, CFG)
    keep = keep_from_scores(scores, pb.real, pb.protected, pb.candidates, rho)
    ref, n_prot, n_cand = reference_keep(batch, scores, rho)
    assert torch.equal(keep, ref)
    assert torch.equal(pb.protected.sum(1), n_prot)
    assert torch.equal(pb.candidates.sum(1), n_cand)
    assert not (keep & ~pb.real).any(), "padding kept"
    assert not (pb.protected & ~keep).any(), "a protected position was dropped"
    if rho == 1.0:
        assert torch.equal(keep, pb.real)
    else:
        want = n_prot + torch.tensor([exact_budget(rho, int(n)) for n in n_cand])
        fallback = (want == 0) & pb.real.any(1)  # a sample with nothing to keep keeps one position
        assert torch.equal(keep.sum(1), torch.where(fallback, 1, want))
        assert not (keep & ~(pb.protected | pb.candidates))[~fallback].any()
        assert not (keep & pb.supervised)[fallback].any()  # ... that predicts nothing supervised


@settings(max_examples=100, deadline=None)
@given(batches(), st.floats(0.01, 0.99), st.data())
def test_raising_a_score_never_drops_a_kept_position(data, rho, draw):
    batch, scores = data
    pb = parse_batch(batch, CFG)
    keep = keep_from_scores(scores, pb.real, pb.protected, pb.candidates, rho)
    kept_cands = (keep & pb.candidates).nonzero().tolist()
    if not kept_cands:
        return
    b, p = draw.draw(st.sampled_from(kept_cands))
    raised = scores.clone()
    old = float(raised[b, p])
    raised[b, p] = draw.draw(st.sampled_from([float("inf"), 3.0, 4.0])) if math.isnan(old) else old + draw.draw(
        st.sampled_from([0.0, 0.5, 1.0, float("inf")])
    )
    keep2 = keep_from_scores(raised, pb.real, pb.protected, pb.candidates, rho)
    assert keep2[b, p]
    assert torch.equal(keep2.sum(1), keep.sum(1))


def test_ties_go_to_the_lower_position():
    scores = torch.zeros(2, 8)
    cand = torch.ones(2, 8, dtype=torch.bool)
    cand[1, :2] = False
    got = select_topk(scores, cand, torch.tensor([3, 3]))
    assert got[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert got[1].nonzero().flatten().tolist() == [2, 3, 4]
    # NaN ranks lowest among candidates, but a candidate is still chosen over a non-candidate
    s = torch.tensor([[float("nan"), 1.0, float("nan"), 2.0]])
    got = select_topk(s, torch.tensor([[True, True, True, False]]), torch.tensor([2]))
    assert got[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("rho, n, k", [(0.7, 10, 7), (0.4, 5, 2), (0.3, 10, 3), (0.1, 30, 3), (0.4, 0, 0), (1.0, 7, 7), (0.01, 1, 1)])
def test_budget_is_exact(rho, n, k):
    assert int(budget(rho, torch.tensor([n]))[0]) == k


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1000), st.data(), st.integers(0, 5000))
def test_budget_is_ceil_of_the_fraction(q, data, n):
    p = data.draw(st.integers(1, q))
    assert int(budget(p / q, torch.tensor([n]))[0]) == math.ceil(Fraction(p, q) * n)


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, float("nan")])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho must be in"):
        budget(rho, torch.tensor([3]))
    with pytest.raises(ValueError, match="rho must be in"):
        keep_from_scores(torch.zeros(1, 3), *(torch.ones(1, 3, dtype=torch.bool),) * 3, rho)


def test_positions_and_supervision_with_left_and_right_padding():
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    pos, lengths = sample_positions(real)
    assert pos.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, -1, -1]]
    assert lengths.tolist() == [3, 3]
    labels = torch.tensor([[-100, -100, 5, 6, 7], [5, -100, 7, -100, -100]])
    sup = supervised_mask(labels, real)
    # prediction at p is supervised iff labels[p+1] != -100 and both p and p+1 are real
    assert sup.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]


def test_parse_batch_errors():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="'sample_id'"):
        parse_batch({"input_ids": ids}, CFG)
    with pytest.raises(ValueError, match="2 rows"):
        parse_batch({"input_ids": ids, "sample_id": torch.arange(3)}, CFG)
    with pytest.raises(ValueError, match="unshifted"):
        parse_batch({"input_ids": ids, "sample_id": torch.arange(2), "labels": ids[:, :3]}, CFG)
    with pytest.raises(ValueError, match="visual mask"):
        parse_batch({"input_ids": ids, "sample_id": torch.arange(2), "visual_mask": ids[:, :3].bool()}, CFG)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        parse_batch({"input_ids": ids, "sample_id": torch.arange(2), "attention_mask": ids[:1]}, CFG)


def test_keep_context_protects_non_candidates():
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]]),
        "labels": torch.tensor([[-100, -100, -100, 6, 7, 8]]),
        "sample_id": torch.tensor([0]),
    }
    pb = parse_batch(batch, ReGateConfig(keep_context=True, lam=0.0))
    # prompt positions 0, 1 and the last position are protected; 2, 3, 4 are candidates
    assert pb.protected[0].tolist() == [True, True, False, False, False, True]
    assert pb.candidates[0].tolist() == [False, False, True, True, True, False]
    keep = keep_from_scores(torch.zeros(1, 6), pb.real, pb.protected, pb.candidates, 0.4)
    assert int(keep.sum()) == 3 + 2


def test_random_scores_are_a_pure_function_of_seed_step_sample_position():
    sids = torch.tensor([5, 9])
    pos = torch.tensor([[0, 1, 2, 3], [-1, 0, 1, 2]])
    a = random_scores(0, 7, sids, pos)
    assert a.dtype == torch.float32 and ((a >= 0) & (a < 1)).all()
    assert torch.equal(a, random_scores(0, 7, sids, pos))
    # batch composition does not matter: each row alone, rows swapped
    assert torch.equal(a[1:], random_scores(0, 7, sids[1:], pos[1:]))
    assert torch.equal(a.flip(0), random_scores(0, 7, sids.flip(0), pos.flip(0)))
    # the same sample at the same in-sample positions, shifted by padding
    assert torch.equal(a[0, :3], random_scores(0, 7, sids[:1], torch.arange(3).view(1, 3))[0])
    assert not torch.equal(a, random_scores(1, 7, sids, pos))
    assert not torch.equal(a, random_scores(0, 8, sids, pos))


def test_random_scores_are_roughly_uniform():
    pos = torch.arange(4096).view(1, -1)
    s = random_scores(3, 11, torch.tensor([2]), pos)[0]
    hist = torch.histc(s, bins=8, min=0, max=1)
    assert (hist > 4096 / 8 * 0.8).all() and (hist < 4096 / 8 * 1.2).all()
    assert s.unique().numel() > 4000


def test_a_sample_with_nothing_to_keep_keeps_its_first_real_position():
    batch = {
        "input_ids": torch.tensor([[0, 0, 3, 4, 5], [3, 4, 5, 6, 7], [0, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]),
        "labels": torch.tensor([[-100] * 5, [-100, -100, 5, 6, 7], [-100] * 5]),
        "sample_id": torch.arange(3),
    }
    pb = parse_batch(batch, CFG)
    keep = keep_from_scores(torch.zeros(3, 5), pb.real, pb.protected, pb.candidates, 0.4)
    assert keep.tolist() == [
        [False, False, True, False, False],  # prompt only: its first real token
        [False, True, True, False, False],  # ceil(0.4 * 3) = 2 candidates
        [False] * 5,  # no real token at all: nothing
    ]
