"""DifficultyStore: the EMA against a plain reference, memmap == memory, state round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_fx.runtime.store import DifficultyStore

N = 6
LENGTHS = [5, 1, 8, 3, 6, 2]


class ReferenceStore:
    """The EMA as a dict, one observation at a time, in float32."""

    def __init__(self, beta: float) -> None:
        self.b, self.omb = np.float32(beta), np.float32(1.0 - beta)
        self.d: dict[tuple[int, int], np.float32] = {}

    def observe(self, ids, positions, values) -> None:
        for i, p, v in zip(ids, positions, values):
            v = np.float32(v)
            old = self.d.get((i, p))
            self.d[(i, p)] = v if old is None else np.float32(old * self.b + v * self.omb)


@st.composite
def steps(draw):
    """A sequence of steps: batch sample ids and observations (repeats allowed) with values."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        # repeated ids: DistributedSampler pads ranks by repeating samples
        sids = draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=4))
        obs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(sids),
                    st.integers(0, 7),
                    st.floats(0, 20, width=32, allow_subnormal=False),
                ),
                max_size=12,
            )
        )
        obs = [(i, p % LENGTHS[i], v) for i, p, v in obs]
        out.append((sids, obs))
    return out


def run(store: DifficultyStore, plan) -> None:
    for sids, obs in plan:
        store.observe(
            torch.tensor(sids),
            torch.tensor([LENGTHS[i] for i in sids]),
            torch.tensor([o[0] for o in obs], dtype=torch.long),
            torch.tensor([o[1] for o in obs], dtype=torch.long),
            torch.tensor([o[2] for o in obs], dtype=torch.float32),
            processed=len(obs),
            dense=sum(LENGTHS[i] for i in sids),
        )


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(
                a[k].view(torch.int32) if a[k].dtype == torch.float32 else a[k],
                b[k].view(torch.int32) if b[k].dtype == torch.float32 else b[k],
            ), k  # bitwise, NaN included
        else:
            assert a[k] == b[k], k


@settings(max_examples=80, deadline=None)
@given(steps(), st.sampled_from([0.0, 0.3, 0.7, 0.9, 0.99]))
def test_ema_matches_the_plain_reference_exactly(plan, beta):
    store = DifficultyStore(N, beta)
    ref = ReferenceStore(beta)
    for sids, obs in plan:
        run(store, [(sids, obs)])
        if obs:
            ref.observe(*zip(*obs))
    seen = {i for sids, _ in plan for i in sids}
    for i in range(N):
        got = store.sample(i)
        if i not in seen:
            assert got is None and store.length(i) is None
            continue
        assert got.dtype == np.float32 and got.shape == (LENGTHS[i],)
        want = np.array([ref.d.get((i, p), np.nan) for p in range(LENGTHS[i])], dtype=np.float32)
        np.testing.assert_array_equal(got, want)
    assert store.num_updates == len(plan)
    assert store.tokens_processed == sum(len(o) for _, o in plan)


@settings(max_examples=30, deadline=None)
@given(steps(), st.sampled_from([0.5, 0.7]))
def test_memmap_store_equals_memory_store(tmp_path_factory, plan, beta):
    path = tmp_path_factory.mktemp("store") / "d.f32"
    a, b = DifficultyStore(N, beta), DifficultyStore(N, beta, path=path, capacity=0)
    assert (a.backend, b.backend) == ("memory", "memmap")
    run(a, plan)
    run(b, plan)
    assert_same_state(a.state_dict(), b.state_dict())
    b.flush()
    assert path.stat().st_size >= 4 * b.num_values
    snap = b.state_dict()["values"]  # file-backed, detached from the store's later updates
    before = snap.clone()
    run(b, plan)
    assert torch.equal(snap.view(torch.int32), before.view(torch.int32))
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".snapshot")]


def test_first_observation_initialises_then_ema():
    s = DifficultyStore(2, 0.75)
    s.observe(torch.tensor([1]), torch.tensor([3]), torch.tensor([1]), torch.tensor([2]), torch.tensor([4.0]))
    np.testing.assert_array_equal(s.sample(1), [np.nan, np.nan, 4.0])
    s.observe(torch.tensor([1]), torch.tensor([3]), torch.tensor([1, 1]), torch.tensor([2, 0]), torch.tensor([8.0, 1.0]))
    np.testing.assert_array_equal(s.sample(1), [1.0, np.nan, 0.75 * 4 + 0.25 * 8])
    g = s.gather(torch.tensor([1, 0]), torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[True, True, False], [True] * 3]))
    assert g.dtype == torch.float32
    np.testing.assert_array_equal(g.numpy(), [[1.0, np.nan, np.nan], [np.nan] * 3])


def test_memmap_store_grows_past_its_capacity(tmp_path):
    n = 3000
    s = DifficultyStore(n, 0.5, path=tmp_path / "d.f32")
    ids = torch.arange(n)
    s.observe(ids, torch.full((n,), 2), ids, torch.ones(n, dtype=torch.long), ids.float())
    assert s.num_values == 2 * n and s.backend == "memmap"
    assert s.sample(2999).tolist()[1] == 2999.0 and np.isnan(s.sample(0)[0])


@pytest.mark.parametrize("memmap", [False, True])
def test_state_dict_resume_is_bit_for_bit(tmp_path, memmap):
    rng = np.random.default_rng(0)
    plan = []
    for _ in range(12):
        sids = sorted(rng.choice(N, size=3, replace=False).tolist())
        obs = [(i, int(rng.integers(LENGTHS[i])), float(rng.random() * 5)) for i in sids for _ in range(3)]
        plan.append((sids, obs))
    full = DifficultyStore(N, 0.7)
    run(full, plan)
    first = DifficultyStore(N, 0.7, path=tmp_path / "a" if memmap else None)
    run(first, plan[:5])
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = DifficultyStore(N, 0.7, path=tmp_path / "b" if memmap else None)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    run(resumed, plan[5:])
    assert_same_state(resumed.state_dict(), full.state_dict())


def test_load_state_dict_refuses_other_stores():
    s = DifficultyStore(N, 0.7)
    run(s, [([0, 1], [(0, 1, 1.0)])])
    st_ = s.state_dict()
    with pytest.raises(ValueError, match="beta=0.7"):
        DifficultyStore(N, 0.5).load_state_dict(st_)
    with pytest.raises(ValueError, match="num_samples=6"):
        DifficultyStore(N + 1, 0.7).load_state_dict(st_)
    with pytest.raises(ValueError, match="not a DifficultyStore state"):
        DifficultyStore(N, 0.7).load_state_dict({**st_, "version": 99})
    bad = dict(st_, values=st_["values"][:2])
    with pytest.raises(ValueError, match="extends past"):
        DifficultyStore(N, 0.7).load_state_dict(bad)


def test_observe_errors():
    s = DifficultyStore(N, 0.7)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="sample id 6 is outside"):
        s.observe(torch.tensor([6]), torch.tensor([2]), one[:0], one[:0], torch.zeros(0))
    s.observe(one, torch.tensor([5]), one[:0], one[:0], torch.zeros(0))
    with pytest.raises(ValueError, match="sample 0 has 4 real tokens in this batch but 5"):
        s.observe(one, torch.tensor([4]), one[:0], one[:0], torch.zeros(0))
    with pytest.raises(ValueError, match="position is outside"):
        s.observe(one, torch.tensor([5]), one, torch.tensor([5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not in the batch"):
        s.observe(one, torch.tensor([5]), torch.tensor([1]), one, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not finite"):
        s.observe(one, torch.tensor([5]), one, one, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="num_samples"):
        DifficultyStore(0, 0.5)
    with pytest.raises(ValueError, match="beta"):
        DifficultyStore(1, 1.0)
    with pytest.raises(ValueError, match="distributed=True"):
        DifficultyStore(1, 0.5, distributed=True).observe(one, one, one[:0], one[:0], torch.zeros(0))
