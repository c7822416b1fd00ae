"""`GatheredStep`: the gathered execution of a sparse step (``SparsifyConfig(execution="gathered")``).

Instead of rewriting one captured graph of the whole model, the step proves once
(``passes/proof.py``, on a meta-device copy of the model) that the decoder's only token mixing is
attention driven by position ids and a causal padding mask, then runs the model's own, unmodified
forward with its decoder called on the kept tokens:

    model(**inputs)                                 # eagerly: the user's model, all its hooks
      front end (embeddings, vision tower, merge)   # full length, as the model computes it
      decoder pre-hook (this module):               # the only intervention
        inputs_embeds / input_ids (B, T, ...) -> (B, K, ...)   kept rows, padded layout
        position_ids (B, T) / (n, B, T) -> (B, K) / (n, B, K)  original positions (M-RoPE too)
        attention_mask -> (B, K)                    the kept layout's padding mask
      decoder layers, final norm, LM head           # on (B, K): FSDP2 / ZeRO-3 hooks, checkpointing
    logits (B, K, V) -> loss, token_loss (B, T), logits (B, T, V) when asked

The model is called without ``labels``; the loss is computed here on the kept rows, as the
oracle defines it. Module hooks (FSDP2's per-layer all-gather / reshard / reduce-scatter,
ZeRO-3's fetch / release, activation checkpointing, hub kernels) run exactly as in a dense step,
on the same parameters in the same order; only the activations shrink.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from regate_fx.capture import _DECODER_MASK, Capture, mark_token_axes, token_axes
from regate_fx.compat import capture_settings
from regate_fx.errors import RewriteError
from regate_fx.gathering import gather_decoder_kwargs, kept_outputs
from regate_fx.layouts.padded import PADDED, kept_layout
from regate_fx.passes.proof import Proof, ProofDone, ProofFailure, meta_copy, proof_backend
from regate_fx.stacks import gc_frozen
from regate_fx.step import own_step_function, step_sources

__all__ = ["GatheredStep"]

_KNOWN = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position")


class GatheredStep:
    """Runs sparse steps of one model by the gathered execution (see the module doc).

    Args:
        model: the model whose forward :func:`sparsify` replaced (possibly sharded).
        original: its own forward (a bound method).
        capture: ``"auto"``, ``"model"`` or ``"decoder"``: what the proof captures.
        use_cache_kw: ``{"use_cache": False}`` when the forward takes it.

    Attributes:
        proofs: the proofs taken so far, by call signature.
        calls: sparse steps run (each checked to have run its decoder on the kept tokens).
    """

    def __init__(self, model: Any, original: Any, capture: str, use_cache_kw: dict):
        self.model = model
        self.original = original
        self.use_cache_kw = use_cache_kw
        self.capture = Capture(model, capture, use_cache_kw)
        self.proofs: dict[tuple, Proof] = {}
        self.calls = 0
        self._head_checked = False

    # --- the proof ------------------------------------------------------------------------

    def _prove(self, key: tuple, target_kind: str, kwargs: dict, seq: torch.Tensor, keep: torch.Tensor) -> None:
        """Prove (once per signature) on a meta copy; raise a RewriteError naming every failure."""
        proof = self.proofs.get(key)
        if proof is None:
            proof = self._capture_proof(target_kind, kwargs, seq, keep)
            self.proofs[key] = proof
        if not proof.ok:
            raise RewriteError(
                "regate_fx: SparsifyConfig(execution='gathered') cannot be proven exact for this model: "
                "running it unchanged on the kept tokens needs its only token mixing to be attention "
                "driven by position ids and a causal padding mask, and the analysis found:\n"
                + "\n".join(f"  - {f}" for f in proof.failures)
                + "\nUse execution='rewrite' (a single-graph rewrite: no per-layer FSDP2 / ZeRO-3), or call "
                "the model without keep_mask (dense)."
            )

    def _capture_proof(self, target_kind: str, kwargs: dict, seq: torch.Tensor, keep: torch.Tensor) -> Proof:
        from regate_fx.passes.backend import PlaceholderRoles

        meta_model = meta_copy(self.model)
        meta_capture = Capture(meta_model, "model", self.use_cache_kw)
        if target_kind == "decoder":
            meta_capture.mode = "decoder"
            target: Any = meta_capture.wrapper  # decoder + LM head of the copy
        else:
            target = meta_model
        meta_kwargs = _to_meta(kwargs)
        if seq.shape[0] == 1:  # dynamo specialises a batch of 1: prove on a batch of 2 (the proof is structural)
            meta_kwargs = {k: _batch_of_two(v, seq.shape[1]) for k, v in meta_kwargs.items()}
            keep, seq = keep.expand(2, -1), seq.expand(2, *seq.shape[1:])
        b, t = seq.shape[:2]
        tensors = tuple(x.to("meta") for x in kept_layout(keep).tensors())  # (B, K) each
        for x, dims in zip(tensors, PADDED.dynamic_dims):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(x, d)
        mark_token_axes([meta_kwargs], b, t)
        am = meta_kwargs.get("attention_mask")
        roles = PlaceholderRoles(
            step_sources(
                PADDED.roles,
                seq="inputs_embeds" if _is_tensor(meta_kwargs.get("inputs_embeds")) else "input_ids",  # (B, T[, D])
                attention_mask="attention_mask" if _is_tensor(am) and am.dim() == 2 else None,
                position_ids="position_ids" if _is_tensor(meta_kwargs.get("position_ids")) else None,
            )
        )
        fn = own_step_function()
        step = torch.compile(fn, backend=proof_backend(roles, PADDED.roles), fullgraph=True)
        try:
            # no labels, logits returned: the step's output is the (B, T, V) scatter of the kept rows
            with capture_settings(), gc_frozen(), _plain_functional_linear():
                step(target, meta_kwargs, self.use_cache_kw, PADDED, tensors, None, True)
        except ProofDone as e:
            return e.proof
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None) or e.__cause__
            if isinstance(inner, ProofDone):
                return inner.proof
            raise
        except Exception as e:  # a capture dynamo cannot complete: no proof
            return Proof([ProofFailure("capture", type(self.model).__name__, f"{type(e).__name__}: {str(e)[:500]}")])
        finally:
            torch._dynamo.eval_frame.reset_code(fn.__code__)
        return Proof([ProofFailure("capture", type(self.model).__name__, "the proof backend was never called")])

    # --- the step -------------------------------------------------------------------------

    def __call__(
        self, inputs: dict, seq: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor | None, return_logits: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V) or None, loss, token_loss (B, T)) of one sparse step."""
        b, t = seq.shape[:2]
        inputs = dict(inputs)
        for k, v in inputs.items():
            if _is_tensor(v) and v.dim() == 4 and k == "attention_mask":
                raise RewriteError(
                    "regate_fx: execution='gathered' takes a 2-D (batch, tokens) attention_mask; a 4-D mask "
                    "cannot be rebuilt for the kept tokens. Use execution='rewrite'."
                )
        kl = kept_layout(keep)
        gather_idx, scatter_idx, valid = kl.tensors()  # (B, K) each
        mode = self.capture.mode
        if mode == "model":
            if inputs.get("position_ids") is None and _takes(self.original, "position_ids"):
                # the oracle's positions: each token's index in its row
                inputs["position_ids"] = torch.arange(t, device=seq.device).expand(b, t)  # (B, T)
            self._prove(_signature(inputs), "model", inputs, seq, keep)
        decoder = self.capture.wrapper._get(self.capture.wrapper._decoder_path)
        sig = inspect.signature(decoder.forward)
        ran: list[int] = []

        def gather(_module, args, kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            full: dict[str, Any] = {}
            for name, value in bound.items():
                if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    full.update(value)
                else:
                    full[name] = value
            seq_name = "inputs_embeds" if _is_tensor(full.get("inputs_embeds")) else "input_ids"
            dec_seq = full.get(seq_name)
            if not isinstance(dec_seq, torch.Tensor) or tuple(dec_seq.shape[:2]) != (b, t):
                got = tuple(dec_seq.shape) if isinstance(dec_seq, torch.Tensor) else None
                raise RewriteError(
                    f"regate_fx: the decoder is called with {got} "
                    f"but the batch is {(b, t)} (batch, tokens): keep_mask cannot be mapped onto its tokens"
                )
            if full.get("position_ids") is None:
                full["position_ids"] = torch.arange(t, device=dec_seq.device).expand(b, t)  # (B, T)
            am = full.get("attention_mask")
            if am is None:
                full["attention_mask"] = torch.ones(b, t, dtype=torch.long, device=dec_seq.device)  # (B, T)
            elif not (_is_tensor(am) and tuple(am.shape) == (b, t)):
                raise RewriteError(
                    f"regate_fx: execution='gathered': the decoder receives an attention mask of "
                    f"{type(am).__name__ if not _is_tensor(am) else tuple(am.shape)}, not the (batch, tokens) "
                    "padding mask it can be rebuilt from for the kept tokens. Use execution='rewrite'."
                )
            other = [k for k, v in full.items() if k not in _KNOWN and _is_tensor(v) and token_axes(v, b, t)[1]]
            if other:
                raise RewriteError(
                    f"regate_fx: execution='gathered': the decoder receives token-indexed input(s) {other} that "
                    "the gathered execution does not know how to bring to the kept tokens. Use execution='rewrite'."
                )
            if mode == "decoder":
                dec_kwargs = {k: v for k, v in full.items() if k != "use_cache"}
                self._prove(_signature(dec_kwargs), "decoder", dec_kwargs, dec_seq, keep)
            new = gather_decoder_kwargs(full, seq_name, gather_idx, valid, full["position_ids"])
            ran.append(1)
            return (), new

        # decoder mode, first step: the logits must be exactly head(decoder output). Checked on this
        # step's own forward, not on a dense forward of its own: a second call of the model inside
        # the root's forward would run every layer's FSDP2 / ZeRO-3 hooks twice (all-gathers), and
        # FSDP2's post-forward of the nested root call leaves the root group idle, so the outer
        # post-forward reshards it and the backward all-gathers it again.
        probe = self.capture.head_probe() if mode != "model" and not self._head_checked else contextlib.nullcontext()
        handle = decoder.register_forward_pre_hook(gather, with_kwargs=True, prepend=True)
        try:
            with probe as check_head:
                out = self.original(**inputs, **self.use_cache_kw)
        finally:
            handle.remove()
        logits = out.logits if hasattr(out, "logits") else out[0]  # (B, K, V)
        if len(ran) != 1 or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(gather_idx.shape):
            raise RewriteError(
                f"regate_fx: execution='gathered': the step did not run its decoder once on the kept tokens "
                f"(decoder calls: {len(ran)}, logits {tuple(logits.shape)}, kept layout {tuple(gather_idx.shape)}); "
                "its result is discarded"
            )
        if check_head is not None:
            check_head(out)
            self._head_checked = True
        self.calls += 1
        return kept_outputs(logits, gather_idx, scatter_idx, valid, labels, t, return_logits)


@contextlib.contextmanager
def _plain_functional_linear():
    """``torch.nn.functional.linear`` as torch defines it while the proof captures the meta copy.

    DeepSpeed ZeRO-3 replaces it process-wide with ``zero3_linear_wrap`` (its "memory efficient
    linear": the same ``x @ w.T + b``, an autograd Function that saves less for the backward), which
    dynamo captures as an opaque ``autograd_function_apply``. The proof is about what the model
    computes, so it captures torch's own linear; the step itself runs DeepSpeed's."""
    fn = torch.nn.functional.linear
    orig = None
    if getattr(fn, "__name__", "") == "zero3_linear_wrap":
        try:
            from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

            orig = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
        except ImportError:  # pragma: no cover
            orig = None
    if orig is None:
        yield
        return
    torch.nn.functional.linear = orig
    try:
        yield
    finally:
        torch.nn.functional.linear = fn


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _takes(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def _signature(kwargs: dict) -> tuple:
    """What a proof depends on: the names, ranks and dtypes of the tensor inputs, and the others' types."""
    return tuple(
        sorted(
            (k, (v.dim(), str(v.dtype)) if _is_tensor(v) else type(v).__name__)
            for k, v in kwargs.items()
            if v is not None and k != _DECODER_MASK
        )
    )


def _batch_of_two(v: Any, t: int) -> Any:
    """A meta input of a batch of 1 as a batch of 2 along its batch axis."""
    if not _is_tensor(v):
        return v
    bat, _ = token_axes(v, 1, t)
    if not bat:
        return v
    shape = list(v.shape)
    shape[bat[0]] = 2
    return torch.empty(shape, dtype=v.dtype, device="meta")


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value
