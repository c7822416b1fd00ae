"""The student difficulty store: an EMA of the student's loss per (sample id, position).

Values live in one flat float32 array (in memory, or a numpy memmap for stores larger than
memory); each sample owns a contiguous slice of its length, allocated when the sample is first
seen. NaN marks a position never observed, so the first observation initialises the EMA.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from regate_fx.runtime import _dist

__all__ = ["DifficultyStore", "gather_ragged"]

_FORMAT = "regate_fx.difficulty_store"
_VERSION = 1
_MIN_MEMMAP_CAPACITY = 1024
_CHUNK = 1 << 22  # values copied per chunk in state_dict / load_state_dict


def _np_long(t: torch.Tensor | np.ndarray | list) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.long).numpy().reshape(-1)
    return np.asarray(t, dtype=np.int64).reshape(-1)


def gather_ragged(
    values: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    sids: np.ndarray,
    positions: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Per-sample ragged values (sample s owns ``values[offsets[s] : offsets[s] + lengths[s]]``,
    ``offsets[s] < 0`` = never seen) read at ``(sids[b], positions[b, p])``.

    Returns:
        Float32 ``[B, T]`` on the CPU, NaN where not ``valid``, unseen or out of the sample.
    """
    pos = positions.detach().to("cpu", torch.long).numpy()  # (B, T)
    ok = valid.detach().cpu().numpy().astype(bool) & (offsets[sids] >= 0)[:, None]
    ok &= (pos >= 0) & (pos < lengths[sids][:, None])
    out = np.full(pos.shape, np.nan, dtype=np.float32)  # (B, T)
    out[ok] = values[(offsets[sids][:, None] + pos)[ok]]  # (n,) flat reads
    return torch.from_numpy(out)


class DifficultyStore:
    """EMA of the student's per-token loss, per (sample id, in-sample position).

    ``D <- beta * D + (1 - beta) * l`` in float32, initialised from the first observation. It also
    counts tokens processed versus dense (the paper's "Tokens" column).

    Args:
        num_samples: sample ids are ``0 .. num_samples - 1``.
        beta: EMA decay in [0, 1).
        path: if given, values live in a memory-mapped file there (created or overwritten; it is
            scratch space: checkpoints come from :meth:`state_dict`).
        capacity: initial number of values to reserve (the store grows by doubling).
        distributed: synchronise :meth:`observe` across ranks (None: when torch.distributed is
            initialised with more than one rank). Then :meth:`observe` is a collective: every rank
            calls it every step, and every rank ends with the same store.
    """

    def __init__(
        self,
        num_samples: int,
        beta: float,
        *,
        path: str | os.PathLike | None = None,
        capacity: int = 0,
        distributed: bool | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not (0.0 <= float(beta) < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.num_samples = num_samples
        self.beta = float(beta)
        self._b = np.float32(self.beta)
        self._omb = np.float32(1.0 - self.beta)
        self.path = Path(path) if path is not None else None
        self._distributed = distributed
        self._offsets = np.full(num_samples, -1, dtype=np.int64)
        self._lengths = np.zeros(num_samples, dtype=np.int64)
        self._used = 0
        self.tokens_processed = 0
        self.tokens_dense = 0
        self.num_updates = 0
        self._values = self._allocate(max(int(capacity), 0))

    # ----------------------------------------------------------------- backing array
    def _allocate(self, capacity: int) -> np.ndarray:
        if self.path is None:
            return np.full(capacity, np.nan, dtype=np.float32)
        capacity = max(capacity, _MIN_MEMMAP_CAPACITY)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as f:
            f.truncate(capacity * 4)
        return np.memmap(self.path, dtype=np.float32, mode="r+", shape=(capacity,))

    def _reserve(self, need: int) -> None:
        cap = self._values.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 1024)
        if self.path is None:
            grown = np.full(new_cap, np.nan, dtype=np.float32)
            grown[: self._used] = self._values[: self._used]
            self._values = grown
            return
        cast(np.memmap, self._values).flush()  # a file-backed store maps its values
        del self._values
        with open(self.path, "r+b") as f:
            f.truncate(new_cap * 4)
        self._values = np.memmap(self.path, dtype=np.float32, mode="r+", shape=(new_cap,))

    @property
    def backend(self) -> str:
        """``"memory"`` or ``"memmap"``."""
        return "memory" if self.path is None else "memmap"

    @property
    def num_values(self) -> int:
        """Values allocated so far (sum of the lengths of the samples seen)."""
        return self._used

    def flush(self) -> None:
        """Write a memmap backend's dirty pages to its file (no-op in memory)."""
        if isinstance(self._values, np.memmap):
            self._values.flush()

    # ----------------------------------------------------------------- reads
    def length(self, sample_id: int) -> int | None:
        """The length recorded for ``sample_id``, or None if never seen."""
        return int(self._lengths[sample_id]) if self._offsets[sample_id] >= 0 else None

    def sample(self, sample_id: int) -> np.ndarray | None:
        """A copy of one sample's values (NaN = never observed), or None if never seen."""
        off = int(self._offsets[sample_id])
        if off < 0:
            return None
        return np.array(self._values[off : off + int(self._lengths[sample_id])], dtype=np.float32)

    def gather(self, sample_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """D at ``(sample_ids[b], positions[b, p])``, NaN where unobserved or not ``valid``.

        Args:
            sample_ids: long ``[B]``.
            positions: long ``[B, T]`` in-sample positions.
            valid: bool ``[B, T]``.

        Returns:
            Float32 ``[B, T]`` on the CPU.
        """
        sids = self._check_ids(_np_long(sample_ids))  # (B,)
        return gather_ragged(self._values, self._offsets, self._lengths, sids, positions, valid)

    # ----------------------------------------------------------------- writes
    def observe(
        self,
        sample_ids: torch.Tensor,
        lengths: torch.Tensor,
        obs_ids: torch.Tensor,
        obs_positions: torch.Tensor,
        obs_values: torch.Tensor,
        *,
        processed: int = 0,
        dense: int = 0,
    ) -> None:
        """Record one step: the samples in the batch and the losses observed.

        In a distributed run this is a collective: the arguments of all ranks are gathered in rank
        order and applied on every rank, as if one process had seen the concatenated batch.

        Args:
            sample_ids: long ``[b]``, the batch's samples (allocated on first sight).
            lengths: long ``[b]``, their lengths in real tokens.
            obs_ids: long ``[n]``, the sample of each observation.
            obs_positions: long ``[n]``, its in-sample position.
            obs_values: float ``[n]``, the student's loss there (finite).
            processed: tokens the step computed (kept real tokens).
            dense: tokens a dense step would have computed (real tokens).
        """
        meta = torch.stack(
            [sample_ids.detach().cpu().long().reshape(-1), lengths.detach().cpu().long().reshape(-1)], 1
        )  # (b, 2)
        vals = obs_values.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        obs = torch.stack(
            [
                obs_ids.detach().cpu().long().reshape(-1),
                obs_positions.detach().cpu().long().reshape(-1),
                vals.view(torch.int32).long(),  # float32 bits, exact
            ],
            1,
        )  # (n, 3)
        counts = torch.tensor([int(processed), int(dense)], dtype=torch.long)
        if _dist.distributed_active(self._distributed):
            meta = _dist.all_gather_rows(meta)
            obs = _dist.all_gather_rows(obs)
            counts = _dist.all_reduce_sum(counts)
        self._apply(
            meta[:, 0].numpy(),
            meta[:, 1].numpy(),
            obs[:, 0].numpy(),
            obs[:, 1].numpy(),
            obs[:, 2].int().view(torch.float32).numpy(),
        )
        self.tokens_processed += int(counts[0])
        self.tokens_dense += int(counts[1])
        self.num_updates += 1

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            bad = ids[(ids < 0) | (ids >= self.num_samples)][0]
            raise ValueError(
                f"sample id {int(bad)} is outside [0, num_samples={self.num_samples}); sample ids "
                f"must index the dataset the store was built for"
            )
        return ids

    def _register(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self._check_ids(ids)
        if (lengths < 0).any():
            raise ValueError("sample lengths must be >= 0")
        new = self._offsets[ids] < 0
        if new.any():
            uniq, first = np.unique(ids[new], return_index=True)
            order = np.argsort(first, kind="stable")
            new_ids = uniq[order]
            new_len = lengths[new][first[order]]
            starts = self._used + np.concatenate([[0], np.cumsum(new_len)[:-1]]).astype(np.int64)
            total = int(new_len.sum())
            self._reserve(self._used + total)
            self._values[self._used : self._used + total] = np.nan
            self._offsets[new_ids] = starts
            self._lengths[new_ids] = new_len
            self._used += total
        wrong = self._lengths[ids] != lengths
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(
                f"sample {int(ids[i])} has {int(lengths[i])} real tokens in this batch but "
                f"{int(self._lengths[ids[i]])} when first seen; the same sample id must always "
                f"carry the same tokens (check the loader's sample ids and truncation)"
            )

    def _apply(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        obs_ids: np.ndarray,
        obs_pos: np.ndarray,
        obs_vals: np.ndarray,
    ) -> None:
        self._register(ids.astype(np.int64), lengths.astype(np.int64))
        if obs_ids.size == 0:
            return
        self._check_ids(obs_ids)
        if (self._offsets[obs_ids] < 0).any():
            raise ValueError("an observation refers to a sample that is not in the batch")
        if ((obs_pos < 0) | (obs_pos >= self._lengths[obs_ids])).any():
            raise ValueError("an observation's position is outside its sample")
        if not np.isfinite(obs_vals).all():
            raise ValueError(
                "the student's token loss is not finite at a kept, supervised position; "
                "refusing to store NaN/inf in the difficulty EMA"
            )
        idx = self._offsets[obs_ids] + obs_pos  # (n,)
        # Repeated (sample, position) pairs are applied in order, one occurrence per round.
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        starts = np.r_[True, sidx[1:] != sidx[:-1]]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(sidx.size), 0))
        occurrence = np.empty_like(order)
        occurrence[order] = np.arange(sidx.size) - group_start
        for r in range(int(occurrence.max()) + 1):
            sel = occurrence == r
            self._ema(idx[sel], obs_vals[sel])

    def _ema(self, idx: np.ndarray, vals: np.ndarray) -> None:
        old = self._values[idx]
        vals = vals.astype(np.float32)
        new = np.where(np.isnan(old), vals, old * self._b + vals * self._omb)
        self._values[idx] = new.astype(np.float32)

    # ----------------------------------------------------------------- state
    def _values_snapshot(self) -> torch.Tensor:
        """A float32 copy of the used values: in RAM, or for a memmap store a file-backed tensor.

        The memmap snapshot is written next to the store's file in chunks and memory-mapped
        (its name is unlinked at once where the OS allows it), so a checkpoint of a store larger
        than memory never holds it all in RAM: ``torch.save`` pages through it.
        """
        if self.path is None or self._used == 0:
            values = torch.empty(self._used, dtype=torch.float32)
            vnp = values.numpy()
            for s in range(0, self._used, _CHUNK):
                vnp[s : s + _CHUNK] = self._values[s : min(s + _CHUNK, self._used)]
            return values
        self.flush()
        fd, name = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".snapshot", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for s in range(0, self._used, _CHUNK):
                    f.write(np.ascontiguousarray(self._values[s : min(s + _CHUNK, self._used)]).tobytes())
            values = torch.from_file(name, shared=False, size=self._used, dtype=torch.float32)
        finally:
            with contextlib.suppress(OSError):  # POSIX: the mapping outlives the name
                os.unlink(name)
        return values

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit (a snapshot, see :meth:`_values_snapshot`)."""
        values = self._values_snapshot()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "num_samples": self.num_samples,
            "beta": self.beta,
            "offsets": torch.from_numpy(self._offsets.copy()),
            "lengths": torch.from_numpy(self._lengths.copy()),
            "values": values,
            "tokens_processed": self.tokens_processed,
            "tokens_dense": self.tokens_dense,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; refuses a state of another shape or beta."""
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(
                f"not a DifficultyStore state (format {state.get('format')!r} version "
                f"{state.get('version')!r}; expected {_FORMAT!r} version {_VERSION})"
            )
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the state has num_samples={state['num_samples']} but this store has "
                f"{self.num_samples}; build the store for the same dataset"
            )
        if state["beta"] != self.beta:
            raise ValueError(
                f"the state was recorded with beta={state['beta']} but this store has "
                f"beta={self.beta}; resume with the same ReGateConfig"
            )
        offsets = _np_long(state["offsets"])
        lengths = _np_long(state["lengths"])
        values = state["values"].detach().to("cpu", torch.float32).numpy().reshape(-1)
        used = values.shape[0]
        if offsets.shape != (self.num_samples,) or lengths.shape != (self.num_samples,):
            raise ValueError("corrupt DifficultyStore state: offsets/lengths have the wrong shape")
        seen = offsets >= 0
        if seen.any() and (offsets[seen] + lengths[seen]).max() > used:
            raise ValueError("corrupt DifficultyStore state: a sample extends past the values")
        self._reserve(used)
        for s in range(0, used, _CHUNK):
            self._values[s : min(s + _CHUNK, used)] = values[s : s + _CHUNK]
        self._offsets = offsets.copy()
        self._lengths = lengths.copy()
        self._used = used
        self.tokens_processed = int(state["tokens_processed"])
        self.tokens_dense = int(state["tokens_dense"])
        self.num_updates = int(state["num_updates"])
