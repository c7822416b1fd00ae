"""Atomic files: a crash while writing never leaves a half-written checkpoint or cache file.

Every write goes to a temporary name next to the target, is fsynced, and renamed over the target
(``os.replace`` is atomic on POSIX and Windows); the directory is fsynced so the rename survives
a power loss. The teacher cache and training checkpoints both use it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import IO, Any, Callable

import torch

__all__ = ["TMP_SUFFIX", "UnsafeCheckpointError", "atomic_write", "fsync_dir", "load_checkpoint", "save_checkpoint"]

TMP_SUFFIX = ".regate-tmp"  # ignored by .gitignore; a leftover means a writer was killed


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` via ``write(file)`` to a temporary name, fsync, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state, path)``, atomically: the previous checkpoint stays valid until the new
    one is complete.

    Args:
        path: the checkpoint file; its directory is created if needed.
        state: e.g. ``{"model": ..., "optimizer": ..., "regate": rg.state_dict(), "step": step}``.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects other than tensors and plain Python data: loading it would run code."""


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file; a missing or unreadable file is a clear error.

    Loading never runs code from the file: it is unpickled with ``torch.load(weights_only=True)``,
    which admits tensors, dicts, lists, tuples, strings, numbers, ``None`` and the few torch types
    a state dict holds (what the model, the optimizer and :meth:`ReGate.state_dict` save). Anything
    else (a class, a function, an object with a ``__reduce__``) is refused before it is built.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        UnsafeCheckpointError: the file holds other objects (a ``ValueError``).
        ValueError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: nothing was built or run
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors and plain Python data, and regate_fx does not load "
            f"such files (unpickling them can run arbitrary code). Save plain state (state_dict()s, numbers, "
            f"strings, lists, dicts). If you trust the file and must read it, use torch.load(path, "
            f"weights_only=False) yourself. ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    except Exception as e:  # truncated zip, pickle errors: all mean the file is unusable
        raise ValueError(f"{path} is not a readable regate_fx checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state
