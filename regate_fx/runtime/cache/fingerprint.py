"""What identifies a teacher cache: its teacher's weights and its dataset; the checks that refuse
a cache of another teacher or other data.

The writer and the reader use the same functions: the dataset fingerprint and the per-sample
token checksums (one pass over the data, :class:`_Scan`, which also plans the batches), the
weights fingerprint (every byte) and probe (a sample of each tensor) that
:meth:`TextTeacher.fingerprint` / :meth:`TextTeacher.probe` compute, and the comparisons of both
with a manifest (:func:`_check_match`, :func:`_check_teacher`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from regate_fx.runtime.cache.format import CACHE_FORMAT, CacheMismatchError
from regate_fx.runtime.data import read_sample
from regate_fx.runtime.selection import hash32

__all__ = [
    "VERIFY_TEACHER",
    "ReferenceTeacher",
    "dataset_fingerprint",
    "token_checksums",
    "weights_fingerprint",
    "weights_probe",
]

VERIFY_TEACHER = ("probe", "full")
_PROBE_SAMPLES = 64  # values read per tensor by weights_probe


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


# --------------------------------------------------------------------------- the dataset
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
    """A rich progress bar (``enabled=False``: silent); the dataset scan and the writer show one."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
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
                        f"sample {i} has sample_id {sid}; sample ids must be 0 .. len(dataset) - 1 = {n - 1}"
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


def dataset_fingerprint(dataset: Sequence, *, progress: bool = False) -> str:
    """SHA-256 over every sample's id, token ids, labels and visual mask, in sample-id order."""
    return _Scan(dataset, progress).fingerprint


# --------------------------------------------------------------------------- the teacher
def _named_tensors(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``prefix.name`` -> parameter or buffer, each tensor once (tied weights under their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix in sorted(modules):
        mod = modules[prefix]
        tensors: dict[str, torch.Tensor] = dict(mod.named_parameters(recurse=not prefix.startswith("direct:")))
        tensors.update({f"buffer:{k}": v for k, v in mod.named_buffers(recurse=not prefix.startswith("direct:"))})
        for name in sorted(tensors):
            t = tensors[name]
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{prefix}.{name}"] = t
    return out


def weights_fingerprint(modules: Mapping[str, torch.nn.Module], extra: Any = None) -> str:
    """SHA-256 of named parameters and buffers (names, dtypes, shapes and bytes), plus ``extra``.

    Args:
        modules: name -> module; every parameter and buffer of each is hashed, in sorted order, each
            tensor once. A name starting with ``"direct:"`` hashes the module's own tensors only
            (not its submodules').
        extra: JSON-serialisable data that also determines the teacher's outputs.

    Returns:
        A hex digest.
    """
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True).encode())
    for name, t in _named_tensors(modules).items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
    return h.hexdigest()


def weights_probe(modules: Mapping[str, torch.nn.Module], extra: Any = None, samples: int = _PROBE_SAMPLES) -> str:
    """A cheap fingerprint: every tensor's name, dtype and shape, and ``samples`` of its values.

    The values are read at fixed pseudo-random positions (a function of the name and size), on the
    tensor's own device, so the cost is a few small gathers per tensor whatever the model's size
    (no pass over every weight byte, no copy of the weights to the host). Any other checkpoint,
    fine-tune or merged adapter changes the sampled values; an edit of a few weights can escape it,
    which :func:`weights_fingerprint` (every byte) does not.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"probe": samples, "extra": extra}, sort_keys=True).encode())
    for name, t in _named_tensors(modules).items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        n = flat.numel()
        if n == 0:
            continue
        k = min(n, samples)
        seed = int.from_bytes(hashlib.sha256(f"{name}|{n}".encode()).digest()[:8], "little")
        step = (seed | 1) % n or 1
        idx = (torch.arange(k, dtype=torch.long) * step + seed) % n  # (k,) fixed positions
        vals = flat.index_select(0, idx.to(flat.device)).cpu()  # (k,) the only device -> host copy
        h.update(vals.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


# --------------------------------------------------------------------------- a manifest's match
def _check_match(
    manifest: dict,
    root: Path,
    *,
    teacher_fp: str | None,
    dataset_fp: str | None,
    dtype: str | None,
    num_samples: int | None,
) -> None:
    """Refuse a cache whose teacher fingerprint, size, dataset fingerprint or dtype differs from the
    given one (``None``: not compared)."""
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
    if probe is not None and isinstance(recorded, str):  # (recorded is a str whenever probe is set)
        if probe != recorded:
            raise CacheMismatchError(
                f"the teacher cache at {root} was computed with another teacher (its weights differ from "
                f"this teacher's: probe {recorded[:12]}..., this teacher {probe[:12]}...); refusing to use "
                f"its reference losses. Use a new directory for this teacher"
            )
        return
    _check_match(manifest, root, teacher_fp=teacher.fingerprint(), dataset_fp=None, dtype=None, num_samples=None)
