"""The teacher cache's files: the directory layout, the manifest's schema and version, the errors.

Layout of a cache directory (format version 1)::

    manifest.json      the source of truth, replaced atomically after every commit
    shard-*.npz        while computing: committed batches (sample ids, lengths, values)
    shards-rank*.json  while computing data-parallel: the shards one rank committed (rank 0 folds
                       them into the manifest)
    values.bin         when complete: every sample's values, flat, in sample-id order
    index.npz          when complete: offsets, lengths and token checksums per sample id
    .lock              the writer's advisory lock

Here: the names, the version, the errors, and the checks that come before anything trusts a file
(a manifest's format, version and fields; a listed file's size and SHA-256). Writing is
``writer.py``, opening ``reader.py``; what identifies a cache's teacher and data is
``fingerprint.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from regate_fx.runtime.atomic import TMP_SUFFIX

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DTYPES",
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
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


def _rank_file(rank: int) -> str:
    return f"{_RANK_PREFIX}{rank:05d}.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        raise CacheCorruptError(
            f"the teacher cache manifest {path} is not valid JSON ({e}); delete {root} and recompute"
        ) from e
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
            f"the teacher cache manifest in {root} has a malformed file entry {entry!r}; delete {root} and recompute"
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
            f"teacher cache file {path} does not match its recorded SHA-256 (corrupt); delete {root} and recompute"
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
            f"the teacher cache manifest in {root} has a malformed shard list; delete {root} and recompute"
        )


def _load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in keys}
    except Exception as e:  # zip/CRC/format errors all mean the same thing here
        raise CacheCorruptError(f"cannot read teacher cache file {path} ({type(e).__name__}: {e})") from e
