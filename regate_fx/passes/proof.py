"""The proof behind the gathered execution: the decoder's only token mixing is attention driven by
position ids and a causal padding mask, everything else is token-wise.

Given that proof, running the *unmodified* model on each sample's kept tokens (gathered inputs,
their original position ids, the kept layout's (B, K) padding mask) computes exactly the oracle,
so module hooks (FSDP2 per layer, ZeRO-3, checkpointing, hub kernels) can stay where they are
(``regate_fx/gathered.py``). The proof reuses the rewrite's analysis on a dynamo capture of the
step, taken on a structural copy of the model on the meta device (:func:`meta_copy`: no weights,
no hooks, no sharding), and never runs the captured graph. It holds when:

1. the analysis accepts the graph as the rewrite would in strict mode: the residual stream is
   found, every branch runs on kept tokens, the final norm / LM head (the tail) are token-wise,
   and the coverage invariant holds (no token-mixing op outside the branches);
2. every token-indexed value a branch reads from outside (its side inputs: rotary cos / sin,
   attention masks, ...) is either an attention mask proven "causal AND key is a real token"
   (``masks.py``: the model rebuilds the same mask from the kept layout's padding mask), or is
   computed from the position-id input through token-wise ops only (rebuilt from the gathered
   position ids, it is the same value at every kept token). A value derived from the sequence
   length (``arange(T)``, sliding windows counted in indices), from the padding mask by anything
   else than the proven causal mask (ALiBi offsets from ``cumsum``), or from the token ids is
   refused: on the gathered tokens it would count kept tokens instead of original positions.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from regate_fx.passes.analyse import Analysis, analyse
from regate_fx.passes.checkpoint import CheckpointError, inline_activation_checkpoints
from regate_fx.passes.graph import Ancestry, TokenSymbols, module_path, node_value
from regate_fx.passes.masks import is_causal_key_padding_mask

__all__ = ["Proof", "ProofFailure", "meta_copy", "proof_backend", "prove_graph"]


@dataclass(frozen=True)
class ProofFailure:
    """One reason the gathered execution is not proven exact for a model.

    Attributes:
        code: a stable identifier tests and tools match on (``"refused_branch"``, ``"outside"``,
            ``"tail"``, ``"side_input"``, ``"analysis"``, ``"decoder_input"``, ``"capture"``, ...).
        where: the module path, node or input it is about.
        detail: what was found, in words.
    """

    code: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code} at {self.where}: {self.detail}"


@dataclass
class Proof:
    """The result of :func:`prove_graph`: ``ok`` or the reasons it failed."""

    failures: list[ProofFailure] = field(default_factory=list)
    regions: int = 0
    causal_masks: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


class ProofDone(Exception):
    """Raised by the proof backend with its result: the captured graph is analysed, never run."""

    def __init__(self, proof: Proof):
        super().__init__("regate_fx: proof done")
        self.proof = proof


def prove_graph(gm: fx.GraphModule, found: dict[str, fx.Node], layout_roles: tuple[str, ...]) -> Proof:
    """Check a captured step graph (see the module doc). `found` maps roles (``seq``,
    ``attention_mask``, ``position_ids`` and the layout's roles) to placeholders."""
    proof = Proof()
    fail = proof.failures.append
    try:
        inline_activation_checkpoints(gm)
    except CheckpointError as e:
        fail(ProofFailure("checkpoint", "<model>", str(e)))
        return proof
    seq = found.get("seq")
    if seq is None:
        fail(ProofFailure("capture", "<inputs>", "the model's input_ids / inputs_embeds are not in the graph"))
        return proof
    padding = found.get("attention_mask")
    layout = [found[r] for r in layout_roles if r in found]
    analysis = analyse(gm, seq, padding=padding, layout=layout)
    if analysis.reason is not None:
        fail(ProofFailure("analysis", "<model>", f"{analysis.reason.value}: {analysis.detail}"))
        return proof
    for b in analysis.branches:
        if not b.ok:
            fail(ProofFailure("refused_branch", b.module, f"{b.reason.value if b.reason else '?'}: {b.detail}"))
    for o in analysis.outside:
        fail(ProofFailure("outside", o.module, f"{o.reason.value}: {o.detail}"))
    if analysis.tail is None:
        fail(
            ProofFailure(
                "tail", "<head>", f"the final norm / LM head are not proven token-wise: {analysis.tail_detail}"
            )
        )
    proof.regions, proof.causal_masks = len(analysis.regions), len(analysis.causal_masks)
    if proof.failures:
        return proof
    _check_side_inputs(gm, analysis, seq, padding, found.get("position_ids"), fail)
    return proof


def _causal_mask(a: fx.Node, sym: TokenSymbols, padding: fx.Node | None) -> bool:
    """A proven causal padding mask (``masks.py``), boolean or in its additive float form
    ``where(mask, 0, min)`` (transformers' eager attention)."""
    if is_causal_key_padding_mask(a, sym, padding):
        return True
    if a.op == "call_function" and a.target is torch.where and len(a.args) == 3:
        cond, yes, no = a.args
        return (
            isinstance(cond, fx.Node)
            and _is_zero(yes)
            and isinstance(no, float)
            and no <= -1e4
            and is_causal_key_padding_mask(cond, sym, padding)
        )
    return False


def _is_zero(x: Any) -> bool:
    """0, or a scalar tensor of zeros made in the graph (``torch.tensor(0.0)``, ``zeros(())``)."""
    if isinstance(x, (int, float)):
        return x == 0
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return False
    v = node_value(x)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        return False
    if x.target in (torch.zeros, torch.zeros_like):
        return True
    return bool(x.target in (torch.tensor, torch.scalar_tensor) and x.args and x.args[0] == 0)


def _check_side_inputs(
    gm: fx.GraphModule,
    analysis: Analysis,
    seq: fx.Node,
    padding: fx.Node | None,
    positions: fx.Node | None,
    fail,
) -> None:
    sym: TokenSymbols = analysis.sym  # type: ignore[assignment]
    anc = Ancestry(gm.graph)
    seen: set[fx.Node] = set()
    for region in analysis.regions:
        for a in region.side_inputs:
            if (
                a is region.start
                or a in seen
                or not isinstance(node_value(a), torch.Tensor)
                or not sym.token_dims(node_value(a))
            ):
                continue
            seen.add(a)
            if a in analysis.causal_masks or _causal_mask(a, sym, padding):
                continue  # rebuilt by the model from the kept layout's padding mask: same mask
            why = _not_from_positions(a, analysis, anc, sym, (seq, positions))
            if why:
                fail(ProofFailure("side_input", module_path(a) or a.name, why))


def _not_from_positions(
    a: fx.Node, analysis: Analysis, anc: Ancestry, sym: TokenSymbols, sources: tuple[fx.Node | None, ...]
) -> str:
    """Why token-indexed side input `a` is not a token-wise function of the tokens and their
    position ids ("" if it is): both are gathered, so such a value is the same at every kept token."""
    for m in [*anc.members(anc.ancestors(a)), a]:
        v = node_value(m)
        if not isinstance(v, torch.Tensor) or not sym.token_dims(v):
            continue
        if m.op == "placeholder":
            if m in sources:
                continue
            return (
                f"side input '{a.name}' is computed from input '{m.name}', not only from the position ids; "
                "on the gathered tokens it would not keep its full-length value"
            )
        if m.op not in ("call_function", "call_method"):
            continue
        verdict = analysis.verdict(m)
        if not verdict.token_wise:
            return (
                f"side input '{a.name}' is computed through '{m.name}', which mixes tokens "
                f"({verdict.detail or 'attention'}); only the causal padding mask is rebuilt exactly"
            )
        token_inputs = [x for x in m.all_input_nodes if _carries_tokens(node_value(x), sym)]
        if not token_inputs:
            return (
                f"side input '{a.name}' is derived from the sequence length ('{m.name}' creates a "
                "token-indexed value from a size): on the gathered tokens it would count kept tokens, "
                "not original positions (a sliding window, a default position arange)"
            )
    return ""


def _carries_tokens(v: Any, sym: TokenSymbols) -> bool:
    """Whether a value (a tensor, or a tuple / list of them: a split's result) has a token axis."""
    if isinstance(v, torch.Tensor):
        return bool(sym.token_dims(v))
    if isinstance(v, (list, tuple)):
        return any(_carries_tokens(x, sym) for x in v)
    return False


def proof_backend(roles: Any, layout_roles: tuple[str, ...]):
    """A dynamo backend that proves the captured graph and raises :class:`ProofDone` with the result.
    `roles`: a ``PlaceholderRoles`` naming the step's arguments."""
    from regate_fx.passes.backend import _find_roles

    def backend(gm: fx.GraphModule, example_inputs):
        raise ProofDone(prove_graph(gm, _find_roles(gm, roles), layout_roles))

    return backend


# --- the structural copy ------------------------------------------------------------------


def _plain_class(m: nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Class>``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(m)
    for cls in type(m).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(m)  # pragma: no cover


def _global_shape(p: torch.Tensor) -> torch.Size:
    ds_shape = getattr(p, "ds_shape", None)  # DeepSpeed ZeRO-3: the partitioned tensor is empty
    if ds_shape is not None:
        return torch.Size(ds_shape)
    return p.shape  # a DTensor's shape is its global shape


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(_global_shape(t), dtype=t.dtype, device="meta")


_DROP = ("forward", "_regate_forward", "regate_report")


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` on the meta device: the same module classes (FSDP2's wrapper
    classes undone), attributes and configuration, every parameter and buffer an empty meta tensor
    of its global shape (DTensor, ZeRO-3 partitions), no module hooks (FSDP2, ZeRO-3, ...), no
    sparsified forward. Tied parameters stay tied. Nothing of `model` is changed or copied in memory."""
    memo: dict[int, Any] = {}

    def param(p: nn.Parameter | None) -> nn.Parameter | None:
        if p is None:
            return None
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(_meta(p), requires_grad=p.requires_grad)
        return memo[id(p)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        cls: Any = _plain_class(m)
        new = cls.__new__(cls)
        memo[id(m)] = new
        state = {}
        for k, v in m.__dict__.items():
            if k in _DROP:
                continue
            if k.endswith("hooks") and isinstance(v, dict):  # every hook dict, whatever torch version
                v = OrderedDict()
            elif isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                v = _meta(v)  # plain tensor attributes (rotary's original_inv_freq)
            elif isinstance(v, (list, tuple, dict)) and k not in ("_parameters", "_buffers", "_modules"):
                v = copy.copy(v)
            state[k] = v
        state["_parameters"] = {n: param(p) for n, p in m._parameters.items()}
        state["_buffers"] = {n: None if b is None else _meta(b) for n, b in m._buffers.items()}
        state["_modules"] = {n: None if c is None else module(c) for n, c in m._modules.items()}
        new.__dict__.update(state)
        return new

    return module(model)
