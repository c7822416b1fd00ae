"""The teacher cache: reference losses computed once over the dataset, stored on disk.

Layout of a cache directory (format version 1)::

    manifest.json      the source of truth, replaced atomically after every commit
    shard-*.npz        while computing: committed batches (sample ids, lengths, values)
    values.bin         when complete: every sample's values, flat, in sample-id order
    index.npz          when complete: offsets, lengths and token checksums per sample id

Every file is written to a temporary name, fsynced, and renamed (``os.replace``); the manifest
lists a file only after it is durable, so a process killed at any point leaves a cache that
either resumes (``TeacherCache.compute`` computes only the batches no manifest-listed shard holds)
or opens. A cache whose fingerprints (teacher weights, dataset token ids), dtype or format differ,
or whose files do not match their recorded size and SHA-256, is refused with a :class:`CacheError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from regate_fx.runtime import _dist
from regate_fx.runtime.atomic import TMP_SUFFIX, atomic_write, fsync_dir
from regate_fx.runtime.data import collate, read_sample
from regate_fx.runtime.selection import hash32
from regate_fx.runtime.store import gather_ragged

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "ReferenceTeacher",
    "TeacherCache",
    "dataset_fingerprint",
    "token_checksums",
]

CACHE_FORMAT = "regate_fx.teacher_cache"
CACHE_VERSION = 1
DTYPES = ("float32", "float16")
_MANIFEST = "manifest.json"
_VALUES = "values.bin"
_INDEX = "index.npz"
_TMP = TMP_SUFFIX
_RANK_PREFIX = "shards-rank"
_HASH_CHUNK = 1 << 24


class CacheError(ValueError):
    """A teacher cache that cannot be used."""


class CacheMismatchError(CacheError):
    """The cache was computed for another teacher, dataset, dtype or format version."""


class CacheCorruptError(CacheError):
    """The cache's files are missing, truncated or do not match their recorded checksums."""


class CacheIncompleteError(CacheError):
    """The computation was interrupted; resume it with :meth:`TeacherCache.compute`."""


class ReferenceTeacher(Protocol):
    """What :meth:`TeacherCache.compute` needs from a teacher (:class:`TextTeacher` is one)."""

    pad_token_id: int | None

    def fingerprint(self) -> str: ...

    # Optional: ``probe() -> str``, a cheap fingerprint (see TextTeacher.probe); without it the full
    # fingerprint is compared whenever a cache is reopened.

    def reference_losses(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------- helpers
def token_checksums(input_ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-sample checksum of the real tokens and their in-sample positions.

    Cheap and batched; the cache stores one per sample and training batches are checked against
    it, which catches sample ids that do not match the dataset the cache was computed on.

    Args:
        input_ids: long ``[B, T]``.
        positions: long ``[B, T]`` in-sample positions.
        real: bool ``[B, T]``.

    Returns:
        Long ``[B]`` (sum of 32-bit hashes; no overflow for T < 2**31).
    """
    h = hash32(hash32(positions.long() + 0x632BE5AB) ^ input_ids.long())  # (B, T)
    return torch.where(real, h, torch.zeros_like(h)).sum(dim=1)


def _sample_digest(sid: int, ids: torch.Tensor, labels: torch.Tensor, vis: torch.Tensor | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array([sid, ids.numel(), vis is not None], dtype=np.int64).tobytes())
    h.update(ids.numpy().astype(np.int64).tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    if vis is not None:
        h.update(vis.numpy().astype(np.uint8).tobytes())
    return h.digest()


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


class _Scan:
    """One pass over the dataset: ids, lengths, token checksums and the dataset fingerprint."""

    def __init__(self, dataset: Sequence, progress: bool) -> None:
        n = len(dataset)
        if n < 1:
            raise ValueError("the dataset is empty")
        self.index_of = np.full(n, -1, dtype=np.int64)  # sample id -> dataset index
        self.lengths = np.zeros(n, dtype=np.int64)
        self.checksums = np.zeros(n, dtype=np.int64)
        digests = bytearray(16 * n)
        with _progress(progress) as bar:
            task = bar.add_task("fingerprinting dataset", total=n)
            for i in range(n):
                sid, ids, labels, vis = read_sample(dataset[i], i)
                if not 0 <= sid < n:
                    raise ValueError(
                        f"sample {i} has sample_id {sid}; sample ids must be 0 .. len(dataset) - 1 "
                        f"= {n - 1}"
                    )
                if self.index_of[sid] >= 0:
                    raise ValueError(f"sample id {sid} occurs twice (indices {self.index_of[sid]} and {i})")
                self.index_of[sid] = i
                self.lengths[sid] = ids.numel()
                row = ids.view(1, -1)  # (1, L)
                pos = torch.arange(ids.numel()).view(1, -1)  # (1, L)
                self.checksums[sid] = int(token_checksums(row, pos, torch.ones_like(row, dtype=torch.bool))[0])
                digests[16 * sid : 16 * sid + 16] = _sample_digest(sid, ids, labels, vis)
                bar.advance(task)
        h = hashlib.sha256(f"{CACHE_FORMAT}/dataset/{n}".encode())
        h.update(bytes(digests))
        self.fingerprint = h.hexdigest()

    def plan(self, batch_size: int) -> list[np.ndarray]:
        """Batches of sample ids: sorted by (length, id), chunked; deterministic."""
        order = np.lexsort((np.arange(self.lengths.size), self.lengths))
        return [order[s : s + batch_size] for s in range(0, order.size, batch_size)]


def _text_part(sample: Any) -> Any:
    """What the text-only teacher reads of a sample (per-sample model inputs such as pixels left out)."""
    if not isinstance(sample, Mapping):
        return sample
    return {k: v for k, v in sample.items() if k in ("input_ids", "labels", "attention_mask", "visual_mask", "sample_id")}


def dataset_fingerprint(dataset: Sequence, *, progress: bool = False) -> str:
    """SHA-256 over every sample's id, token ids, labels and visual mask, in sample-id order."""
    return _Scan(dataset, progress).fingerprint


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(root: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(root / _MANIFEST, lambda f: f.write(data))


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
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


def _read_manifest(root: Path) -> dict:
    path = root / _MANIFEST
    if not path.exists():
        if any((root / f).exists() for f in (_VALUES, _INDEX)) or any(root.glob("shard-*.npz")):
            raise CacheCorruptError(
                f"the teacher cache at {root} has data files but no {_MANIFEST} (deleted or never "
                f"written); delete {root} and recompute"
            )
        raise CacheError(
            f"no teacher cache at {root} (no {_MANIFEST}); compute one with "
            f"TeacherCache.compute(path, teacher, dataset)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(f"the teacher cache manifest {path} is not valid JSON ({e}); delete {root} and recompute") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheCorruptError(f"{path} is not a regate_fx teacher cache manifest; delete {root} and recompute")
    if manifest.get("version") != CACHE_VERSION:
        raise CacheMismatchError(
            f"the teacher cache at {root} has format version {manifest.get('version')!r}; this "
            f"regate_fx reads version {CACHE_VERSION}. Recompute it into a new directory"
        )
    required = ("state", "teacher_fingerprint", "dataset_fingerprint", "dtype", "num_samples", "batch_size")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CacheCorruptError(f"the teacher cache manifest {path} lacks {missing}; delete {root} and recompute")
    for k in required:
        v = manifest[k]
        if k in ("num_samples", "batch_size"):
            bad = isinstance(v, bool) or not isinstance(v, int) or v < 1
        else:
            bad = not isinstance(v, str)
        if bad:
            raise CacheCorruptError(f"the teacher cache manifest {path} has {k}={v!r}; delete {root} and recompute")
    return manifest


def _check_file(root: Path, entry: dict, verify: bool) -> Path:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and Path(entry["file"]).name == entry["file"]  # a plain name inside the cache directory
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )
    if not ok:
        raise CacheCorruptError(
            f"the teacher cache manifest in {root} has a malformed file entry {entry!r}; delete "
            f"{root} and recompute"
        )
    path = root / entry["file"]
    if not path.is_file():
        raise CacheCorruptError(f"teacher cache file {path} is missing; delete {root} and recompute")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheCorruptError(
            f"teacher cache file {path} has {size} bytes, the manifest records {entry['bytes']} "
            f"(truncated or overwritten); delete {root} and recompute"
        )
    if verify and _sha256_file(path) != entry["sha256"]:
        raise CacheCorruptError(
            f"teacher cache file {path} does not match its recorded SHA-256 (corrupt); delete "
            f"{root} and recompute"
        )
    return path


def _check_shard_list(root: Path, manifest: dict, num_batches: int) -> None:
    """A partial manifest's shard list: entries with a file name and a batch range in the plan."""
    shards = manifest.get("shards")

    def ok(e: Any) -> bool:
        b = e.get("batches") if isinstance(e, dict) else None
        return (
            isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and isinstance(b, list)
            and len(b) == 2
            and all(isinstance(x, int) for x in b)
            and 0 <= b[0] < b[1] <= num_batches
        )

    if not isinstance(shards, list) or not all(ok(e) for e in shards):
        raise CacheCorruptError(
            f"the teacher cache manifest in {root} has a malformed shard list; delete {root} and "
            f"recompute"
        )


def _check_match(manifest: dict, root: Path, *, teacher_fp: str | None, dataset_fp: str | None, dtype: str | None, num_samples: int | None) -> None:
    if teacher_fp is not None and manifest["teacher_fingerprint"] != teacher_fp:
        raise CacheMismatchError(
            f"the teacher cache at {root} was computed with another teacher (weights fingerprint "
            f"{manifest['teacher_fingerprint'][:12]}..., this teacher {teacher_fp[:12]}...); "
            f"refusing to use its reference losses. Use a new directory for this teacher"
        )
    if num_samples is not None and manifest["num_samples"] != num_samples:
        raise CacheMismatchError(
            f"the teacher cache at {root} holds {manifest['num_samples']} samples but the dataset "
            f"has {num_samples}; refusing to use it. Use a new directory for this dataset"
        )
    if dataset_fp is not None and manifest["dataset_fingerprint"] != dataset_fp:
        raise CacheMismatchError(
            f"the teacher cache at {root} was computed on other data (dataset fingerprint "
            f"{manifest['dataset_fingerprint'][:12]}..., this dataset {dataset_fp[:12]}...); "
            f"refusing to use it. Use a new directory for this dataset"
        )
    if dtype is not None and manifest["dtype"] != dtype:
        raise CacheMismatchError(
            f"the teacher cache at {root} stores {manifest['dtype']} but {dtype} was requested; "
            f"use the same dtype or a new directory"
        )


VERIFY_TEACHER = ("probe", "full")


def _teacher_probe(teacher: ReferenceTeacher) -> str | None:
    probe = getattr(teacher, "probe", None)
    return probe() if callable(probe) else None


def _check_teacher(manifest: dict, root: Path, teacher: ReferenceTeacher, how: str) -> None:
    """Refuse a cache of another teacher: the cheap probe (``how="probe"``, when both sides have
    one) or the full fingerprint of every weight byte (``how="full"``)."""
    if how not in VERIFY_TEACHER:
        raise ValueError(f"verify_teacher must be one of {VERIFY_TEACHER}, got {how!r}")
    recorded = manifest.get("teacher_probe")
    probe = _teacher_probe(teacher) if how == "probe" and isinstance(recorded, str) else None
    if probe is not None:
        if probe != recorded:
            raise CacheMismatchError(
                f"the teacher cache at {root} was computed with another teacher (its weights differ from "
                f"this teacher's: probe {recorded[:12]}..., this teacher {probe[:12]}...); refusing to use "
                f"its reference losses. Use a new directory for this teacher")
        return
    _check_match(manifest, root, teacher_fp=teacher.fingerprint(), dataset_fp=None, dtype=None, num_samples=None)


def _load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in keys}
    except Exception as e:  # zip/CRC/format errors all mean the same thing here
        raise CacheCorruptError(f"cannot read teacher cache file {path} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- the cache
class TeacherCache:
    """Reference losses ``r[sample_id, position]`` on disk, ragged per sample.

    ``r[n, q]`` is the teacher's loss of the prediction made at in-sample position ``q`` (of token
    ``q + 1``); NaN where that prediction is not supervised. Build one with :meth:`compute`, open
    an existing one with :meth:`open`.
    """

    def __init__(self, root: Path, manifest: dict, index: dict[str, np.ndarray]) -> None:
        self.root = root
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self._offsets = index["offsets"]
        self._lengths = index["lengths"]
        self._checksums = index["checksums"]
        n = int(manifest["num_values"])
        self._values = (
            np.memmap(root / _VALUES, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        )

    # ------------------------------------------------------------ properties
    @property
    def num_samples(self) -> int:
        """Number of samples (ids ``0 .. num_samples - 1``)."""
        return int(self.manifest["num_samples"])

    @property
    def teacher_fingerprint(self) -> str:
        """SHA-256 of the teacher's weights and settings."""
        return self.manifest["teacher_fingerprint"]

    @property
    def dataset_fingerprint(self) -> str:
        """SHA-256 of the dataset's token ids and labels."""
        return self.manifest["dataset_fingerprint"]

    @property
    def lengths(self) -> torch.Tensor:
        """Long ``[num_samples]``: each sample's number of real tokens."""
        return torch.from_numpy(self._lengths.copy())

    @property
    def checksums(self) -> torch.Tensor:
        """Long ``[num_samples]``: each sample's :func:`token_checksums` value."""
        return torch.from_numpy(self._checksums.copy())

    def sample(self, sample_id: int) -> np.ndarray:
        """One sample's reference losses as float32 (a copy)."""
        off, n = int(self._offsets[sample_id]), int(self._lengths[sample_id])
        return np.array(self._values[off : off + n], dtype=np.float32, copy=True)  # writable, not the map

    def lookup(self, sample_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``r`` at ``(sample_ids[b], positions[b, p])``; NaN where not ``valid``.

        Args:
            sample_ids: long ``[B]``.
            positions: long ``[B, T]`` in-sample positions.
            valid: bool ``[B, T]``.

        Returns:
            Float32 ``[B, T]`` on the CPU.
        """
        sids = sample_ids.detach().to("cpu", torch.long).numpy()  # (B,)
        if sids.size and (sids.min() < 0 or sids.max() >= self.num_samples):
            raise ValueError(f"a sample id is outside [0, {self.num_samples}) of the teacher cache")
        return gather_ragged(self._values, self._offsets, self._lengths, sids, positions, valid)

    def check_batch(self, sample_ids: torch.Tensor, lengths: torch.Tensor, checksums: torch.Tensor) -> None:
        """Refuse a batch whose samples are not the ones the cache was computed on.

        Raises:
            ValueError: a sample's length or token checksum differs from the cache's.
        """
        sids = sample_ids.detach().to("cpu", torch.long).numpy()
        if sids.size and (sids.min() < 0 or sids.max() >= self.num_samples):
            raise ValueError(f"a sample id is outside [0, {self.num_samples}) of the teacher cache")
        ln = lengths.detach().to("cpu", torch.long).numpy()
        cs = checksums.detach().to("cpu", torch.long).numpy()
        bad = (self._lengths[sids] != ln) | (self._checksums[sids] != cs)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            sid, cached = int(sids[i]), int(self._lengths[sids[i]])
            what = (
                f"has {int(ln[i])} real tokens in this batch but {cached} in the teacher cache"
                if cached != int(ln[i])
                else "has other token ids in this batch than in the teacher cache"
            )
            raise ValueError(
                f"sample id {sid} {what}; the loader's sample ids, tokenization or truncation "
                f"differ from the dataset the cache was computed on"
            )

    # ------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        teacher: ReferenceTeacher | None = None,
        dataset: Sequence | None = None,
        teacher_fingerprint: str | None = None,
        dataset_fingerprint: str | None = None,
        dtype: str | None = None,
        verify: bool = True,
        verify_teacher: str = "probe",
    ) -> "TeacherCache":
        """Open a complete cache, refusing it if corrupt or computed for another teacher/dataset.

        Args:
            path: the cache directory.
            teacher: if given, it must be the cache's teacher (see ``verify_teacher``).
            dataset: if given, its fingerprint must match (one pass over the dataset).
            teacher_fingerprint: an expected teacher fingerprint (instead of ``teacher``).
            dataset_fingerprint: an expected dataset fingerprint (instead of ``dataset``).
            dtype: if given, the on-disk dtype the cache must have (``"float32"``/``"float16"``).
            verify: check every file's SHA-256 (sizes are always checked).
            verify_teacher: ``"probe"`` (default) compares a sample of each of the teacher's weight
                tensors (:meth:`TextTeacher.probe`: milliseconds, even for a 7B teacher);
                ``"full"`` hashes every weight byte (:meth:`TextTeacher.fingerprint`).

        Raises:
            CacheIncompleteError: the computation was interrupted.
            CacheMismatchError: another teacher, dataset, dtype or format version.
            CacheCorruptError: missing, truncated or altered files.
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if teacher is not None:
            _check_teacher(manifest, root, teacher, verify_teacher)
        num_samples = None
        if dataset is not None:
            dataset_fingerprint = _Scan(dataset, progress=False).fingerprint
            num_samples = len(dataset)
        _check_match(manifest, root, teacher_fp=teacher_fingerprint, dataset_fp=dataset_fingerprint, dtype=dtype, num_samples=num_samples)
        if manifest["state"] != "complete":
            raise CacheIncompleteError(
                f"the teacher cache at {root} is incomplete ({len(manifest.get('shards', []))} shards "
                f"committed); resume it with TeacherCache.compute({str(root)!r}, teacher, dataset)"
            )
        return cls._open_complete(root, manifest, verify)

    @classmethod
    def _open_complete(cls, root: Path, manifest: dict, verify: bool) -> "TeacherCache":
        try:
            files = manifest["files"]
            num_values = int(manifest["num_values"])
            n = int(manifest["num_samples"])
            dtype = np.dtype(manifest["dtype"])
            values_entry, index_entry = files["values"], files["index"]
        except (KeyError, TypeError, ValueError) as e:
            raise CacheCorruptError(f"the teacher cache manifest in {root} is malformed ({e}); delete {root} and recompute") from e
        if manifest["dtype"] not in DTYPES:
            raise CacheCorruptError(f"the teacher cache in {root} has unknown dtype {manifest['dtype']!r}")
        _check_file(root, index_entry, verify)
        _check_file(root, values_entry, verify)
        if values_entry["bytes"] != num_values * dtype.itemsize:
            raise CacheCorruptError(f"the teacher cache in {root}: values.bin size disagrees with num_values")
        index = _load_npz(root / _INDEX, ("offsets", "lengths", "checksums"))
        shapes_ok = all(index[k].shape == (n,) and index[k].dtype == np.int64 for k in index)
        if not shapes_ok or (index["lengths"] < 0).any() or (index["offsets"] < 0).any() or (
            n and (index["offsets"] + index["lengths"]).max() > num_values
        ):
            raise CacheCorruptError(f"the teacher cache index in {root} is inconsistent; delete {root} and recompute")
        return cls(root, manifest, index)

    # ------------------------------------------------------------ compute
    @classmethod
    def compute(
        cls,
        path: str | os.PathLike,
        teacher: ReferenceTeacher,
        dataset: Sequence,
        *,
        batch_size: int = 8,
        dtype: str = "float32",
        shard_samples: int = 1024,
        progress: bool = True,
        verify: bool = True,
        verify_teacher: str = "probe",
        distributed: bool | None = None,
    ) -> "TeacherCache":
        """Compute (or resume, or just open) the cache of ``teacher``'s losses over ``dataset``.

        Samples are batched by length (sorted by (length, id), chunks of ``batch_size``, right
        padded), run under ``torch.no_grad``, and committed in shards of about ``shard_samples``
        samples. If ``path`` holds an interrupted computation for the same teacher and dataset,
        only the missing batches are computed (with the batch size recorded in the manifest, so
        the result is bit-for-bit that of an uninterrupted run). A complete matching cache is
        opened without recomputation, its teacher checked as ``verify_teacher`` says.

        Data parallel: when ``torch.distributed`` is initialised with more than one rank (or
        ``distributed=True``), every rank calls ``compute`` with the same arguments; the batches
        still to do are split among the ranks (contiguous runs of the length-sorted plan, balanced
        by padded tokens), each rank commits its own shards, and rank 0 alone finalises. The result
        is bit-for-bit the single-process cache (each batch is the same batch on whichever rank),
        an interrupted run resumes with any number of ranks, and every rank returns the opened
        cache. Every rank's teacher must be the same weights (checked).

        Args:
            path: the cache directory (created if needed).
            teacher: a :class:`ReferenceTeacher`, e.g. from :func:`text_only_teacher`.
            dataset: a sequence of samples (see :mod:`regate_fx.runtime.data`); sample ids must
                be ``0 .. len(dataset) - 1``.
            batch_size: samples per teacher forward.
            dtype: ``"float32"`` or ``"float16"`` on disk.
            shard_samples: samples per committed shard (the most work a crash can lose).
            progress: show rich progress bars.
            verify: check SHA-256 of shards and final files.
            verify_teacher: how a *complete* cache's teacher is checked: ``"probe"`` (a sample of
                every weight tensor) or ``"full"`` (every byte); see :meth:`open`. A new or
                resumed computation always uses the full fingerprint.
            distributed: compute data-parallel (None: whenever torch.distributed is initialised
                with more than one rank).

        Raises:
            CacheMismatchError: ``path`` holds a cache for another teacher, dataset or dtype.
            CacheCorruptError: ``path`` holds damaged files.
        """
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
            return _compute_distributed(cls, root, teacher, dataset, batch_size=batch_size, dtype=dtype,
                                        shard_samples=shard_samples, progress=progress, verify=verify,
                                        verify_teacher=verify_teacher)
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root):
            scan = _Scan(dataset, progress)
            manifest, batch_size, complete = _prepare(root, teacher, scan, dataset, batch_size=batch_size,
                                                      dtype=dtype, verify_teacher=verify_teacher)
            if complete:
                return cls._open_complete(root, manifest, verify)
            _Computation(root, manifest, teacher, dataset, scan, progress, verify, shard_samples).run()
            return cls._open_complete(root, manifest, verify)


def _prepare(root: Path, teacher: ReferenceTeacher, scan: "_Scan", dataset: Sequence, *, batch_size: int,
             dtype: str, verify_teacher: str, teacher_fp: str | None = None) -> tuple[dict, int, bool]:
    """Under the lock: read (checking it matches) or create the manifest, fold in the shards that
    data-parallel ranks recorded, and remove leftovers. Returns (manifest, batch size, complete)."""
    if (root / _MANIFEST).exists():
        manifest = _read_manifest(root)
        _check_match(manifest, root, teacher_fp=None, dataset_fp=scan.fingerprint, dtype=dtype,
                     num_samples=len(dataset))
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


def _rank_file(rank: int) -> str:
    return f"{_RANK_PREFIX}{rank:05d}.json"


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
            raise CacheCorruptError(f"teacher cache rank file {f} is not valid JSON ({e}); delete {root} and "
                                    f"recompute") from e
        _check_shard_list(root, {"shards": entries}, num_batches)
        manifest["shards"].extend(e for e in entries if e["file"] not in listed)
        listed.update(e["file"] for e in entries)
    manifest["shards"].sort(key=lambda e: e["batches"][0])
    done = np.zeros(num_batches, dtype=np.int64)
    for e in manifest["shards"]:
        done[e["batches"][0]:e["batches"][1]] += 1
    if (done > 1).any():
        raise CacheCorruptError(f"the teacher cache shards in {root} overlap; delete {root} and recompute")
    _write_manifest(root, manifest)
    for f in files:
        f.unlink()
    fsync_dir(root)


class _Computation:
    """The resumable part of :meth:`TeacherCache.compute` (under the directory lock).

    Single process: :meth:`run` computes every batch not yet in a listed shard, then finalises.
    A data-parallel rank: ``rank`` is set, :meth:`run` gets its share of the batches, records its
    shards in its own ``shards-rank*.json`` (the manifest is rank 0's), and does not finalise.
    """

    def __init__(self, root, manifest, teacher, dataset, scan, progress, verify, shard_samples,
                 rank: int | None = None) -> None:
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
                raise CacheCorruptError(
                    f"the shards in {self.root} do not cover the dataset; delete it and recompute"
                )
            out.flush()
            del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
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
                name: {"file": fname, "bytes": (self.root / fname).stat().st_size, "sha256": _sha256_file(self.root / fname)}
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


def _compute_distributed(cls, root: Path, teacher, dataset, *, batch_size, dtype, shard_samples, progress,
                         verify, verify_teacher) -> "TeacherCache":
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
                prepared = _prepare(root, teacher, scan, dataset, batch_size=batch_size, dtype=dtype,
                                    verify_teacher=verify_teacher, teacher_fp=fp)
        except BaseException as e:  # noqa: BLE001 (re-raised by _exchange on this rank)
            failure = e
        got = _exchange(failure, (fp, prepared), "preparation")
        if len({f for f, _ in got}) > 1:
            raise CacheMismatchError("the ranks' teachers differ (weights fingerprints "
                                     f"{sorted({f[:12] for f, _ in got})}); every rank must load the same teacher")
        manifest, _, complete = got[0][1]
        if not complete:
            # 2. every rank computes its share of the missing batches, balanced by padded tokens
            failure = None
            try:
                comp = _Computation(root, manifest, teacher, dataset, scan, progress and lead, verify,
                                    shard_samples, rank=rank)
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
    return cls._open_complete(root, _read_manifest(root), verify)
