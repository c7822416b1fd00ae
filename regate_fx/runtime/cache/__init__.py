"""The teacher cache: reference losses computed once over the dataset, stored on disk.

Every file is written to a temporary name, fsynced, and renamed (``os.replace``); the manifest
lists a file only after it is durable, so a process killed at any point leaves a cache that
either resumes (``TeacherCache.compute`` computes only the batches no manifest-listed shard holds)
or opens. A cache whose fingerprints (teacher weights, dataset token ids), dtype or format differ,
or whose files do not match their recorded size and SHA-256, is refused with a :class:`CacheError`.

The package, in reading order:

    format.py       the directory layout, the manifest's schema and version, the errors, file checks
    fingerprint.py  what identifies a cache (the teacher's weights, the dataset), for both sides
    writer.py       TeacherCache.compute's work: the lock, shards, resuming, data-parallel ranks
    reader.py       TeacherCache: open, the checks on opening, lookups during training
"""

from regate_fx.runtime.cache.fingerprint import (
    VERIFY_TEACHER,
    ReferenceTeacher,
    dataset_fingerprint,
    token_checksums,
)
from regate_fx.runtime.cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DTYPES,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
)
from regate_fx.runtime.cache.reader import TeacherCache

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DTYPES",
    "VERIFY_TEACHER",
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "ReferenceTeacher",
    "TeacherCache",
    "dataset_fingerprint",
    "token_checksums",
]
