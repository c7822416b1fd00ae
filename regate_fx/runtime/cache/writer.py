"""Computing a teacher cache: the lock, the shards, resuming, data-parallel ranks, the final files.

:meth:`TeacherCache.compute <regate_fx.runtime.cache.reader.TeacherCache.compute>` (documented
there) calls :func:`compute`. Under an advisory lock on the directory, :func:`_prepare` reads
(and checks) or creates the manifest and removes what a killed writer left; :class:`_Computation`
runs the teacher on every batch of the plan that no listed shard holds, writes each shard with
``atomic_write`` and lists it in the manifest only once it is durable; ``_finalize`` writes
``values.bin`` and ``index.npz``, then the complete manifest, and only then deletes the shards.
Data-parallel, every rank computes a balanced share of the batches and lists its shards in its
own ``shards-rank*.json``; rank 0 folds them in (:func:`_merge_rank_files`) and finalises.

Over 450 lines on purpose: the lock, the manifest's states, the shards and the rank files are one
crash-safety protocol (what a killed writer leaves, what the next one removes, when a shard counts),
which reads best in one file; the format, the fingerprint and the reader are apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from regate_fx.runtime import _dist
from regate_fx.runtime.atomic import atomic_write, fsync_dir
from regate_fx.runtime.cache.fingerprint import (
    VERIFY_TEACHER,
    ReferenceTeacher,
    _check_match,
    _check_teacher,
    _progress,
    _Scan,
    _teacher_probe,
)
from regate_fx.runtime.cache.format import (
    _INDEX,
    _MANIFEST,
    _RANK_PREFIX,
    _TMP,
    _VALUES,
    CACHE_FORMAT,
    CACHE_VERSION,
    DTYPES,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    _check_file,
    _check_shard_list,
    _load_npz,
    _rank_file,
    _read_manifest,
    _sha256_file,
)
from regate_fx.runtime.data import collate

__all__ = ["compute"]

_T = TypeVar("_T")


# --------------------------------------------------------------------------- the manifest, the lock
def _write_manifest(root: Path, manifest: dict) -> None:
    """Replace the manifest atomically (written after every commit: the cache's source of truth)."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(root / _MANIFEST, lambda f: f.write(data))


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One writer per cache directory: an advisory lock on ``.lock``; a second writer gets a
    :class:`CacheError` at once, without waiting."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    with open(root / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise CacheError(f"another process is computing the teacher cache at {root}") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- compute
def compute(
    open_complete: Callable[[Path, dict, bool], _T],
    path: str | os.PathLike,
    teacher: ReferenceTeacher,
    dataset: Sequence,
    *,
    batch_size: int,
    dtype: str,
    shard_samples: int,
    progress: bool,
    verify: bool,
    verify_teacher: str,
    distributed: bool | None,
) -> _T:
    """:meth:`TeacherCache.compute` (the arguments are documented there): compute, resume or just
    open the cache at ``path``; ``open_complete(root, manifest, verify)`` opens the result."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(shard_samples, bool) or not isinstance(shard_samples, int) or shard_samples < 1:
        raise ValueError(f"shard_samples must be an int >= 1, got {shard_samples!r}")
    if verify_teacher not in VERIFY_TEACHER:
        raise ValueError(f"verify_teacher must be one of {VERIFY_TEACHER}, got {verify_teacher!r}")
    root = Path(path)
    if _dist.distributed_active(distributed):
        return _compute_distributed(
            open_complete,
            root,
            teacher,
            dataset,
            batch_size=batch_size,
            dtype=dtype,
            shard_samples=shard_samples,
            progress=progress,
            verify=verify,
            verify_teacher=verify_teacher,
        )
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        scan = _Scan(dataset, progress)
        manifest, batch_size, complete = _prepare(
            root, teacher, scan, dataset, batch_size=batch_size, dtype=dtype, verify_teacher=verify_teacher
        )
        if complete:
            return open_complete(root, manifest, verify)
        _Computation(root, manifest, teacher, dataset, scan, progress, verify, shard_samples).run()
        return open_complete(root, manifest, verify)


def _prepare(
    root: Path,
    teacher: ReferenceTeacher,
    scan: "_Scan",
    dataset: Sequence,
    *,
    batch_size: int,
    dtype: str,
    verify_teacher: str,
    teacher_fp: str | None = None,
) -> tuple[dict, int, bool]:
    """Under the lock: read (checking it matches) or create the manifest, fold in the shards that
    data-parallel ranks recorded, and remove leftovers. Returns (manifest, batch size, complete)."""
    if (root / _MANIFEST).exists():
        manifest = _read_manifest(root)
        _check_match(
            manifest, root, teacher_fp=None, dataset_fp=scan.fingerprint, dtype=dtype, num_samples=len(dataset)
        )
        if manifest["state"] == "complete":
            _check_teacher(manifest, root, teacher, verify_teacher)
            return manifest, int(manifest["batch_size"]), True
        teacher_fp = teacher_fp or teacher.fingerprint()
        _check_match(manifest, root, teacher_fp=teacher_fp, dataset_fp=None, dtype=None, num_samples=None)
        if manifest["batch_size"] != batch_size:
            warnings.warn(
                f"resuming the teacher cache at {root} with its recorded batch_size="
                f"{manifest['batch_size']} (not {batch_size}) so the result matches an "
                f"uninterrupted run",
                stacklevel=2,
            )
            batch_size = int(manifest["batch_size"])
    else:
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "state": "partial",
            "teacher_fingerprint": teacher_fp or teacher.fingerprint(),
            "dataset_fingerprint": scan.fingerprint,
            "dtype": dtype,
            "num_samples": len(dataset),
            "batch_size": batch_size,
            "shards": [],
        }
        probe = _teacher_probe(teacher)
        if probe is not None:
            manifest["teacher_probe"] = probe
        _write_manifest(root, manifest)
    num_batches = len(scan.plan(int(manifest["batch_size"])))
    _check_shard_list(root, manifest, num_batches)
    _merge_rank_files(root, manifest, num_batches)
    listed = {e["file"] for e in manifest["shards"]}
    for stale in [*root.glob(f"*{_TMP}"), *root.glob("shard-*.npz")]:
        if stale.name not in listed:  # leftovers of a killed writer
            stale.unlink()
    return manifest, batch_size, False


def _merge_rank_files(root: Path, manifest: dict, num_batches: int) -> None:
    """Fold the shard lists data-parallel ranks recorded (``shards-rank*.json``) into the manifest.

    A rank lists a shard only once the shard is durable, so the union is exactly the committed work.
    The manifest is rewritten before the rank files are deleted, so a crash in between loses nothing.
    """
    files = sorted(root.glob(f"{_RANK_PREFIX}*.json"))
    if not files:
        return
    listed = {e["file"] for e in manifest["shards"]}
    for f in files:
        try:
            entries = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheCorruptError(
                f"teacher cache rank file {f} is not valid JSON ({e}); delete {root} and recompute"
            ) from e
        _check_shard_list(root, {"shards": entries}, num_batches)
        manifest["shards"].extend(entry for entry in entries if entry["file"] not in listed)
        listed.update(entry["file"] for entry in entries)
    manifest["shards"].sort(key=lambda e: e["batches"][0])
    done = np.zeros(num_batches, dtype=np.int64)
    for shard in manifest["shards"]:
        done[shard["batches"][0] : shard["batches"][1]] += 1
    if (done > 1).any():
        raise CacheCorruptError(f"the teacher cache shards in {root} overlap; delete {root} and recompute")
    _write_manifest(root, manifest)
    for f in files:
        f.unlink()
    fsync_dir(root)


def _text_part(sample: Any) -> Any:
    """What the text-only teacher reads of a sample (per-sample model inputs such as pixels left out)."""
    if not isinstance(sample, Mapping):
        return sample
    return {
        k: v for k, v in sample.items() if k in ("input_ids", "labels", "attention_mask", "visual_mask", "sample_id")
    }


class _Computation:
    """The resumable part of :meth:`TeacherCache.compute` (under the directory lock).

    Single process: :meth:`run` computes every batch not yet in a listed shard, then finalises.
    A data-parallel rank: ``rank`` is set, :meth:`run` gets its share of the batches, records its
    shards in its own ``shards-rank*.json`` (the manifest is rank 0's), and does not finalise.
    """

    def __init__(
        self, root, manifest, teacher, dataset, scan, progress, verify, shard_samples, rank: int | None = None
    ) -> None:
        self.root, self.manifest, self.teacher, self.dataset = root, manifest, teacher, dataset
        self.scan, self.progress, self.verify, self.shard_samples = scan, progress, verify, shard_samples
        self.np_dtype = np.dtype(manifest["dtype"])
        self.plan = scan.plan(int(manifest["batch_size"]))
        self.rank = rank
        self.recorded: list[dict] = []  # this rank's committed shards

    def todo(self) -> np.ndarray:
        """Indices of the plan's batches that no listed shard holds (the listed shards checked)."""
        done = np.zeros(len(self.plan), dtype=bool)
        for entry in self.manifest["shards"]:
            _check_file(self.root, entry, self.verify)
            lo, hi = entry["batches"]
            done[lo:hi] = True
        return np.flatnonzero(~done)

    def run(self, todo: np.ndarray | None = None) -> None:
        todo = self.todo() if todo is None else todo
        pad = self.teacher.pad_token_id if getattr(self.teacher, "pad_token_id", None) is not None else 0
        with _progress(self.progress) as bar:
            if self.rank is None:
                total = sum(int(self.plan[i].size) for i in range(len(self.plan)))
                completed = total - sum(int(self.plan[i].size) for i in todo)
            else:  # a rank's bar counts its own share
                total, completed = sum(int(self.plan[i].size) for i in todo), 0
            task = bar.add_task("teacher reference losses", total=total, completed=completed)
            pending: list[tuple[int, np.ndarray, list[np.ndarray]]] = []
            for j, b in enumerate(todo):
                ids = self.plan[b]
                samples = [_text_part(self.dataset[int(self.scan.index_of[s])]) for s in ids]  # no pixels
                batch = collate(samples, pad_token_id=pad, indices=[int(self.scan.index_of[s]) for s in ids])
                if not np.array_equal(batch["sample_id"].numpy(), ids):
                    raise ValueError("the dataset changed while the teacher cache was being computed")
                r = self.teacher.reference_losses(
                    batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("visual_mask")
                )  # (B, T)
                rows = [r[k, : int(self.scan.lengths[s])].numpy().astype(self.np_dtype) for k, s in enumerate(ids)]
                pending.append((int(b), ids, rows))
                bar.advance(task, int(ids.size))
                last = j + 1 == todo.size
                boundary = last or todo[j + 1] != b + 1
                if boundary or sum(p[1].size for p in pending) >= self.shard_samples:
                    self._commit(pending)
                    pending = []
        if self.rank is None:
            self._finalize()

    def _commit(self, pending) -> None:
        lo, hi = pending[0][0], pending[-1][0] + 1
        ids = np.concatenate([p[1] for p in pending]).astype(np.int64)
        rows = [row for p in pending for row in p[2]]
        lengths = np.array([row.size for row in rows], dtype=np.int64)
        values = np.concatenate(rows) if rows else np.zeros(0, self.np_dtype)
        name = f"shard-{lo:08d}-{hi:08d}.npz"
        atomic_write(self.root / name, lambda f: np.savez(f, sample_ids=ids, lengths=lengths, values=values))
        path = self.root / name
        entry = {"file": name, "batches": [lo, hi], "bytes": path.stat().st_size, "sha256": _sha256_file(path)}
        if self.rank is None:
            self.manifest["shards"].append(entry)
            _write_manifest(self.root, self.manifest)
        else:  # a data-parallel rank lists its shards in its own file; rank 0 merges them
            self.recorded.append(entry)
            data = json.dumps(self.recorded, indent=1).encode()
            atomic_write(self.root / _rank_file(self.rank), lambda f: f.write(data))

    def _finalize(self) -> None:
        lengths = self.scan.lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        num_values = int(lengths.sum())
        tmp = self.root / (_VALUES + _TMP)
        with open(tmp, "wb") as f:
            f.truncate(num_values * self.np_dtype.itemsize)
        if num_values:
            out = np.memmap(tmp, dtype=self.np_dtype, mode="r+", shape=(num_values,))
            seen = np.zeros(lengths.size, dtype=bool)  # per sample id
            for entry in self.manifest["shards"]:
                z = _load_npz(self.root / entry["file"], ("sample_ids", "lengths", "values"))
                sids = z["sample_ids"]
                if (
                    seen[sids].any()
                    or not np.array_equal(z["lengths"], lengths[sids])
                    or z["values"].dtype != self.np_dtype
                    or z["values"].size != int(z["lengths"].sum())
                ):
                    raise CacheCorruptError(
                        f"teacher cache shard {entry['file']} disagrees with the dataset or "
                        f"another shard; delete {self.root} and recompute"
                    )
                seen[sids] = True
                starts = offsets[sids] - np.concatenate([[0], np.cumsum(z["lengths"])[:-1]])
                dest = np.repeat(starts, z["lengths"]) + np.arange(z["values"].size)  # (n,)
                out[dest] = z["values"]
            if not seen.all():
                raise CacheCorruptError(f"the shards in {self.root} do not cover the dataset; delete it and recompute")
            out.flush()
            del out
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / _VALUES)
        fsync_dir(self.root)
        atomic_write(
            self.root / _INDEX,
            lambda f: np.savez(f, offsets=offsets, lengths=lengths, checksums=self.scan.checksums),
        )
        self.manifest.update(
            state="complete",
            num_values=num_values,
            files={
                name: {
                    "file": fname,
                    "bytes": (self.root / fname).stat().st_size,
                    "sha256": _sha256_file(self.root / fname),
                }
                for name, fname in (("values", _VALUES), ("index", _INDEX))
            },
        )
        shard_files = [e["file"] for e in self.manifest["shards"]]
        self.manifest["shards"] = []
        _write_manifest(self.root, self.manifest)
        for name in shard_files:  # only after the complete manifest is durable
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()


# --------------------------------------------------------------------------- data parallel
def _split_balanced(todo: np.ndarray, cost: np.ndarray, world: int) -> list[np.ndarray]:
    """Split ``todo`` (plan order) into ``world`` contiguous runs of about equal total ``cost``."""
    if todo.size == 0:
        return [todo for _ in range(world)]
    c = np.cumsum(cost[todo].astype(np.float64))  # (n,)
    cuts = np.searchsorted(c, c[-1] * np.arange(1, world) / world, side="left")  # (world - 1,)
    return np.split(todo, cuts)


def _exchange(failure: BaseException | None, payload: Any, what: str) -> list:
    """Collective: every rank's ``payload``, in rank order; raises on every rank if any rank failed
    (the failing rank re-raises its own error, the others name it)."""
    import torch.distributed as dist

    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, (None if failure is None else f"{type(failure).__name__}: {failure}", payload))
    if failure is not None:
        raise failure
    bad = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
    if bad:
        r, m = bad[0]
        raise CacheError(f"teacher cache {what} failed on rank {r}: {m}")
    return [p for _, p in got]


def _compute_distributed(
    open_complete: Callable[[Path, dict, bool], _T],
    root: Path,
    teacher,
    dataset,
    *,
    batch_size,
    dtype,
    shard_samples,
    progress,
    verify,
    verify_teacher,
) -> _T:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    with contextlib.ExitStack() as stack:
        # 1. every rank scans the data and fingerprints its teacher; rank 0 locks and prepares
        failure, prepared, fp = None, None, None
        try:
            scan = _Scan(dataset, progress and lead)
            fp = teacher.fingerprint()
            if lead:
                root.mkdir(parents=True, exist_ok=True)
                stack.enter_context(_lock(root))
                prepared = _prepare(
                    root,
                    teacher,
                    scan,
                    dataset,
                    batch_size=batch_size,
                    dtype=dtype,
                    verify_teacher=verify_teacher,
                    teacher_fp=fp,
                )
        except BaseException as e:  # noqa: BLE001 (re-raised by _exchange on this rank)
            failure = e
        got = _exchange(failure, (fp, prepared), "preparation")
        if len({f for f, _ in got}) > 1:
            raise CacheMismatchError(
                "the ranks' teachers differ (weights fingerprints "
                f"{sorted({f[:12] for f, _ in got})}); every rank must load the same teacher"
            )
        manifest, _, complete = got[0][1]
        if not complete:
            # 2. every rank computes its share of the missing batches, balanced by padded tokens
            failure = None
            try:
                comp = _Computation(
                    root, manifest, teacher, dataset, scan, progress and lead, verify, shard_samples, rank=rank
                )
                todo = comp.todo()
                cost = np.array([int(scan.lengths[b].max()) * b.size for b in comp.plan], dtype=np.int64)
                comp.run(_split_balanced(todo, cost, world)[rank])
            except BaseException as e:  # noqa: BLE001
                failure = e
            _exchange(failure, None, "computation")
            # 3. one finalisation, on rank 0
            failure = None
            if lead:
                try:
                    _merge_rank_files(root, manifest, len(comp.plan))
                    _Computation(root, manifest, teacher, dataset, scan, False, verify, shard_samples)._finalize()
                except BaseException as e:  # noqa: BLE001
                    failure = e
            _exchange(failure, None, "finalisation")
    return open_complete(root, _read_manifest(root), verify)
