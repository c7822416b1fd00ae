"""The teacher cache computed data-parallel (2 gloo ranks), the cheap teacher probe on reopen, the
fingerprint of a text-only teacher, and `sample` copies."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from regate_fx.runtime.cache import CacheError, CacheMismatchError, TeacherCache
from regate_fx.runtime.teacher import text_only_teacher
from tests.runtime.runtime_helpers import (CountingTeacher, file_store, llama_teacher, spawn_ranks, synthetic_dataset,
                                           tiny_llava)
from tests.runtime.test_cache import same_cache

N, BS, WORLD = 24, 2, 2


class FailingTeacher(CountingTeacher):
    """Raises on its call number `fail_at` (an interrupted rank)."""

    def __init__(self, inner, fail_at: int) -> None:
        super().__init__(inner)
        self.fail_at = fail_at

    def reference_losses(self, *args, **kwargs):
        if self.calls == self.fail_at:
            raise RuntimeError("teacher died")
        return super().reference_losses(*args, **kwargs)


def _worker(rank: int, init: str, path: str, fail_rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        teacher = CountingTeacher(llama_teacher(0)) if rank != fail_rank else FailingTeacher(llama_teacher(0), 2)
        try:
            cache = TeacherCache.compute(path, teacher, synthetic_dataset(N, seed=0), batch_size=BS,
                                         shard_samples=4, progress=False)
            result = {"ok": True, "values": cache.sample(5).tolist()}
        except CacheError as e:
            result = {"ok": False, "error": str(e)}
        except RuntimeError as e:
            result = {"ok": False, "error": f"RuntimeError: {e}"}
        result["calls"] = teacher.calls
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(path, tmp_path, fail_rank: int = -1) -> list[dict]:
    out = tmp_path / f"out-{fail_rank}"
    out.mkdir()
    spawn_ranks(_worker, (file_store(out), str(path), fail_rank, str(out)), WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "ref"
    TeacherCache.compute(path, llama_teacher(0), synthetic_dataset(N, seed=0), batch_size=BS, shard_samples=4,
                         progress=False)
    return path


def test_two_ranks_compute_one_cache_bit_identical_to_one_process(tmp_path, reference_dir):
    got = _run(tmp_path / "c", tmp_path)
    assert all(r["ok"] for r in got), got
    calls = [r["calls"] for r in got]
    assert sum(calls) == N // BS and min(calls) > 0  # each batch once, split across the ranks
    same_cache(tmp_path / "c", reference_dir)
    assert got[0]["values"] == got[1]["values"]
    assert not list((tmp_path / "c").glob("shard*"))  # one finalisation cleaned every shard and rank file


def test_a_failed_rank_fails_every_rank_and_the_rerun_does_only_the_rest(tmp_path, reference_dir):
    path = tmp_path / "c"
    got = _run(path, tmp_path, fail_rank=1)
    assert not got[0]["ok"] and "failed on rank 1" in got[0]["error"]
    assert "teacher died" in got[1]["error"]
    done_before = got[0]["calls"] + got[1]["calls"]
    assert list(path.glob("shards-rank*.json"))  # the ranks' committed shards are listed
    resumer = CountingTeacher(llama_teacher(0))  # resumed by one process
    TeacherCache.compute(path, resumer, synthetic_dataset(N, seed=0), batch_size=BS, progress=False)
    assert resumer.calls == N // BS - done_before
    same_cache(path, reference_dir)


def test_reopening_checks_a_probe_not_every_weight_byte(tmp_path, reference_dir, monkeypatch):
    path = tmp_path / "c"
    shutil.copytree(reference_dir, path)
    teacher = llama_teacher(0)
    assert json.loads((path / "manifest.json").read_text())["teacher_probe"] == teacher.probe()
    hashed = []
    monkeypatch.setattr(type(teacher), "fingerprint", lambda self: hashed.append(1) or "x")
    TeacherCache.open(path, teacher=teacher)
    TeacherCache.compute(path, teacher, synthetic_dataset(N, seed=0), batch_size=BS, progress=False)
    assert hashed == []  # neither the open nor the compute of a complete cache hashed the weights
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.open(path, teacher=teacher, verify_teacher="full")
    other = llama_teacher(1)
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.open(path, teacher=other)


def test_text_only_teacher_fingerprints_only_the_weights_it_runs():
    a, b = tiny_llava(0), tiny_llava(0)
    with torch.no_grad():  # another vision tower and projector, the same language model
        for p in [*b.model.vision_tower.parameters(), *b.model.multi_modal_projector.parameters()]:
            p.add_(1.0)
    ta, tb = text_only_teacher(a), text_only_teacher(b)
    assert ta.fingerprint() == tb.fingerprint() and ta.probe() == tb.probe()
    with torch.no_grad():
        b.model.language_model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert ta.fingerprint() != tb.fingerprint() and ta.probe() != tb.probe()
    with torch.no_grad():
        b.lm_head.weight.zero_()
        a.lm_head.weight.zero_()
    b.model.language_model.load_state_dict(a.model.language_model.state_dict())
    assert ta.fingerprint() == tb.fingerprint()  # the head is covered, and equal again


def test_sample_is_a_writable_copy(reference_dir):
    cache = TeacherCache.open(reference_dir)
    row = cache.sample(3)
    assert row.flags.writeable
    before = cache.sample(3).copy()
    row[:] = 0.0
    np.testing.assert_array_equal(cache.sample(3), before)
    torch.from_numpy(cache.sample(3))  # no "non-writable array" warning path
