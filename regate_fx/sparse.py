"""`sparsify`: the one-call entry point, and the module it returns."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import itertools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from regate_fx.capture import CAPTURE_MODES, Capture, capture_error, mark_token_axes
from regate_fx.compat import capture_settings, check_environment, install_output_hooks, needs_output_hooks
from regate_fx.constants import IGNORE_INDEX
from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.passes.backend import PackedRefused, PlaceholderRoles, SparseRuns, make_backend, resolve_backend
from regate_fx.passes.kernels import kept_rows, kept_rows_packed
from regate_fx.report import RewriteReport

__all__ = ["KeptLayout", "LAYOUTS", "PackedLayout", "ReGateOutput", "SparseForward", "SparsifyConfig", "counted_predictions", "is_sparsified",
           "kept_layout", "packed_layout", "sparse_forward", "sparsify", "unsparsify"]

LAYOUTS = ("auto", "padded", "packed")


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
        layout: how a sparse step lays out the kept tokens. ``"padded"``: (B, K), K the largest
            kept count, shorter samples padded; ``"packed"``: every sample's kept tokens in one
            row (1, N), N the total kept count, attention per sample (varlen flash attention on
            CUDA in half precision, SDPA's flash kernel per sample on the CPU, SDPA on a
            per-sample padded view on CUDA in fp32), so projections,
            MLPs and the LM head compute no padding; the graph must allow it (every attention
            causal SDPA, side inputs (batch, tokens, ...)), else :class:`~regate_fx.RewriteError`
            says why. ``"auto"`` (default): packed when the padded layout of a step would waste
            at least ``packed_min_waste`` of its slots and the graph allows it (the reason it
            does not is in ``model.regate_report``), padded otherwise. Each layout is its own
            compiled graph, compiled at its first use.
        packed_min_waste: the padding share (0-1) of the (B, K) layout above which ``"auto"``
            packs a step.
        dynamic: sizes the inner compiler sees, as ``torch.compile(dynamic=...)``. ``None``
            (default, torch.compile's own default): the first sparse graph is compiled for the
            batch size, length and kept count of its first call, which compiles about as fast
            as plain ``torch.compile``; the first call with other sizes (in training, the second
            step: the kept count changes every step) recompiles once with symbolic sizes, and
            that graph serves every later step. ``True``: symbolic from the first call, one
            compile in all (less compile time over a run, a slower first step: 1.37-1.45x plain
            torch.compile's on the CPU, docs/benchmarks.md). The capture and the pass always use
            symbolic sizes; with ``backend="eager"`` there is no inner compile, so both behave as
            ``True``. ``False`` (a compile per shape) is refused: the kept count changes every step.
    """

    strict: bool = True
    fullgraph: bool = True
    validate: bool = True
    print_report: bool = False
    progress: bool = True
    return_logits: bool | None = None
    capture: str = "auto"
    layout: str = "auto"
    packed_min_waste: float = 0.1
    dynamic: bool | None = None

    def __post_init__(self):
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"SparsifyConfig.capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"SparsifyConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if isinstance(self.packed_min_waste, bool) or not isinstance(self.packed_min_waste, (int, float)) \
                or not 0.0 <= self.packed_min_waste <= 1.0:
            raise ValueError(f"SparsifyConfig.packed_min_waste must be a number in [0, 1], "
                             f"got {self.packed_min_waste!r}")
        for name in ("strict", "fullgraph", "validate", "print_report", "return_logits", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "return_logits" and value is None):
                allowed = "a bool or None" if name == "return_logits" else "a bool"
                raise ValueError(f"SparsifyConfig.{name} must be {allowed}, got {value!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ValueError(f"SparsifyConfig.dynamic must be None or True, got {self.dynamic!r}")
        if self.dynamic is False:
            raise ValueError("SparsifyConfig.dynamic=False is not supported: the kept count K changes at every "
                             "step, so a graph compiled per shape would recompile at every step (and stop at "
                             "dynamo's recompile limit). Use dynamic=None (default: static first compile, "
                             "symbolic from the first new shape) or dynamic=True (symbolic from the start).")
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


@dataclass
class PackedLayout:
    """Kept positions packed in one row; see `regate_fx.passes.kernels` (packed layout)."""

    flat_idx: torch.Tensor  # (N,) long: b * T + t of every kept token, ascending
    pad_idx: torch.Tensor  # (B, K) long: sample b's tokens as indices into N, padded with its last
    pack_idx: torch.Tensor  # (N,) long: each token's slot in the flattened (B * K) padded view
    cu_seqlens: torch.Tensor  # (B + 1,) int32: cumulative kept counts

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.flat_idx, self.pad_idx, self.pack_idx, self.cu_seqlens


def counted_predictions(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The predictions a sparse step counts in its loss: kept positions whose next label is supervised.

    Bool ``[B, T]``. Its sum over the micro-batches of an optimizer step is the normaliser of
    gradient accumulation: ``(out.token_loss.sum() / n).backward()`` per micro-batch, with ``n`` the
    sum over all of them, equals one step on the whole batch.
    """
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the label of p + 1
    return keep & (target != IGNORE_INDEX)


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


def packed_layout(keep: torch.Tensor) -> PackedLayout:
    """Build the packed kept layout of a bool keep mask (B, T); every row must keep >= 1 position."""
    b, t = keep.shape
    counts = keep.sum(1)  # (B,)
    k = min(max(int(counts.max()), 2), t)  # K >= 2: never specialised by dynamo (as kept_layout)
    flat_idx = keep.flatten().nonzero().squeeze(1)  # (N,)
    ends = counts.cumsum(0)  # (B,)
    offsets = ends - counts  # (B,) first packed index of each sample
    slot = torch.arange(k, device=keep.device)  # (K,)
    pad_idx = offsets[:, None] + torch.minimum(slot[None, :], (counts - 1)[:, None])  # (B, K)
    sample = torch.repeat_interleave(torch.arange(b, device=keep.device), counts,
                                     output_size=flat_idx.numel())  # (N,) sample of each packed token
    pack_idx = sample * k + torch.arange(flat_idx.numel(), device=keep.device) - offsets[sample]  # (N,)
    cu_seqlens = F.pad(ends, (1, 0)).to(torch.int32)  # (B + 1,)
    return PackedLayout(flat_idx, pad_idx, pack_idx, cu_seqlens)


def _packed_loss(kept_logits, packed, labels, inputs, return_logits):
    """Logits / loss / token loss from the packed kept rows (N, V)."""
    flat_idx = packed[0]
    seq = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    b, t, v = seq.size(0), seq.size(1), kept_logits.size(-1)
    full_logits = None
    if return_logits:  # (B, T, V), zero where pruned
        full_logits = kept_logits.new_zeros(b * t, v).index_copy(0, flat_idx, kept_logits).view(b, t, v)
    loss = token_loss = None
    if labels is not None:
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()[flat_idx]  # (N,) label of p+1
        counted = target != IGNORE_INDEX
        ce = F.cross_entropy(kept_logits.float(), target.clamp(min=0), reduction="none")  # (N,)
        ce = torch.where(counted, ce, 0.0)
        loss = ce.sum() / counted.sum().clamp(min=1)
        token_loss = ce.new_zeros(b * t).index_copy(0, flat_idx, ce).view(b, t)  # (B, T)
    return full_logits, loss, token_loss


def _step(model: nn.Module, inputs: dict, use_cache_kw: dict, gather_idx, scatter_idx, valid, labels,
          return_logits: bool = True, packed: tuple | None = None):
    """The function dynamo captures: the model's forward, then logits/loss at kept positions."""
    logits = model(**inputs, **use_cache_kw).logits  # (B, T, V)
    if packed is not None:
        # kept_rows_packed marks the output for the pass (as kept_rows below) and brings the
        # packed layout into the graph.
        return _packed_loss(kept_rows_packed(logits, *packed), packed, labels, inputs, return_logits)  # (N, V)
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


class _PackedRefused(Exception):
    """This graph cannot run on the packed layout (the backend's PackedRefused, unwrapped)."""


class _NeedsOutputHooks(Exception):
    """The capture stopped where transformers installs its output hooks (``needs_output_hooks``)."""


_INSTANCES = itertools.count()


def _own_step_function() -> Callable:
    """A copy of `_step` with its own code object: dynamo caches (and counts recompiles) per code
    object, so each sparsified model gets its own cache instead of sharing one across models."""
    code = _step.__code__.replace(co_name=f"regate_step_{next(_INSTANCES)}")
    return types.FunctionType(code, _step.__globals__, code.co_name, _step.__defaults__, _step.__closure__)


_NESTED_COMPILE = (
    "regate_fx: a sparse step (a call with keep_mask) runs its own captured and rewritten graph, "
    "so code compiled around it graph-breaks at the call. Compile without fullgraph=True (Trainer's "
    "torch_compile=True already does), or call the sparsified model outside the compiled function")


class SparseForward:
    """The forward :func:`sparsify` installs on a model (``model.forward``).

    A call without ``keep_mask`` is the model's own forward, called directly: same outputs, same
    autograd graph, no capture. A call with ``keep_mask`` runs the captured, rewritten step, in
    which the decoder computes the kept positions only.

    Attributes:
        original: the forward the model had before :func:`sparsify` (a bound method).
        config: the :class:`SparsifyConfig`.
        backend: the torch.compile backend used after the pass.
        report: a :class:`~regate_fx.RewriteReport` of every graph captured so far (also
            ``model.regate_report``).
    """

    def __init__(self, original: Callable, config: SparsifyConfig, backend: str | Callable,
                 report: RewriteReport | None = None):
        self.original = original
        self.config = config
        self.backend = backend
        self.report = RewriteReport() if report is None else report
        params = inspect.signature(original).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._use_cache_kw = {"use_cache": False} if ("use_cache" in params or accepts_kwargs) else {}
        self._signature = _with_keep_mask(inspect.signature(original))
        self._roles = PlaceholderRoles()
        self._printed = False
        self._compiled_kinds: set[str] = set()  # "sparse" once the first sparse call compiled
        self._first_sizes: tuple | None = None  # sizes of the first sparse call (seq and layout)
        self._output_hooks = False  # transformers' output hooks installed by a capture that needed them
        model = getattr(original, "__self__", None)  # the module whose forward this replaces
        self._capture = Capture(model, config.capture, self._use_cache_kw)
        self._runs = SparseRuns()  # calls of a rewritten graph: each sparse call checks that one ran
        regate_backend = make_backend(resolve_backend(backend), self.report, self._roles,
                                      strict=config.strict, on_report=self._maybe_print,
                                      dynamic=config.dynamic, runs=self._runs)
        step = _own_step_function()
        self._step_code = step.__code__  # the key of this model's dynamo cache
        self._compiled = torch.compile(step, backend=regate_backend, fullgraph=config.fullgraph)
        functools.update_wrapper(self, original, assigned=("__module__", "__name__", "__qualname__", "__doc__"),
                                 updated=())

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own signature plus ``keep_mask`` (read by Trainer, ``generate``, PEFT)."""
        return self._signature

    def __deepcopy__(self, memo: dict) -> "SparseForward":
        # A copy of the model gets its own capture (its own dynamo cache, roles and backend), with
        # the copied report: `copy.deepcopy(model)` stays a sparsified model of its own.
        return SparseForward(copy.deepcopy(self.original, memo), self.config, self.backend,
                             copy.deepcopy(self.report, memo))

    def __reduce__(self):
        raise TypeError("a sparsified model cannot be pickled whole (its forward holds a compiled step): "
                        "save model.state_dict() or use model.save_pretrained(...), or call "
                        "regate_fx.unsparsify(model) first")

    def __call__(self, *args: Any, keep_mask: torch.Tensor | None = None, **inputs: Any) -> Any:
        """Run the model; with ``keep_mask`` (bool [B, T]) the decoder computes kept positions only.

        Args:
            *args: positional inputs of the model's own forward (dense calls only; a sparse call
                takes keyword arguments only).
            keep_mask: bool (B, T); True = position computed (visible as context in every layer,
                its prediction counted in the loss). None: the model's own forward, unchanged.
            **inputs: the model's keyword arguments (``input_ids`` or ``inputs_embeds``,
                ``attention_mask``, ``labels``, ``pixel_values``, ...).

        Returns:
            Without ``keep_mask``: whatever the model returns. With it: a :class:`ReGateOutput`.
        """
        if keep_mask is None:
            return self.original(*args, **inputs)
        return self._sparse(args, keep_mask, inputs)

    def _first_call_status(self, kind: str):
        """A rich spinner on stderr during the first (compiling) call of each kind."""
        if kind in self._compiled_kinds or not self.config.progress:
            return contextlib.nullcontext()
        self._compiled_kinds.add(kind)
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return contextlib.nullcontext()
        if kind == "symbolic":
            return console.status("regate_fx: new sizes: compiling the sparse graph once more, for every batch "
                                  "size, length and kept count (SparsifyConfig(dynamic=True) does it at the "
                                  "first call)")
        return console.status(f"regate_fx: capturing and compiling the {kind} graph (first {kind} call)")

    def _compile_kind(self, tensors: tuple[torch.Tensor, ...]) -> str:
        """'symbolic' for a call whose sizes differ from the first sparse call's, once that call
        compiled a graph for static sizes (``dynamic=None``): this call recompiles. Nothing to
        compute once that spinner was shown, or without spinners."""
        if not self.config.progress or "symbolic" in self._compiled_kinds:
            return "sparse"
        sizes = tuple(tuple(t.shape) for t in tensors)
        if self._first_sizes is None:
            self._first_sizes = sizes
        elif sizes != self._first_sizes and any(g.static_sizes for g in self.report.graphs):
            return "symbolic"
        return "sparse"

    def _maybe_print(self, _graph_report) -> None:
        if self.config.print_report and not self._printed:
            from rich.console import Console

            Console().print(self.report)
            self._printed = True

    def _wants_packed(self, keep: torch.Tensor) -> bool:
        """Whether this step runs on the packed layout (see ``SparsifyConfig.layout``)."""
        layout = self.config.layout
        if layout == "padded" or keep.size(0) < 2 or (layout == "auto" and self.report.packed_refused):
            return False
        if layout == "packed":
            return True
        counts = keep.sum(1)
        waste = 1.0 - float(counts.sum()) / (keep.size(0) * max(int(counts.max()), 2))  # of the (B, K) slots
        return waste >= self.config.packed_min_waste

    @contextlib.contextmanager
    def _sparse_graph_must_run(self):
        """Around the compiled step: raise a :class:`RewriteError` if the call returns without
        having run a rewritten graph (under DDP ``compat.capture_settings`` keeps the step one graph).

        Whatever wraps the model (DDP, FSDP, DeepSpeed, a user's ``torch.compile``, Accelerate),
        a call with ``keep_mask`` either runs the rewritten computation or raises: it never
        computes every token dense in silence. The backend counts the calls of the graphs it
        rewrote (``passes.backend.SparseRuns``, one Python increment per step); an unchanged
        count after a call that returned means dynamo ran something else: pieces of a split
        graph, or the step's Python code eagerly. The compiled graphs of the step are then
        discarded, so a later call (outside whatever caused it) captures afresh.
        """
        before, graphs = self._runs.count, len(self.report.graphs)
        yield
        if self._runs.count != before:
            return
        torch._dynamo.eval_frame.reset_code(self._step_code)
        new = self.report.graphs[graphs:]
        if new:
            what = (f"dynamo handed the ReGATE backend {len(new)} graph(s) without the kept layout among their "
                    f"inputs ({', '.join(g.name for g in new)}: pieces of a graph split before the backend "
                    f"saw it), which ran unchanged")
        else:
            what = ("no rewritten graph ran: dynamo ran the step's Python code itself (e.g. under "
                    "torch.compiler.set_stance('force_eager'), torch._dynamo.config.disable, or past dynamo's "
                    "recompile limit), or a cached graph that is not the rewritten one")
        raise RewriteError(
            f"regate_fx: a call with keep_mask ran without its sparse graph, so it computed every token "
            f"dense; its result is discarded. {what[0].upper()}{what[1:]}. Call the sparsified model "
            f"outside what changed how dynamo compiles or runs it (a wrapper's compile hook, a compiler "
            f"stance, a dynamo config), or without keep_mask for a dense step. The step's compiled graphs "
            f"were dropped: the next call captures it again.", report=self.report)

    def _run(self, target, inputs: dict, seq: torch.Tensor, keep_mask: torch.Tensor, labels, packed: bool):
        """One call of the compiled step on the padded or the packed kept layout."""
        if packed:
            layout = packed_layout(keep_mask)
            args = (None, None, None)
            dims = {layout.flat_idx: (0,), layout.pad_idx: (0, 1), layout.pack_idx: (0,), layout.cu_seqlens: (0,)}
            roles = dict(zip(("flat_idx", "pad_idx", "pack_idx", "cu_seqlens"), layout.tensors()))
        else:
            layout = kept_layout(keep_mask)
            args = (layout.gather_idx, layout.scatter_idx, layout.valid)
            dims = {t: (0, 1) for t in args}
            roles = dict(zip(("gather_idx", "scatter_idx", "valid"), args))
        for t, ds in dims.items():
            for d in ds:
                torch._dynamo.maybe_mark_dynamic(t, d)
        am = inputs.get("attention_mask")
        self._roles.set(seq=seq, attention_mask=am if isinstance(am, torch.Tensor) and am.dim() == 2 else None,
                        **roles)
        try:
            with capture_settings(), _gc_frozen(), self._first_call_status(
                    self._compile_kind((seq, *roles.values()))), \
                    _without_input_require_grads(getattr(self.original, "__self__", None)), \
                    self._sparse_graph_must_run():
                return self._compiled(target, inputs, self._use_cache_kw, *args, labels,
                                      self.config.wants_logits(labels is not None),
                                      layout.tensors() if packed else None)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e.__cause__
            if isinstance(inner, PackedRefused):
                raise _PackedRefused(str(inner)) from None
            if isinstance(inner, (KeepMaskError, RewriteError)):
                raise inner.with_traceback(None) from None
            raise capture_error(e, self._capture.model, self._capture.mode) from e
        except (KeepMaskError, RewriteError):
            raise
        except Exception as e:  # a capture dynamo could not complete: name the module, say what to do
            if not self._output_hooks and needs_output_hooks(e):
                raise _NeedsOutputHooks() from e
            err = capture_error(e, self._capture.model, self._capture.mode)
            if err is None:
                raise
            raise err from e
        finally:
            self._roles.set()

    @torch._dynamo.disable(reason=_NESTED_COMPILE)
    def _sparse(self, args: tuple, keep_mask: torch.Tensor, inputs: dict) -> ReGateOutput:
        if args:
            raise TypeError(f"a sparse step takes keyword arguments only (input_ids=..., "
                            f"attention_mask=..., labels=..., keep_mask=...), got {len(args)} positional")
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        seq = inputs.get("input_ids")
        if seq is None:
            seq = inputs.get("inputs_embeds")
        if seq is None:
            raise ValueError("regate_fx: pass input_ids or inputs_embeds to the sparsified model")
        model = getattr(self.original, "__self__", None)
        if self.config.validate:
            check_keep_mask(keep_mask, seq, inputs.get("attention_mask"))
        _check_no_inner_fsdp(model)
        if inputs.get("attention_mask") is None and inputs.get("position_ids") is None \
                and model is not None and _accepts(model, "attention_mask"):
            # No padding and default positions: the same call as an all-ones padding mask. Without
            # one, transformers builds its causal mask from position ids plus a packed-sequence
            # term the pass cannot prove causal, and attention would run on a gathered (B, 1, K, K)
            # mask; with one the pass proves it and the kept tokens use SDPA's causal fast path.
            inputs["attention_mask"] = torch.ones(seq.shape[:2], dtype=torch.long, device=seq.device)
        # The whole model, or its decoder + head on eagerly computed inputs (regate_fx/capture.py).
        target, inputs, seq = self._capture.prepare(inputs, seq)
        if target is model:
            target = self.original  # the model's own forward, not this one (no recursion)
        # Batch and token axes symbolic from the first capture, so new shapes do not recompile.
        mark_token_axes([inputs, labels], seq.shape[0], seq.shape[1])
        packed = self._wants_packed(keep_mask)
        try:
            try:
                logits, loss, token_loss = self._run(target, inputs, seq, keep_mask, labels, packed)
            except _NeedsOutputHooks:  # the forward asks for hidden states / attentions: hooks, then again
                install_output_hooks(model if model is not None else self._capture.model)
                self._output_hooks = True
                logits, loss, token_loss = self._run(target, inputs, seq, keep_mask, labels, packed)
        except _PackedRefused as e:
            self.report.packed_refused = str(e)
            if self.config.layout == "packed":
                raise RewriteError(f"regate_fx: SparsifyConfig(layout='packed') cannot be used with this model: "
                                   f"{e}. Use layout='padded' (or 'auto', which falls back to it).",
                                   report=self.report) from None
            logits, loss, token_loss = self._run(target, inputs, seq, keep_mask, labels, False)
        return ReGateOutput(loss=loss, logits=logits, token_loss=token_loss, keep_mask=keep_mask)


@contextlib.contextmanager
def _gc_frozen():
    """Keep the garbage collector's full collections off the objects that exist before the call.

    A compiling call (capture, pass, inner compile) allocates enough to trigger many full
    collections, and each one walks the whole heap, model and libraries included (0.1-0.2 s each
    for a 24-layer model on the CPU: 0.7 s of a warm-cache first step). ``gc.freeze()`` sets the
    objects that exist now aside for the call's length; new garbage is still collected. Costs
    nothing measurable on a call that does not compile. Left alone when the caller has frozen
    objects or disabled the collector itself.
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@functools.lru_cache(maxsize=None)
def _forward_accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's forward names the keyword argument `name` (not merely **kwargs)."""
    return _forward_accepts(type(model), name)


_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def _without_input_require_grads(model: nn.Module | None):
    """Lift transformers' ``enable_input_require_grads()`` hooks for the sparse call.

    The hook calls ``requires_grad_()`` on the input embeddings' output so that *reentrant*
    checkpointing of frozen-embedding models (PEFT, TRL with gradient checkpointing) has an input
    that requires grad. Dynamo cannot capture it, and a sparse step does not need it: checkpointed
    layers are inlined and recomputed by AOTAutograd (``passes/checkpoint.py``), whose backward
    reaches every trainable weight regardless.
    """
    lifted = []
    for m in model.modules() if model is not None else ():
        for key, fn in list(m._forward_hooks.items()):
            # transformers' enable_input_require_grads and PEFT's fallback; possibly registered twice
            if getattr(fn, "__name__", "") in _REQUIRE_GRADS_HOOKS:
                lifted.append((m._forward_hooks, key, m._forward_hooks.pop(key)))
    try:
        yield
    finally:
        for hooks, key, fn in lifted:
            hooks[key] = fn


def _check_no_inner_fsdp(model: nn.Module | None) -> None:
    """Refuse FSDP2 below the sparsified module: its per-module hooks (all-gather before, reduce-scatter
    after) run outside any graph, so the decoder could not be captured as one."""
    if model is None:
        return
    if any(hasattr(p, "ds_status") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitions weights
        raise RewriteError(
            "regate_fx: this model's parameters are partitioned by DeepSpeed ZeRO stage 3, whose per-module "
            "hooks gather each weight just before its module runs; they cannot run inside the one graph a sparse "
            "step captures. Use ZeRO stage 1 or 2 (optimizer state and gradients partitioned, tested exact), or "
            "FSDP2 on the whole model (fully_shard(model))")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    inner = [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]
    if inner:
        raise RewriteError(
            f"regate_fx: {len(inner)} submodules of the sparsified model are sharded with fully_shard (e.g. "
            f"{inner[0]!r}); FSDP2's per-module hooks cannot run inside the one graph a sparse step captures. "
            f"Shard the model as a whole (fully_shard(model) only; with Trainer/Accelerate: "
            f"fsdp_config={{'auto_wrap_policy': 'NO_WRAP'}}): parameters, gradients and optimizer state stay "
            f"sharded between steps, the step itself gathers them once")


def _with_keep_mask(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` plus a keyword-only ``keep_mask=None`` (before any ``**kwargs``)."""
    params = [p for p in sig.parameters.values() if p.name != "keep_mask"]
    keep = inspect.Parameter("keep_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], keep, *params[at:]])




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


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a wrapper calls: DDP / DataParallel (``.module``), torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def sparse_forward(model: nn.Module) -> SparseForward | None:
    """The :class:`SparseForward` that :func:`sparsify` installed on ``model`` (or a wrapper of it),
    None if the model is not sparsified."""
    return _unwrap(model).__dict__.get("_regate_forward")


def is_sparsified(model: nn.Module) -> bool:
    """Whether :func:`sparsify` was applied to ``model`` (or to the module a wrapper calls)."""
    return sparse_forward(model) is not None


def sparsify(model: nn.Module, config: SparsifyConfig | None = None, *,
             backend: str | Callable = "inductor") -> nn.Module:
    """Make a Hugging Face causal LM (or LLaVA-style MLLM) ReGATE-sparse, in place.

    ``model.forward`` gains a ``keep_mask`` argument and nothing else changes: the model keeps its
    class, config, parameters, ``state_dict`` keys, ``save_pretrained``, ``generate`` and
    gradient-checkpointing switches, and a call without ``keep_mask`` is its own forward, run
    directly. A call with ``keep_mask`` is captured with dynamo on first use; a graph pass finds
    the residual stream and its attention / MLP / parallel branches from the graph's structure and
    rewrites them to run on the kept tokens only (gather -> compute -> scatter); the result is
    compiled with ``backend``.

    Args:
        model: the model (or a DDP / torch.compile wrapper of it; the module it wraps is changed).
            Sparsifying it again replaces the configuration.
        config: :class:`SparsifyConfig`; defaults to strict refusal of unrewritable branches.
        backend: the torch.compile backend used after the pass: ``"eager"``, ``"aot_eager"``,
            ``"inductor"`` or a callable backend.

    Returns:
        ``model`` itself. Call it with the model's keyword arguments plus ``keep_mask``; read
        ``model.regate_report`` for what was rewritten. :func:`unsparsify` undoes it.

    Raises:
        UnsupportedEnvironment: torch or transformers outside the tested range, or a torch build
            without torch.compile (:func:`regate_fx.compat.check_environment`).

    Example:
        >>> model = regate_fx.sparsify(model, backend="eager")
        >>> out = model(input_ids=ids, attention_mask=am, labels=labels, keep_mask=keep)
        >>> out.loss.backward()
        >>> print(model.regate_report)
    """
    check_environment()
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = SparsifyConfig()
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    if not (callable(backend) or backend in ("eager", "aot_eager", "inductor")
            or backend in torch._dynamo.list_backends()):
        raise ValueError(f"unknown backend {backend!r}; use 'eager', 'aot_eager', 'inductor' or a callable")
    target = _unwrap(model)
    fwd = sparse_forward(target)
    if fwd is not None:  # again: a new configuration, a fresh capture; wrappers of fwd see it too
        fwd.__init__(fwd.original, config, backend)
    else:
        fwd = SparseForward(target.forward, config, backend)
        target.__dict__["forward"] = fwd
    # Plain attributes (not submodules): state_dict, named_modules and parameters are unchanged.
    target.__dict__["_regate_forward"] = fwd
    target.__dict__["regate_report"] = fwd.report
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify`: the model's forward is the one it had before. Returns ``model``.

    Raises:
        RuntimeError: something replaced ``model.forward`` after :func:`sparsify` (e.g. a trainer's
            patch); restore that first.
    """
    target = _unwrap(model)
    fwd = sparse_forward(target)
    if fwd is None:
        return model
    if target.__dict__.get("forward") is not fwd:
        raise RuntimeError("model.forward was replaced after regate_fx.sparsify (by "
                           f"{getattr(target.forward, '__qualname__', target.forward)!r}); undo that first")
    original = fwd.original
    bound_class_forward = getattr(original, "__func__", None) is getattr(type(target), "forward", None) \
        and getattr(original, "__self__", None) is target
    for key in ("_regate_forward", "regate_report", "forward"):
        target.__dict__.pop(key, None)
    if not bound_class_forward:  # the model had its own instance forward (e.g. accelerate's autocast)
        target.__dict__["forward"] = original
    return model
