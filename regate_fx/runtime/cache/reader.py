"""An opened teacher cache: :class:`TeacherCache`, the checks on opening it, the lookups a step makes.

:meth:`TeacherCache.open` reads and checks the manifest (``format.py``), the teacher and the
dataset (``fingerprint.py``) and every file's size and SHA-256, then memory-maps ``values.bin``;
:meth:`~TeacherCache.lookup` and :meth:`~TeacherCache.check_batch` serve :class:`ReGate` at every
step. :meth:`TeacherCache.compute` is documented here and runs ``writer.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from regate_fx.runtime.cache import writer
from regate_fx.runtime.cache.fingerprint import (
    ReferenceTeacher,
    _check_match,
    _check_teacher,
    _Scan,
)
from regate_fx.runtime.cache.format import (
    _INDEX,
    _VALUES,
    DTYPES,
    CacheCorruptError,
    CacheIncompleteError,
    _check_file,
    _load_npz,
    _read_manifest,
)
from regate_fx.runtime.store import gather_ragged

__all__ = ["TeacherCache"]


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
                tensors (:meth:`TextTeacher.probe`: 64 values per tensor, whatever the model's size);
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
        _check_match(
            manifest,
            root,
            teacher_fp=teacher_fingerprint,
            dataset_fp=dataset_fingerprint,
            dtype=dtype,
            num_samples=num_samples,
        )
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
            raise CacheCorruptError(
                f"the teacher cache manifest in {root} is malformed ({e}); delete {root} and recompute"
            ) from e
        if manifest["dtype"] not in DTYPES:
            raise CacheCorruptError(f"the teacher cache in {root} has unknown dtype {manifest['dtype']!r}")
        _check_file(root, index_entry, verify)
        _check_file(root, values_entry, verify)
        if values_entry["bytes"] != num_values * dtype.itemsize:
            raise CacheCorruptError(f"the teacher cache in {root}: values.bin size disagrees with num_values")
        index = _load_npz(root / _INDEX, ("offsets", "lengths", "checksums"))
        shapes_ok = all(index[k].shape == (n,) and index[k].dtype == np.int64 for k in index)
        if (
            not shapes_ok
            or (index["lengths"] < 0).any()
            or (index["offsets"] < 0).any()
            or (n and (index["offsets"] + index["lengths"]).max() > num_values)
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
        return writer.compute(
            cls._open_complete,
            path,
            teacher,
            dataset,
            batch_size=batch_size,
            dtype=dtype,
            shard_samples=shard_samples,
            progress=progress,
            verify=verify,
            verify_teacher=verify_teacher,
            distributed=distributed,
        )
