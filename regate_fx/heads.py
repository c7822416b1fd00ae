"""What a model's forward does to its LM head's output before returning it as logits.

Decoder capture (``capture.py``) runs "decoder + LM head" as one graph. Many models do more after
the head: AyaVision multiplies by ``logit_scale``, GraniteDocling divides by ``logits_scaling``,
Gemma-style models soft-cap (``c * tanh(x / c)``), Inkling2 casts to float first. That *post-head
map* is the model's own code, in its forward, after the decoder returned: it cannot be captured
without the model's front end (vision tower and all, what decoder capture avoids).

So the map is recorded once, by running it: during the first step's dense probe forward a
``TorchFunctionMode`` is entered when the LM head returns and records every torch call that reads
the head's output or anything computed from it, up to the logits the forward returns
(:class:`PostHeadRecorder`). The record (:class:`PostHead`) is then replayed inside the captured
graph right after the head, where the graph pass analyses it like any other node: a token-wise map
(a scale, soft-capping, a cast, a norm over the vocabulary) runs on the kept rows with the rest of
the tail; a map that mixes positions is refused by the coverage invariant.

What the recording cannot follow is refused before anything is captured (``PostHeadError``): Python
control flow on the logits (``.item()``, ``bool``, ``.shape`` / ``.size()`` reads: the replay would
bake the probe's values), a tensor that is neither derived from the head's output nor a parameter
or buffer of the model (an activation, an input: it would be frozen at the probe's value), logits
not computed from the head's output at all. Checks on the probe's own values follow
(:meth:`PostHead.check`): the replay must reproduce the forward's logits bit for bit and take no
integer equal to the sequence length, and it must be per position and per sample (values changed
at some positions change no other position's logits, bit for bit; a subset of positions, or one
sample, computed alone gives the full result there): the clear refusal of a map that mixes
positions, before the pass would refuse it node by node, and the only check of it in the gathered
execution, where the model's own forward applies the map to the kept rows.

The record is taken once, with the probe's Python values baked in (``config.logit_scale`` at that
time, the module's training flag).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["PostHead", "PostHeadError", "PostHeadRecorder"]


class PostHeadError(Exception):
    """The forward's post-head map cannot be recorded or is not per position (the message says why)."""


@dataclass(frozen=True)
class _Ref:
    """A recorded value: the i-th tensor computed from the head's output (0: the head's output)."""

    index: int


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer of the model, by its dotted name (read from the module at replay)."""

    name: str


@dataclass(frozen=True)
class _Op:
    func: Any
    spec: Any  # pytree spec of (args, kwargs)
    leaves: tuple  # with _Ref / _Param in place of tensors
    outs: tuple[int | None, ...]  # the _Ref index of each leaf of the output (None: not a tensor)
    out_spec: Any


# Reads of a tracked tensor that give a Python value fixed by the model (not by the data or the
# sequence length): the replay may bake them.
_STATIC_READS = {
    "dtype",
    "device",
    "dim",
    "ndim",
    "ndimension",
    "is_floating_point",
    "is_complex",
    "layout",
    "is_cuda",
    "requires_grad",
    "is_sparse",
    "is_quantized",
    "is_meta",
}


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # a property getter: Tensor.shape.__get__
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", None) or "__get__"
    return name


class PostHead:
    """A recorded post-head map: ``logits = post(owner, head_out)``.

    ``owner`` is the module the parameters are named from (the model, or the decoder-capture wrapper
    that shares its children). The replay calls the same torch functions with the same arguments.
    """

    def __init__(self, ops: list[_Op], result: int):
        self.ops = ops
        self.result = result

    def __call__(self, owner: nn.Module, head_out: torch.Tensor) -> torch.Tensor:
        env: dict[int, Any] = {0: head_out}
        for op in self.ops:
            leaves = [
                env[x.index] if isinstance(x, _Ref) else _resolve(owner, x.name) if isinstance(x, _Param) else x
                for x in op.leaves
            ]
            args, kwargs = tree_unflatten(leaves, op.spec)
            out = op.func(*args, **kwargs)
            out_leaves, _ = tree_flatten(out)
            for i, v in zip(op.outs, out_leaves):
                if i is not None:
                    env[i] = v
        return env[self.result]

    def describe(self) -> str:
        """The torch calls of the map, in order (for messages and the report)."""
        return ", ".join(_name(op.func) for op in self.ops) or "identity"

    def check(self, owner: nn.Module, head_out: torch.Tensor, logits: torch.Tensor) -> None:
        """Raise PostHeadError unless the replay reproduces `logits` from `head_out` exactly, reads no
        number equal to the sequence length, and is per position (dim 1) and per sample (dim 0) on the
        probe's values: changing some positions changes no other (bit for bit), and a subset of
        positions computed alone gives the full result there (up to a few ulps)."""
        with torch.no_grad():
            try:
                again = self(owner, head_out)
            except Exception as e:  # noqa: BLE001 - any failure: the record cannot be replayed
                raise PostHeadError(f"its replay fails ({type(e).__name__}: {e})") from e
            if not (isinstance(again, torch.Tensor) and again.shape == logits.shape and torch.equal(again, logits)):
                raise PostHeadError(
                    "its replay does not reproduce the forward's logits (the map depends on more than the "
                    "values it was recorded with)"
                )
            if head_out.dim() < 2:
                raise PostHeadError(f"the LM head's output has no (batch, tokens) axes (shape {tuple(head_out.shape)})")
            b, t = head_out.shape[:2]
            if t > 2 and any(type(x) is int and x == t for op in self.ops for x in op.leaves):
                raise PostHeadError(
                    f"it computes with the number {t}, the batch's sequence length (a size read elsewhere in the "
                    "forward: a replay would reuse the probe's)"
                )
            # exact: values changed at some positions (samples) must leave every other one's result
            # bit for bit as it was (same shapes, so the same kernels on the same elements)
            for what, changed, other in (
                ("positions", (slice(None), slice(1, None, 2)), (slice(None), slice(0, None, 2))),
                ("samples", (slice(1, None),), (slice(0, 1),)),
            ):
                if head_out.shape[len(changed) - 1] < 2:
                    continue
                x = head_out.clone()
                x[changed] = x[changed] * 2.0 + 1.0
                try:
                    moved = self(owner, x)[other]
                except Exception as e:  # noqa: BLE001
                    raise PostHeadError(f"its replay fails on other values ({type(e).__name__}: {e})") from e
                if not torch.equal(moved, logits[other]):
                    raise PostHeadError(
                        f"it mixes {what}: changing the LM head's output at some {what} changes the logits at "
                        f"others (torch calls: {self.describe()})"
                    )
            # up to a few ulps: a subset of positions (samples) alone gives the full result there
            subsets: list[tuple[str, tuple[slice, ...]]] = []
            if t >= 2:
                subsets.append(("positions", (slice(None), slice(0, None, 2))))  # every other position
                subsets.append(("positions", (slice(None), slice(t - 1, t))))  # the last one alone
            if b >= 2:
                subsets.append(("samples", (slice(0, 1),)))
            for what, idx in subsets:
                try:
                    part = self(owner, head_out[idx])
                except Exception as e:  # noqa: BLE001
                    raise PostHeadError(f"it cannot be computed on a subset of {what} ({type(e).__name__}: {e})") from e
                want = logits[idx]
                if not (isinstance(part, torch.Tensor) and part.shape == want.shape and _close(part, want)):
                    raise PostHeadError(
                        f"it mixes {what}: computed from a subset of {what} alone it differs from the full result "
                        f"there (torch calls: {self.describe()})"
                    )


def _resolve(owner: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer `name` of `owner` (a getattr chain: what dynamo traces as module state)."""
    obj: Any = owner
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a few ulps: CPU kernels take a vectorised path for the bulk of a tensor and a
    scalar one for its tail, whose transcendental functions may differ in the last bit."""
    if not (a.is_floating_point() and b.is_floating_point()):
        return torch.equal(a, b)
    eps = torch.finfo(b.dtype).eps
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=64 * eps, atol=64 * eps * scale))


class PostHeadRecorder(TorchFunctionMode):
    """Records the torch calls on the LM head's output and what is computed from it.

    Entered (``start``) by a forward hook on the head, exited by the caller once the forward
    returned; ``result(logits)`` gives the :class:`PostHead` or raises :class:`PostHeadError`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._names.update({id(b): n for n, b in model.named_buffers(remove_duplicate=False)})
        # id(tensor) -> (its latest _Ref index, a weak reference): a recorded tensor the forward
        # frees is not kept alive (logit-sized), and a new tensor reusing its id is not mistaken for it
        self._ids: dict[int, tuple[int, weakref.ref]] = {}
        self._count = 0
        self._ops: list[_Op] = []
        self._problem: str | None = None
        self.started = False
        self.head_calls = 0

    def start(self, head_out: torch.Tensor) -> None:
        """The head returned `head_out`: record from here (a second head call restarts the record)."""
        self.head_calls += 1
        self._ids, self._count, self._ops, self._problem = {}, 0, [], None
        self._track(head_out)
        if not self.started:
            self.started = True
            self.__enter__()

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.__exit__(None, None, None)

    def _track(self, t: torch.Tensor) -> int:
        i = self._count
        self._count += 1
        self._ids[id(t)] = (i, weakref.ref(t))
        return i

    def _index(self, x: Any) -> int | None:
        """The _Ref index of a recorded tensor, None for any other value."""
        if not isinstance(x, torch.Tensor):
            return None
        got = self._ids.get(id(x))
        return got[0] if got is not None and got[1]() is x else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        if all(self._index(x) is None for x in leaves):
            return out
        name = _name(func)
        out_leaves, out_spec = tree_flatten(out)
        if not any(isinstance(x, torch.Tensor) for x in out_leaves) and name != "__setitem__":
            if name not in _STATIC_READS and self._problem is None:
                self._problem = (
                    f"it reads the logits' {name!r} (a value or shape the forward's Python code branches on "
                    "or computes with: a replay would reuse the probe's)"
                )
            return out
        template: list[Any] = []
        for x in leaves:
            if (i := self._index(x)) is not None:
                template.append(_Ref(i))
            elif isinstance(x, torch.Tensor) and id(x) in self._names:
                template.append(_Param(self._names[id(x)]))
            elif isinstance(x, torch.Tensor):
                if self._problem is None:
                    self._problem = (
                        f"{name} reads a tensor of shape {tuple(x.shape)} that is neither computed from the LM "
                        "head's output nor a parameter or buffer of the model (an input or an activation: a "
                        "replay would reuse the probe's)"
                    )
                template.append(x)
            else:
                template.append(x)
        outs = tuple(self._track(v) if isinstance(v, torch.Tensor) else None for v in out_leaves)
        self._ops.append(_Op(func, spec, tuple(template), outs, out_spec))
        return out

    def result(self, logits: Any) -> PostHead:
        if self.head_calls != 1:
            raise PostHeadError(f"the LM head ran {self.head_calls} times in one forward")
        if self._problem is not None:
            raise PostHeadError(self._problem)
        i = self._index(logits)
        if i is None:
            raise PostHeadError("its logits are not computed from the LM head's output")
        return PostHead(self._ops, i)
