"""ReGate: scores, keep masks over a schedule, updates, resume, DDP, and one end-to-end run."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import regate_fx
from regate_fx.runtime.cache import TeacherCache
from regate_fx.runtime.config import ReGateConfig
from regate_fx.runtime.data import collate
from regate_fx.runtime.regate import ReGate, parse_batch
from regate_fx.runtime.selection import budget, hash32
from regate_fx.runtime.teacher import text_only_teacher
from tests.runtime.runtime_helpers import (IMAGE_ID, PAD, free_port, llama_teacher, spawn_ranks, synthetic_dataset,
                                           tiny_llama, tiny_llava)

N, B = 20, 4
CFG = ReGateConfig(warmup_steps=2, cycle_steps=4, dense_steps=1, rho_min=0.4, beta=0.7, lam=0.5, keep_context=False)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(N, seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, dataset):
    path = tmp_path_factory.mktemp("regate") / "cache"
    TeacherCache.compute(path, llama_teacher(0), dataset, batch_size=8, progress=False)
    return path


@pytest.fixture
def cache(cache_dir):
    return TeacherCache.open(cache_dir)


def loader(dataset, step: int, batch_size: int = B):
    """Deterministic shuffled batches; the padding side alternates with the step."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randperm(len(dataset), generator=g)[:batch_size].tolist()
    side = "left" if step % 2 else "right"
    return collate([dataset[i] for i in ids], indices=ids, padding_side=side, pad_token_id=PAD)


def fake_loss(batch, step: int, keep: torch.Tensor) -> torch.Tensor:
    """A stand-in student CE: a pure function of (sample id, in-sample position, step), 0 where not kept."""
    real = batch["attention_mask"].bool()
    pos = real.long().cumsum(1) - 1
    h = hash32(hash32(batch["sample_id"].view(-1, 1) * 4096 + pos) ^ step)
    return torch.where(keep, (h % 10007).float() / 1000.0, torch.zeros(()))


def train(rg: ReGate, dataset, steps) -> list[torch.Tensor]:
    masks = []
    for step in steps:
        batch = loader(dataset, step)
        keep = rg.keep_mask(batch, step)
        rg.update(batch, fake_loss(batch, step, keep), keep)
        masks.append(keep)
    return masks


def assert_same_store(a: dict, b: dict) -> None:
    for k in ("offsets", "lengths"):
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["values"].view(torch.int32), b["values"].view(torch.int32)), "values"
    for k in ("tokens_processed", "tokens_dense", "num_updates"):
        assert a[k] == b[k], k


# --------------------------------------------------------------------------- keep masks and scores
def test_keep_masks_follow_the_schedule_and_the_exact_budget(cache, dataset):
    rg = ReGate(CFG, N, teacher_cache=cache)
    for step in range(10):
        batch = loader(dataset, step)
        keep = rg.keep_mask(batch, step)
        pb = parse_batch(batch, CFG)
        assert keep.dtype == torch.bool and keep.device == batch["input_ids"].device
        rho = rg.rho(step)
        if rho == 1.0:
            assert step < 2 or (step - 2) % 4 == 0
            assert torch.equal(keep, pb.real)
        else:
            want = pb.protected.sum(1) + budget(rho, pb.candidates.sum(1))
            assert torch.equal(keep.sum(1), want)
            assert not (keep & ~pb.real).any()
        rg.update(batch, fake_loss(batch, step, keep), keep)
    stats = rg.token_stats()
    assert stats["steps"] == 10 and 0 < stats["kept_fraction"] < 1
    assert stats["reduction"] == pytest.approx(1 - stats["kept_fraction"])


def test_score_is_lam_r_plus_one_minus_lam_d(cache_dir, dataset):
    batch = loader(dataset, 0)
    pb = parse_batch(batch, CFG)
    scores = {}
    for lam in (0.0, 0.5, 1.0):
        rg = ReGate(ReGateConfig(**{**CFG.to_dict(), "lam": lam, "visual_token_ids": ()}), N,
                    teacher_cache=TeacherCache.open(cache_dir))
        s0 = rg.scores(batch, 5)
        keep = torch.zeros_like(pb.real)
        keep[:, ::2] = True  # observe half the positions
        rg.update(batch, fake_loss(batch, 0, keep) + 0.5, keep)
        r = rg.teacher_cache.lookup(pb.sample_ids, pb.positions, pb.candidates)
        d = rg.store.gather(pb.sample_ids, pb.positions, pb.candidates)
        s = rg.scores(batch, 5)
        c, seen = pb.candidates, pb.candidates & ~d.isnan()
        assert seen.any() and (c & ~seen).any()
        if lam == 0.0:
            assert torch.isinf(s0[c]).all()  # never observed: tried first
            assert torch.equal(s[seen], d[seen]) and torch.isinf(s[c & ~seen]).all()
        elif lam == 1.0:
            assert torch.equal(s0[c], r[c]) and torch.equal(s[c], r[c])
        else:
            assert torch.equal(s0[c], r[c])  # D unknown: S = r
            torch.testing.assert_close(s[seen], 0.5 * r[seen] + 0.5 * d[seen], rtol=0, atol=0)
            assert torch.equal(s[c & ~seen], r[c & ~seen])
        scores[lam] = s
    assert not torch.equal(scores[0.5][pb.candidates], scores[1.0][pb.candidates])


def test_random_baseline_uses_the_same_budget(cache, dataset):
    rg = ReGate(CFG, N, teacher_cache=cache)
    rnd = ReGate(ReGateConfig(**{**CFG.to_dict(), "selection": "random"}), N)
    masks = []
    for step in range(2, 10):
        batch = loader(dataset, step)
        k1, k2 = rg.keep_mask(batch, step), rnd.keep_mask(batch, step)
        assert torch.equal(k1.sum(1), k2.sum(1))
        masks.append(k2)
        assert torch.equal(k2, rnd.keep_mask(batch, step))  # deterministic
    sparse = [m for s, m in zip(range(2, 10), masks) if (s - 2) % 4]
    assert any(not torch.equal(a, b) for a, b in zip(sparse, sparse[1:]))


def test_the_same_sample_keeps_the_same_positions_whatever_its_padding(cache, dataset):
    rg = ReGate(CFG, N, teacher_cache=cache)
    train(rg, dataset, range(6))
    ids = [0, 5, 11]
    kept = []
    for side in ("left", "right"):
        batch = collate([dataset[i] for i in ids], indices=ids, padding_side=side)
        keep = rg.keep_mask(batch, 7)
        real = batch["attention_mask"].bool()
        kept.append([keep[b][real[b]].tolist() for b in range(len(ids))])
    # alone, and in another batch composition
    alone = collate([dataset[5]], indices=[5])
    kept.append([None, rg.keep_mask(alone, 7)[0].tolist(), None])
    assert kept[0] == kept[1] and kept[2][1] == kept[0][1]


def test_visual_tokens_are_always_kept_and_never_candidates(tmp_path):
    data = synthetic_dataset(6, seed=2, n_image=3)
    llava = tiny_llava()
    cache = TeacherCache.compute(tmp_path / "c", text_only_teacher(llava), data, progress=False)
    cfg = ReGateConfig(warmup_steps=0, cycle_steps=2, dense_steps=0, rho_min=0.1,
                       visual_token_ids=(IMAGE_ID,), keep_context=False)
    rg = ReGate(cfg, 6, teacher_cache=cache)
    batch = collate(data, padding_side="left")
    keep = rg.keep_mask(batch, 0)
    vis = batch["input_ids"] == IMAGE_ID
    assert vis.sum() == 18 and (keep[vis]).all()
    pb = parse_batch(batch, cfg)
    assert not (pb.candidates & vis).any()
    assert torch.equal(keep.sum(1), 3 + budget(0.1, pb.candidates.sum(1)))


def test_update_observes_only_kept_supervised_positions_and_counts_tokens(dataset):
    rg = ReGate(ReGateConfig(lam=0.0), N)
    batch = collate([dataset[3], dataset[4]], indices=[3, 4], padding_side="left")
    pb = parse_batch(batch, rg.config)
    keep = pb.real.clone()
    keep[:, -3:] = False
    loss = torch.rand(keep.shape) + 1.0
    rg.update(batch, loss, keep)
    for b, sid in enumerate((3, 4)):
        got = rg.store.sample(sid)
        obs = (keep & pb.supervised)[b][pb.real[b]]
        assert got.shape == (int(pb.lengths[b]),)
        np.testing.assert_array_equal(got[obs.numpy()], loss[b][pb.real[b]][obs].numpy())
        assert np.isnan(got[~obs.numpy()]).all()
    assert rg.tokens_processed == int(keep.sum()) and rg.tokens_dense == int(pb.real.sum())
    with pytest.raises(ValueError, match="must both have the batch's shape"):
        rg.update(batch, loss[:, 1:], keep)


def test_constructor_errors(cache, dataset):
    with pytest.raises(ValueError, match=r"lam=0.5 .* no teacher_cache"):
        ReGate(CFG, N)
    with pytest.raises(ValueError, match="holds 20 samples but num_samples=21"):
        ReGate(CFG, N + 1, teacher_cache=cache)
    with pytest.raises(ValueError, match="ReGateConfig"):
        ReGate({"lam": 0.0}, N)  # type: ignore[arg-type]
    ReGate(ReGateConfig(lam=0.0), N)
    ReGate(ReGateConfig(selection="random"), N)


def test_batches_that_do_not_match_the_cache_are_refused(cache, dataset):
    rg = ReGate(CFG, N, teacher_cache=cache)
    batch = loader(dataset, 3)
    batch["input_ids"] = batch["input_ids"].clone()
    real = batch["attention_mask"].bool()
    b, p = real.nonzero()[0].tolist()
    batch["input_ids"][b, p] += 1
    with pytest.raises(ValueError, match="other token ids"):
        rg.keep_mask(batch, 3)
    # a label supervised now but not when the cache was computed
    batch = loader(dataset, 3)
    batch["labels"] = torch.where(real, batch["input_ids"], batch["labels"])
    with pytest.raises(ValueError, match="recompute the cache with the training labels"):
        rg.keep_mask(batch, 3)


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("store_path", [False, True])
def test_resume_is_bit_for_bit(cache_dir, dataset, tmp_path, store_path):
    full = ReGate(CFG, N, teacher_cache=TeacherCache.open(cache_dir))
    want = train(full, dataset, range(14))

    first = ReGate(CFG, N, teacher_cache=TeacherCache.open(cache_dir))
    got = train(first, dataset, range(7))
    torch.save(first.state_dict(), tmp_path / "regate.pt")
    del first
    second = ReGate(CFG, N, teacher_cache=TeacherCache.open(cache_dir),
                    store_path=tmp_path / "store.f32" if store_path else None)
    second.load_state_dict(torch.load(tmp_path / "regate.pt"))
    got += train(second, dataset, range(7, 14))
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == 14
    assert_same_store(second.store.state_dict(), full.store.state_dict())
    assert second.token_stats() == full.token_stats()


def test_load_state_dict_refuses_other_runs(cache, dataset):
    rg = ReGate(CFG, N, teacher_cache=cache)
    train(rg, dataset, range(3))
    state = rg.state_dict()
    with pytest.raises(ValueError, match=r"another ReGateConfig.*'beta': \(0.7, 0.5\)"):
        ReGate(ReGateConfig(**{**CFG.to_dict(), "beta": 0.5}), N, teacher_cache=cache).load_state_dict(state)
    with pytest.raises(ValueError, match="another teacher cache"):
        ReGate(CFG, N, teacher_cache=cache).load_state_dict(dict(state, teacher_fingerprint="x"))
    with pytest.raises(ValueError, match="not a ReGate state"):
        ReGate(CFG, N, teacher_cache=cache).load_state_dict(state["store"])


# --------------------------------------------------------------------------- DDP
WORLD = 2
DDP_STEPS = 8
DDP_CFG = ReGateConfig(warmup_steps=1, cycle_steps=3, dense_steps=1, rho_min=0.5, lam=0.0)


def ddp_batches(dataset, step: int):
    """Rank r's batch at ``step``: disjoint samples, different sizes per rank."""
    g = torch.Generator().manual_seed(step)
    perm = torch.randperm(len(dataset), generator=g).tolist()
    parts = [perm[:3], perm[3:5]]
    return [collate([dataset[i] for i in p], indices=p, padding_side="right") for p in parts]


def ddp_keep_override(step: int, rank: int, keep: torch.Tensor) -> torch.Tensor:
    """Steps with empty observations: rank 1 alone, then every rank (ragged gathers of 0 rows)."""
    if (step == DDP_STEPS - 2 and rank == 1) or step == DDP_STEPS - 1:
        return torch.zeros_like(keep)
    return keep


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dataset = synthetic_dataset(N, seed=1)
        rg = ReGate(DDP_CFG, N)
        masks = []
        for step in range(DDP_STEPS):
            batch = ddp_batches(dataset, step)[rank]
            keep = ddp_keep_override(step, rank, rg.keep_mask(batch, step))
            rg.update(batch, fake_loss(batch, step, keep), keep)
            masks.append(keep)
        torch.save({"state": rg.state_dict(), "masks": masks}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_on_the_concatenated_batches(tmp_path, dataset):
    spawn_ranks(_ddp_worker, (free_port(), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = ReGate(DDP_CFG, N, distributed=False)
    for step in range(DDP_STEPS):
        parts = ddp_batches(dataset, step)
        keeps = [ddp_keep_override(step, r, single.keep_mask(parts[r], step)) for r in range(WORLD)]
        for r in range(WORLD):
            assert torch.equal(ranks[r]["masks"][step], keeps[r]), (step, r)
        ids = torch.cat([p["sample_id"] for p in parts]).tolist()
        batch = collate([dataset[i] for i in ids], indices=ids, padding_side="right")
        T = batch["input_ids"].shape[1]
        keep = torch.cat([torch.nn.functional.pad(k, (0, T - k.shape[1])) for k in keeps])
        single.update(batch, fake_loss(batch, step, keep), keep)

    want = single.store.state_dict()
    assert want["num_updates"] == DDP_STEPS and 0 < want["tokens_processed"] < want["tokens_dense"]
    for r in range(WORLD):
        assert_same_store(ranks[r]["state"]["store"], want)


# --------------------------------------------------------------------------- end to end
def test_end_to_end_training_with_sparsify(tmp_path):
    """A few training steps of a tiny Llama: ReGate picks, the sparse model computes, update() folds."""
    torch.manual_seed(0)
    model = tiny_llama(seed=3).train()
    data = synthetic_dataset(8, seed=4, min_len=8, max_len=14)
    # the teacher: the same weights before training, frozen (a separate copy)
    cache = TeacherCache.compute(tmp_path / "cache", llama_teacher(3), data, batch_size=4, progress=False)
    cfg = ReGateConfig(warmup_steps=1, cycle_steps=2, dense_steps=1, rho_min=0.5)
    rg = ReGate(cfg, len(data), teacher_cache=cache)
    smodel = regate_fx.sparsify(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = set()
    for step in range(4):
        ids = [(2 * step + k) % 8 for k in range(4)]
        batch = collate([data[i] for i in ids], indices=ids)
        keep = rg.keep_mask(batch, step)
        before = rg.tokens_processed
        out = smodel(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], keep_mask=keep)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        rg.update(batch, out.token_loss, keep)

        pb = parse_batch(batch, cfg)
        obs = keep & pb.supervised  # (B, T) where the student computed a loss
        assert rg.tokens_processed - before == int(keep.sum())
        assert (out.token_loss[obs] > 0).all() and (out.token_loss[~keep] == 0).all()
        if rg.rho(step) < 1:
            assert int(keep.sum()) < int(pb.real.sum())
        for b, sid in enumerate(ids):
            if sid in seen:
                continue
            seen.add(sid)  # first observation: D is the student's loss itself
            real, o = pb.real[b], obs[b][pb.real[b]]
            np.testing.assert_array_equal(
                rg.store.sample(sid)[o.numpy()], out.token_loss[b][real][o].detach().numpy()
            )
    stats = rg.token_stats()
    assert stats["steps"] == 4 and stats["tokens_processed"] < stats["tokens_dense"]
    assert math.isclose(stats["kept_fraction"], stats["tokens_processed"] / stats["tokens_dense"])
