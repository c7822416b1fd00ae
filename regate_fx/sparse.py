"""`sparsify`: the one-call entry point, and the module it returns."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from regate_fx.capture import CAPTURE_MODES, Capture, capture_error, install_output_hooks, mark_token_axes
from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.passes.backend import PlaceholderRoles, make_backend, resolve_backend
from regate_fx.passes.kernels import kept_rows
from regate_fx.report import RewriteReport

__all__ = ["KeptLayout", "ReGateOutput", "SparseModel", "SparsifyConfig", "kept_layout", "sparsify"]

IGNORE_INDEX = -100


@dataclass
class SparsifyConfig:
    """Options of :func:`sparsify`.

    Attributes:
        strict: raise :class:`~regate_fx.RewriteError` when a branch cannot run on kept tokens
            (default). With ``False`` such branches stay dense and a warning names them.
        fullgraph: must stay True: the pass analyses the residual stream of the whole model, so
            the model is captured as one graph and a graph break raises with dynamo's reason. (With
            a break inside the model no captured piece would see both the inputs and the keep
            layout, so ``False`` could never run sparse; it is refused.)
        validate: check every ``keep_mask`` (shape, dtype, device, kept padding, empty samples).
            Costs one host sync per step on GPU; turn off only once the input pipeline is trusted
            (a kept padding position is then undefined behaviour: the rewrite relies on kept
            positions being real tokens, e.g. to run attention on SDPA's causal fast path).
        print_report: print the rewrite report (a rich table) after the first sparse compile.
        progress: show a spinner on the terminal while the first dense and the first sparse call
            capture and compile (minutes for a large model with inductor).
        return_logits: whether a sparse step returns ``out.logits`` (B, T, V). ``None`` (default):
            only when the call has no ``labels``, the convention of fused-loss kernels such as
            Liger's: a training step with labels reads ``out.loss`` / ``out.token_loss`` and never
            materialises a (B, T, V) tensor, while a call without labels (inference, scoring)
            still gets its logits. ``True``: always (costs a zero-filled (B, T, V) tensor and a
            scatter at every step); ``False``: never. ``out.loss`` and ``out.token_loss`` do not
            depend on it.
        capture: what dynamo captures (``regate_fx/capture.py``): ``"model"`` the whole forward;
            ``"decoder"`` the decoder and LM head, on the inputs the model's own forward computes
            for them eagerly (vision tower, projector, feature merge, M-RoPE position ids);
            ``"auto"`` (default) picks ``"decoder"`` for multimodal models.
    """

    strict: bool = True
    fullgraph: bool = True
    validate: bool = True
    print_report: bool = False
    progress: bool = True
    return_logits: bool | None = None
    capture: str = "auto"

    def __post_init__(self):
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"SparsifyConfig.capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        for name in ("strict", "fullgraph", "validate", "print_report", "return_logits", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "return_logits" and value is None):
                allowed = "a bool or None" if name == "return_logits" else "a bool"
                raise ValueError(f"SparsifyConfig.{name} must be {allowed}, got {value!r}")
        if not self.fullgraph:
            raise ValueError("SparsifyConfig.fullgraph=False is not supported: the pass needs the whole "
                             "model as one graph to find its residual stream. Fix the graph break that "
                             "dynamo reports instead (the error names it), or run the model dense.")

    def wants_logits(self, has_labels: bool) -> bool:
        """Whether a sparse step returns (B, T, V) logits (see ``return_logits``)."""
        return (not has_labels) if self.return_logits is None else self.return_logits


@dataclass
class ReGateOutput(ModelOutput):
    """Output of a sparsified model.

    Attributes:
        loss: mean cross-entropy over the kept prediction positions whose next label is supervised
            (None without labels).
        logits: (B, T, V); correct at kept positions, zero at pruned ones. At a sparse step it is
            None when the call has labels (the default ``SparsifyConfig(return_logits=None)``)
            or with ``return_logits=False``.
        token_loss: (B, T) per-position cross-entropy of the prediction made at each position,
            zero where not computed (pruned, or next label ignored). None without labels.
        keep_mask: the (B, T) mask the step ran with (None for a dense call).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None


@dataclass
class KeptLayout:
    """Kept positions in a padded (B, K) layout; see `regate_fx.passes.rewrite` for the contract."""

    gather_idx: torch.Tensor  # (B, K) long
    scatter_idx: torch.Tensor  # (B, K) long
    valid: torch.Tensor  # (B, K) bool


def kept_layout(keep: torch.Tensor) -> KeptLayout:
    """Build the padded kept layout of a bool keep mask (B, T); every row must keep >= 1 position."""
    b, t = keep.shape
    counts = keep.sum(1)  # (B,)
    # K >= 2 so dynamo never specialises the kept length to 0/1 (that would recompile).
    k = min(max(int(counts.max()), 2), t)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, each ascending
    scatter_idx = order[:, :k].contiguous()  # (B, K)
    valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]  # (B, K)
    last = scatter_idx.gather(1, (counts - 1).clamp(min=0)[:, None])  # (B, 1) last kept position
    gather_idx = torch.where(valid, scatter_idx, last)  # (B, K)
    return KeptLayout(gather_idx, scatter_idx, valid)


def _step(model: nn.Module, inputs: dict, use_cache_kw: dict, gather_idx, scatter_idx, valid, labels,
          return_logits: bool = True):
    """The function dynamo captures: the model's forward, then logits/loss at kept positions."""
    logits = model(**inputs, **use_cache_kw).logits  # (B, T, V)
    if gather_idx is None:
        loss = token_loss = None
        if labels is not None:
            target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label of p+1
            counted = target != IGNORE_INDEX
            if inputs.get("attention_mask") is not None:  # a padding position predicts nothing
                counted = counted & (inputs["attention_mask"] != 0)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), target.clamp(min=0).flatten(),
                                 reduction="none").view_as(target)
            token_loss = torch.where(counted, ce, 0.0)  # (B, T)
            loss = token_loss.sum() / counted.sum().clamp(min=1)
        return logits, loss, token_loss
    # kept_rows marks the output for the pass: it replays the tail (final norm, LM head) on the
    # kept rows, so the full-length logits are never computed.
    kept_logits = kept_rows(logits, gather_idx)  # (B, K, V); padding slots repeat a kept row
    full_logits = None
    if return_logits:
        seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)  # not logits.size(): keeps (B, T, V) alive
        rows = torch.where(valid, scatter_idx, t)  # (B, K): padding slots go to a spare row T
        full_logits = kept_logits.new_zeros(b, t + 1, v).scatter(
            1, rows.unsqueeze(-1).expand(-1, -1, v), kept_logits)[:, :t]  # (B, T, V), zero where pruned
    loss = token_loss = None
    if labels is not None:
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).gather(1, gather_idx)  # (B, K)
        counted = valid & (target != IGNORE_INDEX)
        ce = F.cross_entropy(kept_logits.flatten(0, 1).float(), target.clamp(min=0).flatten(),
                             reduction="none").view_as(target)  # (B, K)
        ce = torch.where(counted, ce, 0.0)
        loss = ce.sum() / counted.sum().clamp(min=1)
        token_loss = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device).scatter(1, scatter_idx, ce)
    return full_logits, loss, token_loss


_INSTANCES = itertools.count()


def _own_step_function() -> Callable:
    """A copy of `_step` with its own code object: dynamo caches (and counts recompiles) per code
    object, so each sparsified model gets its own cache instead of sharing one across models."""
    code = _step.__code__.replace(co_name=f"regate_step_{next(_INSTANCES)}")
    return types.FunctionType(code, _step.__globals__, code.co_name, _step.__defaults__, _step.__closure__)


class SparseModel(nn.Module):
    """A model whose decoder runs on the kept tokens of a ReGATE keep mask.

    Shares its parameters with the wrapped model (an optimizer over ``model.parameters()`` trains
    it); the wrapped model stays usable and dense. Built by :func:`sparsify`.

    Attributes:
        model: the wrapped model.
        regate_report: a :class:`~regate_fx.RewriteReport` of every graph captured so far.
    """

    def __init__(self, model: nn.Module, config: SparsifyConfig, backend: str | Callable):
        super().__init__()
        self.model = model
        self.config = config
        self.regate_report = RewriteReport()
        self._roles = PlaceholderRoles()
        params = inspect.signature(model.forward).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._use_cache_kw = {"use_cache": False} if ("use_cache" in params or accepts_kwargs) else {}
        self._printed = False
        self._compiled_kinds: set[str] = set()  # "dense" / "sparse" calls that have compiled once
        install_output_hooks(model)
        self._capture = Capture(model, config.capture, self._use_cache_kw)
        regate_backend = make_backend(resolve_backend(backend), self.regate_report, self._roles,
                                      strict=config.strict, on_report=self._maybe_print)
        self._compiled = torch.compile(_own_step_function(), backend=regate_backend, fullgraph=config.fullgraph)

    def _first_call_status(self, kind: str):
        """A rich spinner on stderr during the first (compiling) call of each kind."""
        if kind in self._compiled_kinds or not self.config.progress:
            return contextlib.nullcontext()
        self._compiled_kinds.add(kind)
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return contextlib.nullcontext()
        return console.status(f"regate_fx: capturing and compiling the {kind} graph (first {kind} call)")

    def _maybe_print(self, _graph_report) -> None:
        if self.config.print_report and not self._printed:
            from rich.console import Console

            Console().print(self.regate_report)
            self._printed = True

    def forward(self, *args: Any, keep_mask: torch.Tensor | None = None, **inputs: Any) -> ReGateOutput:
        """Run the model; with ``keep_mask`` (bool [B, T]) the decoder computes kept positions only.

        Args:
            *args: refused with a TypeError: pass every input by keyword.
            keep_mask: bool (B, T); True = position computed (visible as context in every layer,
                its prediction counted in the loss). None runs the dense model.
            **inputs: the wrapped model's keyword arguments (``input_ids`` or ``inputs_embeds``,
                ``attention_mask``, ``labels``, ``pixel_values``, ...).
        """
        if args:
            raise TypeError(f"the sparsified model takes keyword arguments only (input_ids=..., "
                            f"attention_mask=..., labels=..., keep_mask=...), got {len(args)} positional")
        labels = inputs.pop("labels", None)
        seq = inputs.get("input_ids")
        if seq is None:
            seq = inputs.get("inputs_embeds")
        if seq is None:
            raise ValueError("regate_fx: pass input_ids or inputs_embeds to the sparsified model")
        layout = None
        if keep_mask is not None:
            if self.config.validate:
                check_keep_mask(keep_mask, seq, inputs.get("attention_mask"))
            layout = kept_layout(keep_mask)
            if inputs.get("attention_mask") is None and inputs.get("position_ids") is None \
                    and _accepts(self.model, "attention_mask"):
                # No padding and default positions: the same call as an all-ones padding mask. Without
                # one, transformers builds its causal mask from position ids plus a packed-sequence
                # term the pass cannot prove causal, and attention would run on a gathered (B, 1, K, K)
                # mask; with one the pass proves it and the kept tokens use SDPA's causal fast path.
                inputs["attention_mask"] = torch.ones(seq.shape[:2], dtype=torch.long, device=seq.device)
        # The whole model, or its decoder + head on eagerly computed inputs (regate_fx/capture.py).
        target, inputs, seq = self._capture.prepare(inputs, seq)
        # Batch and token axes symbolic from the first capture, so new shapes do not recompile.
        mark_token_axes([inputs, labels], seq.shape[0], seq.shape[1])
        if layout is not None and not torch.compiler.is_compiling():
            for t in (layout.gather_idx, layout.scatter_idx, layout.valid):
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)
        am = inputs.get("attention_mask")
        self._roles.set(seq=seq, attention_mask=am if isinstance(am, torch.Tensor) and am.dim() == 2 else None,
                        gather_idx=layout and layout.gather_idx,
                        scatter_idx=layout and layout.scatter_idx, valid=layout and layout.valid)
        kind = "dense" if layout is None else "sparse"
        try:
            with torch.fx.experimental._config.patch(use_duck_shape=False), self._first_call_status(kind):
                logits, loss, token_loss = self._compiled(
                    target, inputs, self._use_cache_kw,
                    layout and layout.gather_idx, layout and layout.scatter_idx, layout and layout.valid, labels,
                    self.config.wants_logits(labels is not None))
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e.__cause__
            if isinstance(inner, (KeepMaskError, RewriteError)):
                raise inner.with_traceback(None) from None
            raise capture_error(e, self.model, self._capture.mode) from e
        except (KeepMaskError, RewriteError):
            raise
        except Exception as e:  # a capture dynamo could not complete: name the module, say what to do
            err = capture_error(e, self.model, self._capture.mode)
            if err is None:
                raise
            raise err from e
        finally:
            self._roles.set()
        return ReGateOutput(loss=loss, logits=logits, token_loss=token_loss, keep_mask=keep_mask)


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward names the keyword argument `name` (not merely **kwargs)."""
    return _forward_accepts(type(model), name)


def check_keep_mask(keep: torch.Tensor, seq: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raise :class:`KeepMaskError` (a ValueError) if `keep` cannot drive a sparse step."""
    if not isinstance(keep, torch.Tensor):
        raise KeepMaskError(f"keep_mask must be a torch.Tensor of dtype bool, got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        raise KeepMaskError(f"keep_mask must have dtype torch.bool, got {keep.dtype}; "
                            "convert it with keep_mask.bool()")
    if tuple(keep.shape) != tuple(seq.shape[:2]):
        raise KeepMaskError(f"keep_mask has shape {tuple(keep.shape)} but the batch is "
                            f"{tuple(seq.shape[:2])} (batch, tokens); it needs one entry per token")
    if keep.device != seq.device:
        raise KeepMaskError(f"keep_mask is on {keep.device} but the inputs are on {seq.device}; "
                            f"move it with keep_mask.to({str(seq.device)!r})")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(keep.shape):
            raise KeepMaskError(f"attention_mask has shape {tuple(attention_mask.shape)} but keep_mask has "
                                f"{tuple(keep.shape)}; pass the 2-D (batch, tokens) padding mask")
        kept_pad = keep & (attention_mask == 0)
        if bool(kept_pad.any()):
            b, p = (int(x) for x in kept_pad.nonzero()[0])
            raise KeepMaskError(f"keep_mask keeps padding: sample {b}, position {p} has attention_mask 0; "
                                "clear it with keep_mask & attention_mask.bool()")
    empty = ~keep.any(1)
    if bool(empty.any()):
        raise KeepMaskError(f"keep_mask keeps no position in sample(s) {empty.nonzero().flatten().tolist()}; "
                            "every sample needs at least one kept position")


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *,
             backend: str | Callable = "inductor") -> SparseModel:
    """Make a Hugging Face causal LM (or LLaVA-style MLLM) ReGATE-sparse.

    The model is captured with dynamo on its first call; a graph pass finds the residual stream and
    its attention / MLP / parallel branches from the graph's structure and rewrites them to run on
    the kept tokens only (gather -> compute -> scatter); the result is compiled with ``backend``.

    Args:
        model: the model; it is not modified and keeps working densely.
        config: :class:`SparsifyConfig`; defaults to strict refusal of unrewritable branches.
        backend: the torch.compile backend used after the pass: ``"eager"``, ``"aot_eager"``,
            ``"inductor"`` or a callable backend.

    Returns:
        A :class:`SparseModel` sharing ``model``'s parameters. Call it with the model's keyword
        arguments plus ``keep_mask``; read ``.regate_report`` for what was rewritten.

    Example:
        >>> smodel = regate_fx.sparsify(model, backend="eager")
        >>> out = smodel(input_ids=ids, attention_mask=am, labels=labels, keep_mask=keep)
        >>> out.loss.backward()
        >>> print(smodel.regate_report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    if not (callable(backend) or backend in ("eager", "aot_eager", "inductor")
            or backend in torch._dynamo.list_backends()):
        raise ValueError(f"unknown backend {backend!r}; use 'eager', 'aot_eager', 'inductor' or a callable")
    return SparseModel(model, config, backend)
