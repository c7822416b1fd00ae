"""The teacher cache: layout, lookups, kill -9 and resume, refusals of mismatched/corrupt caches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from regate_fx.runtime.cache import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    TeacherCache,
    dataset_fingerprint,
    token_checksums,
)
from regate_fx.runtime.cache.writer import _Computation
from regate_fx.runtime.data import collate
from tests.runtime.runtime_helpers import CountingTeacher, llama_teacher, synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
N, BS = 24, 2


@pytest.fixture(scope="module")
def teacher():
    return llama_teacher(0)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(N, seed=0)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, teacher, dataset):
    """An uninterrupted computation, for comparisons and corruption tests."""
    path = tmp_path_factory.mktemp("cache") / "ref"
    TeacherCache.compute(path, teacher, dataset, batch_size=BS, shard_samples=4, progress=False)
    return path


@pytest.fixture
def cache_copy(tmp_path, reference_dir):
    dst = tmp_path / "copy"
    shutil.copytree(reference_dir, dst)
    return dst


def same_cache(a: Path, b: Path) -> None:
    """Bit-for-bit: values, index, fingerprints."""
    assert (a / "values.bin").read_bytes() == (b / "values.bin").read_bytes()
    ia, ib = np.load(a / "index.npz"), np.load(b / "index.npz")
    for k in ("offsets", "lengths", "checksums"):
        assert np.array_equal(ia[k], ib[k]), k
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for k in ("teacher_fingerprint", "dataset_fingerprint", "dtype", "num_samples", "num_values", "state"):
        assert ma[k] == mb[k], k


# --------------------------------------------------------------------------- contents
def test_cache_holds_each_samples_reference_losses(reference_dir, teacher, dataset):
    cache = TeacherCache.open(reference_dir, teacher=teacher, dataset=dataset)
    assert cache.num_samples == N and cache.teacher_fingerprint == teacher.fingerprint()
    assert cache.dataset_fingerprint == dataset_fingerprint(dataset)
    assert sorted(p.name for p in reference_dir.iterdir()) == [".lock", "index.npz", "manifest.json", "values.bin"]
    for s in dataset[::3]:
        i = s["sample_id"]
        want = teacher.reference_losses(s["input_ids"][None], None, s["labels"][None])[0].numpy()
        got = cache.sample(i)
        assert got.shape == want.shape and int(cache.lengths[i]) == want.size
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.isnan(got), np.isnan(want))
    # batched lookup by (sample id, in-sample position), left padded, valid mask respected
    batch = collate([dataset[3], dataset[7]], padding_side="left", indices=[3, 7])
    real = batch["attention_mask"].bool()
    pos = (real.long().cumsum(1) - 1).masked_fill(~real, -1)
    r = cache.lookup(batch["sample_id"], pos, real)
    for b, i in enumerate([3, 7]):
        np.testing.assert_array_equal(r[b][real[b]].numpy(), cache.sample(i))
        assert r[b][~real[b]].isnan().all()
    assert torch.equal(cache.checksums[[3, 7]], token_checksums(batch["input_ids"], pos, real))


def test_sample_ids_need_not_follow_dataset_order(tmp_path, teacher):
    data = synthetic_dataset(6, seed=5)
    perm = [4, 0, 5, 2, 1, 3]
    shuffled = [dict(data[i], sample_id=perm[k]) for k, i in enumerate(range(6))]
    cache = TeacherCache.compute(tmp_path / "c", teacher, shuffled, batch_size=4, progress=False)
    for s in shuffled:
        want = teacher.reference_losses(s["input_ids"][None], None, s["labels"][None])[0].numpy()
        np.testing.assert_allclose(cache.sample(s["sample_id"]), want, rtol=1e-5, atol=1e-5)
    bad = [dict(s, sample_id=0) for s in shuffled]
    with pytest.raises(ValueError, match="occurs twice"):
        TeacherCache.compute(tmp_path / "d", teacher, bad, progress=False)
    with pytest.raises(ValueError, match="sample ids must be"):
        TeacherCache.compute(tmp_path / "e", teacher, [dict(shuffled[0], sample_id=9)], progress=False)


def test_computed_once_batched_and_reopened_without_recomputation(tmp_path, teacher, dataset):
    t = CountingTeacher(teacher)
    TeacherCache.compute(tmp_path / "c", t, dataset, batch_size=5, progress=True)
    assert t.calls == -(-N // 5) and max(t.batch_sizes) == 5 and sum(t.batch_sizes) == N
    TeacherCache.compute(tmp_path / "c", t, dataset, batch_size=5, progress=False)
    assert t.calls == -(-N // 5)


def test_float16_cache(tmp_path, teacher, dataset, reference_dir):
    c16 = TeacherCache.compute(tmp_path / "c", teacher, dataset, dtype="float16", batch_size=BS, progress=False)
    c32 = TeacherCache.open(reference_dir)
    assert c16.dtype == np.float16 and c16.sample(0).dtype == np.float32
    for i in range(N):
        np.testing.assert_allclose(c16.sample(i), c32.sample(i), rtol=2e-3)
    with pytest.raises(CacheMismatchError, match="stores float16 but float32"):
        TeacherCache.compute(tmp_path / "c", teacher, dataset, dtype="float32", progress=False)
    with pytest.raises(CacheMismatchError, match="stores float16"):
        TeacherCache.open(tmp_path / "c", dtype="float32")


# --------------------------------------------------------------------------- kill -9 and resume
_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys
    from regate_fx.runtime.cache import TeacherCache
    from tests.runtime.runtime_helpers import CountingTeacher, llama_teacher, synthetic_dataset

    teacher = CountingTeacher(llama_teacher(0), block_after=int(sys.argv[2]))
    TeacherCache.compute(sys.argv[1], teacher, synthetic_dataset(%d, seed=0), batch_size=%d,
                         shard_samples=%d, progress=False)
    print("finished")  # never reached: killed while blocked
    """
)


def _committed_batches(path: Path) -> int:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(hi - lo for lo, hi in (e["batches"] for e in manifest.get("shards", [])))


def test_kill_9_in_the_middle_then_resume_computes_only_the_rest(tmp_path, teacher, dataset, reference_dir):
    path = tmp_path / "killed"
    done_before_kill = 3  # batches computed (and committed, one shard per batch) before blocking
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "child.log"
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe could stall the child
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_SCRIPT % (N, BS, BS), str(path), str(done_before_kill)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while _committed_batches(path) < done_before_kill:
            if proc.poll() is not None:
                pytest.fail(f"the computing process exited early:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no shard committed in time")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in log.read_text()

    committed = _committed_batches(path)
    assert committed == done_before_kill
    with pytest.raises(CacheIncompleteError, match="resume it"):
        TeacherCache.open(path)
    # leftovers of a writer killed mid-write: an unlisted shard and temporary files
    (path / "shard-00000100-00000101.npz").write_bytes(b"junk")
    (path / "values.bin.regate-tmp").write_bytes(b"junk")
    (path / "manifest.json.regate-tmp").write_bytes(b"{junk")

    resumer = CountingTeacher(teacher)
    cache = TeacherCache.compute(path, resumer, dataset, batch_size=BS, progress=False)
    assert resumer.calls == -(-N // BS) - committed
    assert cache.num_samples == N
    same_cache(path, reference_dir)
    assert not list(path.glob("shard-*")) and not list(path.glob("*.regate-tmp"))


def test_interrupted_after_the_last_shard_resumes_with_no_teacher_call(tmp_path, teacher, dataset, reference_dir, monkeypatch):
    path = tmp_path / "c"

    def boom(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_Computation, "_finalize", boom)
        with pytest.raises(KeyboardInterrupt):
            TeacherCache.compute(path, teacher, dataset, batch_size=BS, shard_samples=5, progress=False)
    with pytest.raises(CacheIncompleteError):
        TeacherCache.open(path)
    t = CountingTeacher(teacher)
    with pytest.warns(UserWarning, match="recorded batch_size=2"):
        TeacherCache.compute(path, t, dataset, batch_size=7, progress=False)
    assert t.calls == 0
    same_cache(path, reference_dir)


def test_a_corrupt_shard_is_refused_on_resume(tmp_path, teacher, dataset, monkeypatch):
    path = tmp_path / "c"
    with monkeypatch.context() as m:
        m.setattr(_Computation, "_finalize", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            TeacherCache.compute(path, teacher, dataset, batch_size=BS, shard_samples=4, progress=False)
    shard = sorted(path.glob("shard-*.npz"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="SHA-256"):
        TeacherCache.compute(path, teacher, dataset, batch_size=BS, progress=False)


def test_a_second_writer_is_locked_out(tmp_path, teacher, dataset):
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "c"
    path.mkdir()
    with open(path / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(CacheError, match="another process"):
            TeacherCache.compute(path, teacher, dataset, progress=False)


# --------------------------------------------------------------------------- refusals
def test_another_teacher_is_refused(cache_copy, dataset):
    other = llama_teacher(1)
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.open(cache_copy, teacher=other)
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.compute(cache_copy, other, dataset, progress=False)
    with pytest.raises(CacheMismatchError, match="another teacher"):
        TeacherCache.open(cache_copy, teacher_fingerprint="0" * 64)


def test_other_data_is_refused(cache_copy, teacher, dataset):
    changed = [dict(s) for s in dataset]
    changed[5] = dict(changed[5], input_ids=changed[5]["input_ids"].clone())
    changed[5]["input_ids"][-1] += 1
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.open(cache_copy, dataset=changed)
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.compute(cache_copy, teacher, changed, progress=False)
    relabelled = [dict(s) for s in dataset]
    relabelled[0] = dict(relabelled[0], labels=torch.full_like(relabelled[0]["labels"], -100))
    with pytest.raises(CacheMismatchError, match="other data"):
        TeacherCache.open(cache_copy, dataset=relabelled)
    with pytest.raises(CacheMismatchError, match="holds 24 samples but the dataset has 23"):
        TeacherCache.open(cache_copy, dataset=dataset[:23])


def test_another_format_version_is_refused(cache_copy):
    m = json.loads((cache_copy / "manifest.json").read_text())
    (cache_copy / "manifest.json").write_text(json.dumps(dict(m, version=2)))
    with pytest.raises(CacheMismatchError, match="format version 2"):
        TeacherCache.open(cache_copy)


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: _flip(p / "values.bin"), "SHA-256"),
        (lambda p: _flip(p / "values.bin", 0.0), "SHA-256"),
        (lambda p: _flip(p / "index.npz"), "SHA-256"),
        (lambda p: (p / "values.bin").write_bytes((p / "values.bin").read_bytes()[:-4]), "bytes"),
        (lambda p: (p / "index.npz").write_bytes((p / "index.npz").read_bytes()[:100]), "bytes"),
        (lambda p: (p / "values.bin").unlink(), "missing"),
        (lambda p: (p / "index.npz").unlink(), "missing"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text('{"format": "regate_fx.teacher_cache", '), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_text("[1, 2]"), "not a regate_fx teacher cache"),
        (lambda p: (p / "manifest.json").write_text(json.dumps({"format": "regate_fx.teacher_cache", "version": 1})), "lacks"),
    ],
    ids=["flip-values", "flip-values-first", "flip-index", "truncate-values", "truncate-index",
         "missing-values", "missing-index", "missing-manifest", "bad-json", "bad-utf8", "not-a-dict", "missing-keys"],
)
def test_corrupt_caches_are_refused(cache_copy, damage, match):
    damage(cache_copy)
    with pytest.raises(CacheCorruptError, match=match):
        TeacherCache.open(cache_copy)


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["files"]["values"].pop("sha256"), "malformed file entry"),
        (lambda m: m["files"]["index"].update(file="../index.npz"), "malformed file entry"),
        (lambda m: m["files"].pop("index"), "malformed"),
        (lambda m: m.update(batch_size=0), "batch_size=0"),
        (lambda m: m.update(teacher_fingerprint=7), "teacher_fingerprint=7"),
        (lambda m: m.update(num_values=m["num_values"] + 1), "disagrees with num_values"),
    ],
    ids=["no-sha", "path-escape", "no-index-entry", "batch-size", "fingerprint-type", "num-values"],
)
def test_malformed_manifests_are_refused(cache_copy, edit, match):
    _edit_manifest(cache_copy, edit)
    with pytest.raises(CacheCorruptError, match=match):
        TeacherCache.open(cache_copy)


def test_malformed_partial_manifest_is_refused_on_resume(tmp_path, teacher, dataset, monkeypatch):
    path = tmp_path / "c"
    with monkeypatch.context() as m:
        m.setattr(_Computation, "_finalize", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            TeacherCache.compute(path, teacher, dataset, batch_size=BS, shard_samples=4, progress=False)
    _edit_manifest(path, lambda m: m["shards"][0].update(batches=[0, 999]))
    with pytest.raises(CacheCorruptError, match="shard list"):
        TeacherCache.compute(path, teacher, dataset, batch_size=BS, progress=False)


def test_size_checks_hold_without_verify(cache_copy):
    TeacherCache.open(cache_copy, verify=False)
    (cache_copy / "values.bin").write_bytes((cache_copy / "values.bin").read_bytes() + b"\0\0\0\0")
    with pytest.raises(CacheCorruptError, match="bytes"):
        TeacherCache.open(cache_copy, verify=False)


def test_no_cache_at_all(tmp_path):
    with pytest.raises(CacheError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "nothing")


def test_bad_compute_arguments(tmp_path, teacher, dataset):
    for kw, match in [({"dtype": "bfloat16"}, "dtype"), ({"batch_size": 0}, "batch_size"), ({"shard_samples": 0}, "shard_samples")]:
        with pytest.raises(ValueError, match=match):
            TeacherCache.compute(tmp_path / "c", teacher, dataset, progress=False, **kw)
    with pytest.raises(ValueError, match="empty"):
        TeacherCache.compute(tmp_path / "c", teacher, [], progress=False)


def test_check_batch_refuses_other_samples(reference_dir, dataset):
    cache = TeacherCache.open(reference_dir)
    batch = collate([dataset[2], dataset[9]], indices=[2, 9])
    real = batch["attention_mask"].bool()
    pos = (real.long().cumsum(1) - 1).masked_fill(~real, -1)
    lengths = real.sum(1)
    cache.check_batch(batch["sample_id"], lengths, token_checksums(batch["input_ids"], pos, real))
    swapped = batch["input_ids"].clone()
    swapped[0, 0] += 1
    with pytest.raises(ValueError, match="sample id 2 has other token ids"):
        cache.check_batch(batch["sample_id"], lengths, token_checksums(swapped, pos, real))
    with pytest.raises(ValueError, match="real tokens in this batch"):
        cache.check_batch(batch["sample_id"], lengths + 1, token_checksums(batch["input_ids"], pos, real))
    with pytest.raises(ValueError, match="outside"):
        cache.check_batch(torch.tensor([N]), lengths[:1], lengths[:1])
