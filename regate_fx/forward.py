"""`SparseForward`, the forward `sparsify` installs, and `ReGateOutput`, what a sparse call returns.

A sparse call: check the keep mask, prepare the capture's inputs, pick the layout, run the
compiled step (`step.py`) under the capture settings, and check that its rewritten graph ran.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from regate_fx.capture import Capture, capture_error, mark_token_axes
from regate_fx.compat import capture_settings, install_output_hooks, needs_output_hooks
from regate_fx.config import SparsifyConfig
from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.gathered import GatheredStep
from regate_fx.layouts import Layout, LayoutRefused, choose_layout
from regate_fx.passes.backend import PlaceholderRoles, SparseRuns, make_backend, resolve_backend
from regate_fx.report import RewriteReport
from regate_fx.stacks import (
    accepts,
    check_no_inner_fsdp,
    gc_frozen,
    per_module_sharding,
    with_keep_mask,
    without_input_require_grads,
)
from regate_fx.step import no_token_loss, own_step_function, step_sources

__all__ = ["ReGateOutput", "SparseForward", "check_keep_mask"]


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
        aux_loss: the router's auxiliary (load-balancing) loss of an MoE model asked for it
            (``output_router_logits=True``), over the kept tokens of the batch: what the dense model
            computes on the batch of kept subsequences, padded, with an attention mask marking them.
            ``loss`` then includes the model's own ``router_aux_loss_coef * aux_loss``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _NeedsOutputHooks(Exception):
    """The capture stopped where transformers installs its output hooks (``needs_output_hooks``)."""


_NESTED_COMPILE = (
    "regate_fx: a sparse step (a call with keep_mask) runs its own captured and rewritten graph, "
    "so code compiled around it graph-breaks at the call. Compile without fullgraph=True (Trainer's "
    "torch_compile=True already does), or call the sparsified model outside the compiled function"
)


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

    def __init__(
        self, original: Callable, config: SparsifyConfig, backend: str | Callable, report: RewriteReport | None = None
    ):
        self.original = original
        self.config = config
        self.backend = backend
        self.report = RewriteReport() if report is None else report
        params = inspect.signature(original).parameters
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._use_cache_kw = {"use_cache": False} if ("use_cache" in params or accepts_kwargs) else {}
        self._signature = with_keep_mask(inspect.signature(original))
        self._roles = PlaceholderRoles()
        self._printed = False
        self._compiled_kinds: set[str] = set()  # "sparse" once the first sparse call compiled
        self._first_sizes: tuple | None = None  # sizes of the first sparse call (seq and layout)
        self._output_hooks = False  # transformers' output hooks installed by a capture that needed them
        # the module whose forward this replaces (sparsify() passes a module's bound forward)
        model = getattr(original, "__self__", None)
        self._capture = Capture(cast(nn.Module, model), config.capture, self._use_cache_kw)
        self.gathered = GatheredStep(model, original, config.capture, self._use_cache_kw)  # execution="gathered"
        self._runs = SparseRuns()  # calls of a rewritten graph: each sparse call checks that one ran
        regate_backend = make_backend(
            resolve_backend(backend),
            self.report,
            self._roles,
            strict=config.strict,
            on_report=self._maybe_print,
            dynamic=config.dynamic,
            runs=self._runs,
        )
        step = own_step_function()
        self._step_code = step.__code__  # the key of this model's dynamo cache
        self._compiled = torch.compile(step, backend=regate_backend, fullgraph=config.fullgraph)
        functools.update_wrapper(
            self, original, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=()
        )

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own signature plus ``keep_mask`` (read by Trainer, ``generate``, PEFT)."""
        return self._signature

    def __deepcopy__(self, memo: dict) -> "SparseForward":
        # A copy of the model gets its own capture (its own dynamo cache, roles and backend), with
        # the copied report: `copy.deepcopy(model)` stays a sparsified model of its own.
        return SparseForward(
            copy.deepcopy(self.original, memo), self.config, self.backend, copy.deepcopy(self.report, memo)
        )

    def __reduce__(self):
        raise TypeError(
            "a sparsified model cannot be pickled whole (its forward holds a compiled step): "
            "save model.state_dict() or use model.save_pretrained(...), or call "
            "regate_fx.unsparsify(model) first"
        )

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
            return console.status(
                "regate_fx: new sizes: compiling the sparse graph once more, for every batch "
                "size, length and kept count (SparsifyConfig(dynamic=True) does it at the "
                "first call)"
            )
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

    def _layout(self, keep: torch.Tensor) -> Layout:
        """The kept layout this step runs on (see ``SparsifyConfig.layout``)."""
        return choose_layout(self.config.layout, keep, self.config.packed_min_waste, self.report)

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
            what = (
                f"dynamo handed the ReGATE backend {len(new)} graph(s) without the kept layout among their "
                f"inputs ({', '.join(g.name for g in new)}: pieces of a graph split before the backend "
                f"saw it), which ran unchanged"
            )
        else:
            what = (
                "no rewritten graph ran: dynamo ran the step's Python code itself (e.g. under "
                "torch.compiler.set_stance('force_eager'), torch._dynamo.config.disable, or past dynamo's "
                "recompile limit), or a cached graph that is not the rewritten one"
            )
        raise RewriteError(
            f"regate_fx: a call with keep_mask ran without its sparse graph, so it computed every token "
            f"dense; its result is discarded. {what[0].upper()}{what[1:]}. Call the sparsified model "
            f"outside what changed how dynamo compiles or runs it (a wrapper's compile hook, a compiler "
            f"stance, a dynamo config), or without keep_mask for a dense step. The step's compiled graphs "
            f"were dropped: the next call captures it again.",
            report=self.report,
        )

    def _run(self, target, inputs: dict, seq: torch.Tensor, keep_mask: torch.Tensor, labels, layout: Layout):
        """One call of the compiled step on the kept `layout`: (logits, loss, token_loss, aux_loss)."""
        logits, loss, token_loss, aux, aux_term = self._call_step(target, inputs, seq, keep_mask, labels, layout)
        if aux_term is not None and loss is not None:
            loss = loss + aux_term  # the model's own `coef * aux_loss`, as its forward adds it
        return logits, loss, token_loss, aux

    def _call_step(self, target, inputs: dict, seq: torch.Tensor, keep_mask: torch.Tensor, labels, layout: Layout):
        tensors = layout.build(keep_mask)
        for t, ds in zip(tensors, layout.dynamic_dims):
            for d in ds:
                torch._dynamo.maybe_mark_dynamic(t, d)
        roles = dict(zip(layout.roles, tensors))
        am = inputs.get("attention_mask")
        self._roles.set(
            step_sources(
                layout.roles,
                seq=next((k for k in ("input_ids", "inputs_embeds") if inputs.get(k) is seq), None),
                attention_mask="attention_mask" if isinstance(am, torch.Tensor) and am.dim() == 2 else None,
            )
        )
        try:
            with (
                capture_settings(),
                gc_frozen(),
                self._first_call_status(self._compile_kind((seq, *roles.values()))),
                without_input_require_grads(getattr(self.original, "__self__", None)),
                self._sparse_graph_must_run(),
            ):
                aux = wants_router_aux(self.original, inputs)
                with aux_term_only(getattr(self.original, "__self__", None) if aux and labels is not None else None):
                    return self._compiled(
                        target,
                        inputs,
                        self._use_cache_kw,
                        layout,
                        tensors,
                        labels,
                        self.config.wants_logits(labels is not None),
                        aux,
                    )
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e.__cause__
            if isinstance(inner, (LayoutRefused, KeepMaskError, RewriteError)):  # refused: the layout's, or the pass's
                raise inner.with_traceback(None) from None
            err = capture_error(e, self._capture.model, self._capture.mode)
            assert err is not None  # BackendCompilerFailed is one of the failures it names
            raise err from e
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
            self._roles.set({})

    def execution(self, model) -> str:
        """The execution of a sparse step of `model`: ``"rewrite"`` or ``"gathered"``
        (``SparsifyConfig.execution``; ``"auto"`` decides by the model's sharding now)."""
        if self.config.execution == "auto":
            return "gathered" if per_module_sharding(model) is not None else "rewrite"
        return self.config.execution

    @torch._dynamo.disable(reason=_NESTED_COMPILE)
    def _sparse(self, args: tuple, keep_mask: torch.Tensor, inputs: dict) -> ReGateOutput:
        if args:
            raise TypeError(
                f"a sparse step takes keyword arguments only (input_ids=..., "
                f"attention_mask=..., labels=..., keep_mask=...), got {len(args)} positional"
            )
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
        if (
            inputs.get("attention_mask") is None
            and inputs.get("position_ids") is None
            and model is not None
            and accepts(model, "attention_mask")
        ):
            # No padding and default positions: the same call as an all-ones padding mask. Without
            # one, transformers builds its causal mask from position ids plus a packed-sequence
            # term the pass cannot prove causal, and attention would run on a gathered (B, 1, K, K)
            # mask; with one the pass proves it and the kept tokens use SDPA's causal fast path.
            inputs["attention_mask"] = torch.ones(seq.shape[:2], dtype=torch.long, device=seq.device)
        if wants_router_aux(self.original, inputs) and (
            self.execution(model) == "gathered" or self._capture.mode != "model"
        ):
            raise RewriteError(
                "regate_fx: output_router_logits=True: the router's auxiliary loss is computed by the model's "
                "forward around its decoder, which only the whole-model capture with execution='rewrite' runs "
                "on the kept tokens (this step: "
                f"capture={self._capture.mode!r}, execution={self.execution(model)!r}); pass "
                "output_router_logits=False, or SparsifyConfig(capture='model', execution='rewrite')",
                report=self.report,
            )
        if self.execution(model) == "gathered":  # the model's own modules on the kept tokens (gathered.py)
            logits, loss, token_loss = self.gathered(
                inputs, seq, keep_mask, labels, self.config.wants_logits(labels is not None)
            )
            return ReGateOutput(loss=loss, logits=logits, token_loss=token_loss, keep_mask=keep_mask)
        check_no_inner_fsdp(model)
        # The whole model, or its decoder + head on eagerly computed inputs (regate_fx/capture.py).
        prepared, inputs, seq = self._capture.prepare(inputs, seq)
        # the model's own forward, not this one (no recursion)
        target: Callable[..., Any] = self.original if prepared is model else prepared
        # Batch and token axes symbolic from the first capture, so new shapes do not recompile.
        mark_token_axes([inputs, labels], seq.shape[0], seq.shape[1])
        layout = self._layout(keep_mask)
        try:
            try:
                logits, loss, token_loss, aux = self._run(target, inputs, seq, keep_mask, labels, layout)
            except _NeedsOutputHooks:  # the forward asks for hidden states / attentions: hooks, then again
                install_output_hooks(model if model is not None else self._capture.model)
                self._output_hooks = True
                logits, loss, token_loss, aux = self._run(target, inputs, seq, keep_mask, labels, layout)
        except LayoutRefused as e:  # this graph cannot run on it: the layout's fallback, or why not
            e.layout.note_refusal(self.report, e.why)
            fallback = e.layout.fallback
            if self.config.layout == e.layout.name or fallback is None:
                raise RewriteError(
                    f"regate_fx: SparsifyConfig(layout={e.layout.name!r}) cannot be used with this "
                    f"model: {e.why}. Use layout={getattr(fallback, 'name', 'auto')!r} (or 'auto', "
                    f"which falls back to it).",
                    report=self.report,
                ) from None
            logits, loss, token_loss, aux = self._run(target, inputs, seq, keep_mask, labels, fallback)
        return ReGateOutput(loss=loss, logits=logits, token_loss=token_loss, keep_mask=keep_mask, aux_loss=aux)


def wants_router_aux(original: Callable, inputs: dict) -> bool:
    """Whether the model's forward will compute its router auxiliary loss: it takes
    ``output_router_logits`` (transformers' MoE models) and the call or its config turns it on."""
    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError):
        return False
    if "output_router_logits" not in params:
        return False
    flag = inputs.get("output_router_logits")
    if flag is None:
        flag = getattr(getattr(getattr(original, "__self__", None), "config", None), "output_router_logits", False)
    return bool(flag)


@contextlib.contextmanager
def aux_term_only(model: Any):
    """Around a step that passes the labels to `model` (``_step``'s ``aux_term``): the model's loss
    function is `step.no_token_loss`, so its ``loss`` is its auxiliary term alone. Restored after."""
    if model is None or not isinstance(model, nn.Module):
        yield
        return
    own = vars(model)  # transformers' `loss_function` property reads `_loss_function` first
    had, old = "_loss_function" in own, own.get("_loss_function")
    own["_loss_function"] = no_token_loss
    try:
        yield
    finally:
        if had:
            own["_loss_function"] = old
        else:
            del own["_loss_function"]


def check_keep_mask(keep: torch.Tensor, seq: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Raise :class:`KeepMaskError` (a ValueError) if `keep` cannot drive a sparse step."""
    if not isinstance(keep, torch.Tensor):
        raise KeepMaskError(f"keep_mask must be a torch.Tensor of dtype bool, got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        raise KeepMaskError(f"keep_mask must have dtype torch.bool, got {keep.dtype}; convert it with keep_mask.bool()")
    if tuple(keep.shape) != tuple(seq.shape[:2]):
        raise KeepMaskError(
            f"keep_mask has shape {tuple(keep.shape)} but the batch is "
            f"{tuple(seq.shape[:2])} (batch, tokens); it needs one entry per token"
        )
    if keep.device != seq.device:
        raise KeepMaskError(
            f"keep_mask is on {keep.device} but the inputs are on {seq.device}; "
            f"move it with keep_mask.to({str(seq.device)!r})"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(keep.shape):
            raise KeepMaskError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but keep_mask has "
                f"{tuple(keep.shape)}; pass the 2-D (batch, tokens) padding mask"
            )
        kept_pad = keep & (attention_mask == 0)
        if bool(kept_pad.any()):
            b, p = (int(x) for x in kept_pad.nonzero()[0])
            raise KeepMaskError(
                f"keep_mask keeps padding: sample {b}, position {p} has attention_mask 0; "
                "clear it with keep_mask & attention_mask.bool()"
            )
    empty = ~keep.any(1)
    if bool(empty.any()):
        raise KeepMaskError(
            f"keep_mask keeps no position in sample(s) {empty.nonzero().flatten().tolist()}; "
            "every sample needs at least one kept position"
        )
