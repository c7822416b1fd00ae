"""`SparsifyConfig`: the options of `sparsify` and their checks (nothing else)."""

from __future__ import annotations

from dataclasses import dataclass

from regate_fx.capture import CAPTURE_MODES

__all__ = ["EXECUTIONS", "LAYOUTS", "SparsifyConfig"]

LAYOUTS = ("auto", "padded", "packed")
EXECUTIONS = ("rewrite", "gathered", "auto")


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
        execution: how a sparse step computes the kept tokens. ``"rewrite"`` (default): the model
            is captured as one dynamo graph whose branches are rewritten to gather -> compute ->
            scatter (fastest on one device with inductor; refuses per-layer FSDP2 and ZeRO-3,
            whose per-module hooks cannot run inside one graph). ``"gathered"``: the analysis
            *proves* (``passes/proof.py``, on a meta-device copy of the model, once) that the
            decoder's only token mixing is attention driven by position ids and a causal padding
            mask, then the model's own, unmodified forward runs eagerly with its decoder called
            on the kept tokens (inputs embeddings / ids, original position ids, M-RoPE's
            (3, B, T) ones too, and the kept layout's padding mask gathered to (B, K)): every
            module hook stays in place (FSDP2 per layer, ZeRO-3, checkpointing, hub kernels), so
            communication is unchanged; a model the proof does not cover is refused with the
            reasons. ``backend``, ``layout``, ``dynamic`` do not apply to it (the kept tokens are
            always padded to (B, K); compile the layers yourself if you want). Its outputs are the
            rewrite's: ``loss``, ``token_loss`` (B, T), and ``logits`` scattered back to (B, T, V)
            (zero at pruned positions) as ``return_logits`` asks. ``"auto"``:
            ``"gathered"`` when the model has per-module sharding (FSDP2 ``fully_shard`` below
            the root, DeepSpeed ZeRO-3), ``"rewrite"`` otherwise.
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
    execution: str = "rewrite"

    def __post_init__(self):
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"SparsifyConfig.capture must be one of {CAPTURE_MODES}, got {self.capture!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"SparsifyConfig.execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"SparsifyConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if (
            isinstance(self.packed_min_waste, bool)
            or not isinstance(self.packed_min_waste, (int, float))
            or not 0.0 <= self.packed_min_waste <= 1.0
        ):
            raise ValueError(
                f"SparsifyConfig.packed_min_waste must be a number in [0, 1], got {self.packed_min_waste!r}"
            )
        for name in ("strict", "fullgraph", "validate", "print_report", "return_logits", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "return_logits" and value is None):
                allowed = "a bool or None" if name == "return_logits" else "a bool"
                raise ValueError(f"SparsifyConfig.{name} must be {allowed}, got {value!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise ValueError(f"SparsifyConfig.dynamic must be None or True, got {self.dynamic!r}")
        if self.dynamic is False:
            raise ValueError(
                "SparsifyConfig.dynamic=False is not supported: the kept count K changes at every "
                "step, so a graph compiled per shape would recompile at every step (and stop at "
                "dynamo's recompile limit). Use dynamic=None (default: static first compile, "
                "symbolic from the first new shape) or dynamic=True (symbolic from the start)."
            )
        if not self.fullgraph:
            raise ValueError(
                "SparsifyConfig.fullgraph=False is not supported: the pass needs the whole "
                "model as one graph to find its residual stream. Fix the graph break that "
                "dynamo reports instead (the error names it), or run the model dense."
            )

    def wants_logits(self, has_labels: bool) -> bool:
        """Whether a sparse step returns (B, T, V) logits (see ``return_logits``)."""
        return (not has_labels) if self.return_logits is None else self.return_logits
