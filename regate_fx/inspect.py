"""``regate-fx inspect``: will ReGATE token elision work on my model? Answered in seconds, without weights.

    regate-fx inspect llama                       # a family name (transformers' model_type)
    regate-fx inspect path/to/config.json --json  # a config file, or a directory holding one
    regate-fx inspect --all --markdown docs/families.md

For one target, :func:`inspect_model`:

1. builds the config (``AutoConfig.for_model(name)`` for a family name, ``AutoConfig.from_pretrained``
   for a file or directory) and shrinks it to tiny sizes **generically** (:func:`shrink_config`:
   it walks the config and its sub-configs and caps well-known size attributes, keeping heads
   dividing hidden; no per-family table);
2. builds the model with random weights through transformers' auto mappings
   (``AutoModelForImageTextToText`` first when the config nests a ``text_config``, else
   ``AutoModelForCausalLM``), in float32, eval mode, dropout off;
3. sparsifies it (``backend="eager"``, strict) and runs one sparse step on a random text batch
   with a random keep mask: a :class:`~regate_fx.RewriteError` is a **refused** verdict with the
   report's reasons (:class:`~regate_fx.Reason` names; ``CAPTURE`` when the refusal came before the
   analysis: dynamo could not capture the model as one graph, or the capture mode does not fit it);
   Before that, one dense forward must run (it also counts the FLOPs): a tiny model that does not
   run dense is an error of the generic shrinking, not a refusal (retried once with the original
   head dims). A model whose forward takes no ``position_ids`` (BART-style learned positions) is
   checked with a prefix keep mask, since the oracle cannot give it original positions;
4. runs :func:`regate_fx.oracle` on the same batch and says **exact-sparse** only when the sparse
   loss and the logits at kept positions equal the oracle's. Anything else (the model cannot be
   built tiny, a forward fails, the sparse result differs from the oracle) is verdict **error**
   with the message.

Multimodal models are checked on a text-only batch (no pixel inputs: building them generically
for every family is not attempted), which exercises their decoder; the result says so.

Kept-FLOP fraction: the report names the module of every residual branch (``BranchRecord.module``);
:class:`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of every module (matmuls,
convolutions, attention) in one dense forward of the tiny model. The fraction is the FLOPs of the
rewritten branches' modules over the FLOPs of all decoder layers (``BranchRecord.layer``), so it
is measured on the dense model's modules, not on the rewritten graph's nodes, and at the tiny
sizes (attention's share grows with the sequence length). It is ``None`` when the model is refused
(strict mode runs nothing sparse) or when no branch module could be matched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BranchInfo", "InspectResult", "ReasonInfo", "all_families", "inspect_model", "main", "shrink_config"]

VERDICTS = ("exact-sparse", "refused", "error")
EXIT_CODES = {"exact-sparse": 0, "refused": 1, "error": 2}

# --- generic shrinking ------------------------------------------------------------------------------

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 256
POSITIONS = 512
EXPERTS = 4

_HIDDEN_KEYS = (
    "hidden_size",
    "d_model",
    "n_embd",
    "embed_dim",
    "dim",
    "model_dim",
    "word_embed_proj_dim",
    "projection_dim",
    "hidden_dim",
)
_INTERMEDIATE_KEYS = (
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "intermediate_size_mlp",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "ffn_hidden_size",
    "expert_intermediate_size",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
    "d_ff",
    "mlp_dim",
    "feed_forward_proj_dim",
)
_LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "depth",
    "decoder_layers",
    "encoder_layers",
    "num_decoder_layers",
)
_HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "n_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
)
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_key_value_groups")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k")
_HEAD_DIM_KEYS = (
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "rotary_dim",
    "rope_dim",
    "kv_lora_rank",
    "q_lora_rank",
    "attention_head_dim",
)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "max_seq_len")


def _sub_configs(cfg) -> list:
    from transformers import PretrainedConfig

    return [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _head_dim(d: dict) -> int | None:
    if _is_int(d.get("head_dim")):
        return d["head_dim"]
    heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
    hidden = next((d[k] for k in _HIDDEN_KEYS if _is_int(d.get(k))), None)
    return hidden // heads if heads and hidden else None


def _rescale_sections(d: dict, old_hd: int | None, new_hd: int | None) -> None:
    """Int lists inside rope dicts that split half the head dim (M-RoPE's sections) follow it."""
    if not old_hd or not new_hd or old_hd == new_hd:
        return
    for k, v in list(d.items()):
        if not isinstance(v, dict) or "rope" not in k:
            continue
        for kk, vv in list(v.items()):
            if isinstance(vv, list) and vv and all(_is_int(x) and x > 0 for x in vv) and len(vv) <= new_hd // 2:
                total = sum(vv)
                for target_total, old_total in ((new_hd // 2, old_hd // 2), (new_hd, old_hd)):
                    if total == old_total:
                        new = [max(1, x * target_total // total) for x in vv]
                        new[-1] += target_total - sum(new)
                        if new[-1] >= 1:
                            v[kk] = new
                        break


def _shrink_one(cfg, special: dict[int, int], keep_head_dim: bool) -> None:
    d = vars(cfg)
    old_layers = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    old_hd = _head_dim(d)
    old_heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
    hidden_cap = max(HIDDEN, HEADS * old_hd) if keep_head_dim and old_hd else HIDDEN
    for k in _HIDDEN_KEYS:
        if _is_int(d.get(k)) and d[k] > hidden_cap:
            d[k] = hidden_cap
    for k in _INTERMEDIATE_KEYS:
        if _is_int(d.get(k)) and d[k] > INTERMEDIATE:
            d[k] = INTERMEDIATE
    for k in _LAYER_KEYS:
        if _is_int(d.get(k)) and d[k] > LAYERS:
            d[k] = LAYERS
    for k in _HEAD_KEYS:
        if _is_int(d.get(k)) and d[k] > HEADS:
            d[k] = HEADS
    heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
    for k in _KV_KEYS:
        if _is_int(d.get(k)) and d[k] > 1:
            kv = min(d[k], KV_HEADS)
            if heads and d[k] == old_heads:  # multi-head (one kv head per head) stays so
                kv = heads
            elif heads and heads % kv:
                kv = 1
            d[k] = kv
    hidden = next((d[k] for k in _HIDDEN_KEYS if _is_int(d.get(k))), None)
    if heads and hidden and _is_int(d.get("head_dim")) and not keep_head_dim:
        d["head_dim"] = max(hidden // heads, 2)
    _rescale_sections(d, old_hd, _head_dim(d))
    new_hd = _head_dim(d)
    if new_hd and not keep_head_dim:  # sub-head sizes (MLA's rope/nope/value dims, partial rotary)
        for k in _HEAD_DIM_KEYS:
            if _is_int(d.get(k)) and d[k] > new_hd:
                d[k] = new_hd
        if _is_int(d.get("qk_head_dim")) and _is_int(d.get("qk_nope_head_dim")) and _is_int(d.get("qk_rope_head_dim")):
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]  # derived: MLA's q/k head dim
    for k in _EXPERT_KEYS:
        if _is_int(d.get(k)) and d[k] > EXPERTS:
            d[k] = EXPERTS
    experts = next((d[k] for k in _EXPERT_KEYS if _is_int(d.get(k))), None)
    for k in _TOPK_KEYS:
        if _is_int(d.get(k)) and experts and d[k] > min(2, experts):
            d[k] = min(2, experts)
    for k in ("n_group", "topk_group"):  # grouped routing (DeepSeek-V3): groups must divide the experts
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 1
    for k in _POSITION_KEYS:
        if _is_int(d.get(k)) and d[k] > POSITIONS:
            d[k] = POSITIONS
    if _is_int(d.get("vocab_size")) and d["vocab_size"] > VOCAB:
        d["vocab_size"] = VOCAB
    # per-layer lists (layer_types, mlp_only_layers as flags, ...) follow the layer count
    new_layers = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    if old_layers and new_layers and new_layers < old_layers:
        for k, v in list(d.items()):
            if isinstance(v, list) and len(v) == old_layers:
                d[k] = v[:new_layers]
    # dropout off: the verdict compares against the oracle
    for k, v in list(d.items()):
        if isinstance(v, float) and ("dropout" in k or "pdrop" in k) and v > 0:
            d[k] = 0.0
    # token ids past the shrunk vocabulary move to its top (distinct, shared across sub-configs)
    for k, v in list(d.items()):
        if k.endswith(("token_id", "token_index", "token_ids")):
            if _is_int(v) and v >= VOCAB:
                d[k] = special.setdefault(v, VOCAB - 1 - len(special))
            elif isinstance(v, list) and all(_is_int(x) for x in v):
                d[k] = [special.setdefault(x, VOCAB - 1 - len(special)) if x >= VOCAB else x for x in v]
    for sub in _sub_configs(cfg):
        _shrink_one(sub, special, keep_head_dim)


def shrink_config(config, *, keep_head_dim: bool = False) -> Any:
    """Cap the size attributes of ``config`` and its sub-configs, in place, and return it.

    Generic (no per-family table): hidden sizes -> 32, intermediate sizes -> 64, layers -> 2,
    attention heads -> 4 (key/value heads -> 2, or 1 when 2 does not divide), ``head_dim`` ->
    hidden / heads, experts -> 4 (2 per token), positions -> 512, vocabulary -> 256 (token ids past
    it move to its top), per-layer lists cut to the layer count, dropouts -> 0, rope section lists
    (M-RoPE) rescaled with the head dim. Attributes already smaller are left alone.

    ``keep_head_dim=True`` keeps each attention's head dim (hidden = 4 heads x head dim): for
    modeling code that hard-codes sizes derived from it (an M-RoPE section default, say).
    :func:`inspect_model` retries with it when the first tiny build fails.
    """
    _shrink_one(config, {}, keep_head_dim)
    return config


# --- building ------------------------------------------------------------------------------------


def _mappings():
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def all_families() -> list[str]:
    """Every model_type with a causal-LM or image-text-to-text class in the installed transformers."""
    causal, itt = _mappings()
    return sorted(set(causal) | set(itt))


def load_config(target) -> Any:
    """A config from a family name, a ``config.json`` path, a directory holding one, or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(target, PretrainedConfig):
        return copy.deepcopy(target)  # shrinking works in place
    p = Path(os.fspath(target))
    if p.is_dir() or p.is_file():
        return AutoConfig.from_pretrained(str(p))
    return AutoConfig.for_model(str(target))


def model_class(config):
    """(auto class name, model class) for ``config``: image-text-to-text first when the config nests
    a text config, else causal LM."""
    import transformers

    causal, itt = _mappings()
    mt = config.model_type
    order = [("AutoModelForImageTextToText", itt), ("AutoModelForCausalLM", causal)]
    if getattr(config, "text_config", None) is None:
        order.reverse()
    for auto, names in order:
        if mt in names:
            return auto, getattr(transformers, names[mt])
    raise ValueError(
        f"model_type {mt!r} has no causal-LM or image-text-to-text class in transformers {transformers.__version__}"
    )


def _special_ids(config) -> set[int]:
    out: set[int] = set()

    def walk(c):
        for k, v in vars(c).items():
            if k.endswith(("token_id", "token_index", "token_ids")):
                if _is_int(v):
                    out.add(v)
                elif isinstance(v, list):
                    out.update(x for x in v if _is_int(x))
        for s in _sub_configs(c):
            walk(s)

    walk(config)
    return out


def _vocab(config, model) -> int:
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        n = getattr(getattr(emb, "weight", None), "shape", [VOCAB])[0]
    return int(n)


# --- the result ----------------------------------------------------------------------------------


@dataclass
class ReasonInfo:
    """One reason from the rewrite report: ``reason`` is a :class:`~regate_fx.Reason` name."""

    reason: str
    text: str
    where: str = ""


@dataclass
class BranchInfo:
    index: int
    layer: str
    module: str
    kind: str
    rewritten: bool
    reason: str | None = None
    flops: int | None = None


@dataclass
class InspectResult:
    """What :func:`inspect_model` found. ``verdict`` is ``"exact-sparse"``, ``"refused"`` or ``"error"``."""

    target: str
    family: str | None = None
    config_class: str | None = None
    model_class: str | None = None
    auto_class: str | None = None
    verdict: str = "error"
    reasons: list[ReasonInfo] = field(default_factory=list)
    error: str = ""
    branches: list[BranchInfo] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """What runs on kept tokens: branch modules, plus the tail when it does."""
    dense: list[str] = field(default_factory=list)
    """What stays dense (full length), each with why."""
    kept_flop_fraction: float | None = None
    """Share of the decoder layers' FLOPs in branches that run on kept tokens (module docstring)."""
    kept_flop_fraction_model: float | None = None
    """The same over the whole forward's FLOPs (embeddings, LM head, ...): the tail counts as kept
    when it runs on kept tokens."""
    branches_rewritten: int = 0
    tail_on_kept: bool | None = None
    oracle_max_diff: float | None = None
    oracle_loss_diff: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return asdict(self)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        style = {"exact-sparse": "bold green", "refused": "bold yellow", "error": "bold red"}[self.verdict]
        head = Text.assemble(
            ("verdict: ", "bold"),
            (self.verdict, style),
            f"   {self.family or '?'} -> {self.model_class or '?'} ({self.seconds:.1f} s)",
        )
        parts: list = [head]
        if self.kept_flop_fraction is not None:
            whole = (
                ""
                if self.kept_flop_fraction_model is None
                else f"; {self.kept_flop_fraction_model:.0%} of the whole forward's"
            )
            parts.append(
                Text(
                    f"layer FLOPs on kept tokens: {self.kept_flop_fraction:.0%}{whole} "
                    f"({self.branches_rewritten}/{len(self.branches)} branches; tail on kept tokens: "
                    f"{'yes' if self.tail_on_kept else 'no'})"
                )
            )
        if self.branches:
            t = Table(title="residual branches")
            for col in ("#", "module", "kind", "runs", "why not", "FLOPs"):
                t.add_column(col)
            for b in self.branches:
                t.add_row(
                    str(b.index),
                    b.module,
                    b.kind,
                    Text("kept tokens", style="green") if b.rewritten else Text("dense", style="red"),
                    b.reason or "",
                    "-" if b.flops is None else f"{b.flops:,}",
                )
            parts.append(t)
        if self.reasons:
            t = Table(title="why refused")
            for col in ("reason", "where", "detail"):
                t.add_column(col)
            for r in self.reasons:
                t.add_row(r.reason, r.where, r.text)
            parts.append(t)
        if self.dense:
            parts.append(Text("stays dense:\n" + "\n".join(f"  - {d}" for d in self.dense)))
        if self.error:
            parts.append(Text(self.error, style="red"))
        for n in self.notes:
            parts.append(Text(f"note: {n}", style="dim"))
        return Group(*parts)


# --- the check ----------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    if not seconds or not hasattr(signal, "SIGALRM") or sys.platform == "win32":
        yield
        return
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig, _frame):
        raise _Timeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _short(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _reasons(report) -> list[ReasonInfo]:
    from regate_fx.report import group_outside

    out: list[ReasonInfo] = []
    if report is None:
        return out
    g = report.sparse_graph
    if g is None:
        return out
    if g.reason is not None:
        out.append(ReasonInfo(g.reason.name, g.detail, g.name))
    for b in g.branches:
        if not b.rewritten and b.reason is not None:
            out.append(ReasonInfo(b.reason.name, b.detail, b.module))
    for module, first, more in group_outside(g.outside):
        out.append(ReasonInfo(first.reason.name, first.detail + (f" (+{more} more ops)" if more else ""), module))
    return out


def _module_flops(model, batch: dict) -> dict[str, int]:
    """FLOPs per module path (``model.layers.0.mlp``) of one dense forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**inputs, use_cache=False)  # as the oracle calls it
    prefix = type(model).__name__ + "."
    counts = {k[len(prefix) :]: int(sum(v.values())) for k, v in fc.get_flop_counts().items() if k.startswith(prefix)}
    counts[""] = int(sum(fc.get_flop_counts().get("Global", {}).values()))
    return counts


def _fill_branches(res: InspectResult, report, flops: dict[str, int] | None) -> None:
    from regate_fx.report import group_outside

    g = report.sparse_graph if report is not None else None
    if g is None:
        return
    res.tail_on_kept = g.tail_on_kept
    for b in g.branches:
        res.branches.append(
            BranchInfo(
                b.index,
                b.layer,
                b.module,
                b.kind.value,
                b.rewritten,
                b.reason.name if b.reason else None,
                flops.get(b.module) if flops else None,
            )
        )
    res.branches_rewritten = sum(b.rewritten for b in g.branches)
    res.kept = [f"{b.module} ({b.kind.value})" for b in g.branches if b.rewritten]
    if g.tail_on_kept:
        res.kept.append("final norm, LM head and loss")
    res.dense = [
        f"{b.module} ({b.kind.value}): {b.reason.name if b.reason else '?'}: {b.detail}"
        for b in g.branches
        if not b.rewritten
    ]
    res.dense += [f"{m} (outside every branch): {o.reason.name}: {o.detail}" for m, o, _ in group_outside(g.outside)]
    if not g.tail_on_kept and g.branches:
        res.dense.append(f"final norm / LM head: {g.tail_detail or 'full length'}")
    res.dense.append(
        "embeddings (and, for a multimodal model, the vision tower and projector): before the first layer, full length"
    )


def _kept_flop_fraction(res: InspectResult, flops: dict[str, int] | None) -> float | None:
    if not flops or not res.branches:
        return None
    layers = {b.layer for b in res.branches}
    total = sum(flops.get(layer, 0) for layer in layers)
    if total <= 0 or any(b.flops is None for b in res.branches):
        return None
    kept = sum(b.flops for b in res.branches if b.rewritten)
    return min(kept / total, 1.0)


def _takes_position_ids(model) -> bool:
    import inspect as pyinspect

    try:
        return "position_ids" in pyinspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True


def _model_flop_fraction(res: InspectResult, model, flops: dict[str, int] | None) -> float | None:
    if not flops or res.kept_flop_fraction is None or not flops.get(""):
        return None
    kept = sum(b.flops for b in res.branches if b.rewritten)
    if res.tail_on_kept:
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head), None)
        kept += flops.get(name, 0) if name else 0
    return min(kept / flops[""], 1.0)


def _random_batch(model, config, seq: int, batch: int, seed: int, rho: float) -> tuple[dict, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = _vocab(config, model)
    banned = _special_ids(config) | {0, 1, 2}
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in banned])
    ids = allowed[torch.randint(0, len(allowed), (batch, seq), generator=g)]
    am = torch.ones(batch, seq, dtype=torch.long)
    out = {
        "input_ids": ids,
        "attention_mask": am,
        "labels": ids.clone(),
        "position_ids": torch.arange(seq)[None].expand(batch, seq).contiguous(),
    }
    keep = torch.rand(batch, seq, generator=g) < rho
    keep[:, 0] = True
    return out, keep


def inspect_model(
    target,
    *,
    seq: int = 16,
    batch: int = 2,
    rho: float = 0.5,
    seed: int = 0,
    shrink: bool = True,
    time_limit: float | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> InspectResult:
    """Build ``target`` tiny with random weights, sparsify it and check one sparse step against the oracle.

    Args:
        target: a family name (``"llama"``, transformers' ``model_type``), a ``config.json`` path, a
            directory holding one, or a ``PretrainedConfig``.
        seq, batch: the random batch's length and size.
        rho: each token is kept with this probability (the first of each sample always).
        seed: seeds the weights, the batch and the keep mask.
        shrink: cap the config's sizes first (:func:`shrink_config`); ``False`` builds it as given.
            When the tiny model fails to build or run (verdict ``"error"``), it is tried once more
            with the original head dims (``shrink_config(keep_head_dim=True)``); a note says so.
        time_limit: seconds for each attempt (a timer signal; main thread only): past it the
            verdict is ``"error"``.
        atol, rtol: tolerance of the oracle comparison (float32).

    Never raises for a model problem: the verdict is ``"error"`` with the message.
    """
    kw = dict(seq=seq, batch=batch, rho=rho, seed=seed, shrink=shrink, time_limit=time_limit, atol=atol, rtol=rtol)
    res = _inspect_once(target, keep_head_dim=False, **kw)
    if (
        res.verdict == "error"
        and shrink
        and res.model_class is not None
        and not res.error.startswith("the sparse")
        and "timed out" not in res.error
    ):
        again = _inspect_once(target, keep_head_dim=True, **kw)
        if again.verdict != "error":
            again.notes.append(f"built with the original head dims (the first tiny build failed: {res.error[:200]})")
            again.seconds = round(again.seconds + res.seconds, 2)
            return again
        res.seconds = round(again.seconds + res.seconds, 2)
    return res


def _inspect_once(
    target,
    *,
    keep_head_dim: bool,
    seq: int = 16,
    batch: int = 2,
    rho: float = 0.5,
    seed: int = 0,
    shrink: bool = True,
    time_limit: float | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> InspectResult:
    import torch

    import regate_fx
    from regate_fx.errors import KeepMaskError, RewriteError

    t0 = time.time()
    res = InspectResult(target=str(target))
    model = None
    try:
        with _time_limit(time_limit):
            config = load_config(target)
            res.family = config.model_type
            res.config_class = type(config).__name__
            if shrink:
                shrink_config(config, keep_head_dim=keep_head_dim)
            auto, cls = model_class(config)
            res.auto_class, res.model_class = auto, cls.__name__
            torch.manual_seed(seed)
            try:
                model = cls._from_config(config, dtype=torch.float32)
            except TypeError:
                model = cls._from_config(config)
            model = model.float().eval()
            if auto == "AutoModelForImageTextToText":
                res.notes.append(
                    "multimodal model: checked on a text-only batch (no pixel inputs), which "
                    "exercises its decoder; the vision tower and projector run dense before it"
                )
            b, keep = _random_batch(model, config, seq, batch, seed, rho)
            if not _takes_position_ids(model):
                # the model derives positions from the input length (learned positions of BART-style
                # decoders): the oracle cannot pass original positions, so the kept tokens are a prefix
                keep = torch.zeros_like(keep)
                keep[:, : max(1, int(seq * rho))] = True
                del b["position_ids"]
                res.notes.append(
                    "the model's forward takes no position_ids: checked with a prefix keep mask "
                    "(the oracle cannot give kept tokens their original positions)"
                )
            try:
                flops = _module_flops(model, b)
            except Exception as e:  # noqa: BLE001 - FLOP counting fails on some modules: run plainly
                flops = None
                try:
                    with torch.no_grad():
                        model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False)
                except Exception as e2:  # noqa: BLE001
                    raise RuntimeError(f"the tiny model does not run dense: {_short(e2, 300)}") from e2
                res.notes.append(f"FLOPs not counted ({_short(e, 120)})")
            # return_logits: one sparse call (one capture) gives the loss and the logits
            regate_fx.sparsify(model, regate_fx.SparsifyConfig(progress=False, return_logits=True), backend="eager")
            try:
                out = model(**b, keep_mask=keep)
            except (RewriteError, KeepMaskError) as e:
                # KeepMaskError here: the graph could not be rewritten at all (the batch and mask are valid)
                if "_Timeout" in str(e):
                    raise _Timeout(f"timed out after {time_limit:.0f} s (while capturing)") from e
                report = e.report if e.report is not None else getattr(model, "regate_report", None)
                res.verdict = "refused"
                res.reasons = _reasons(report)
                if not res.reasons:  # refused before the analysis: dynamo capture, capture mode
                    res.reasons = [ReasonInfo("CAPTURE", _short(e, 600))]
                _fill_branches(res, report, flops)
                return res
            report = model.regate_report
            _fill_branches(res, report, flops)
            logits = out.logits
            with torch.no_grad():
                ref_logits, ref_loss = regate_fx.oracle(model, b, keep)
            diff = 0.0
            ok = True
            for i, ref in enumerate(ref_logits):
                got = logits[i, keep[i]].detach()
                if got.shape != ref.shape:
                    ok = False
                    diff = math.inf
                    break
                d = (got - ref).abs()
                diff = max(diff, float(d.max()))
                ok = ok and bool((d <= atol + rtol * ref.abs()).all())
            loss_diff = abs(float(out.loss.detach()) - float(ref_loss))
            res.oracle_max_diff, res.oracle_loss_diff = diff, loss_diff
            ok = ok and loss_diff <= atol and math.isfinite(loss_diff)
            if ok:
                res.verdict = "exact-sparse"
                res.kept_flop_fraction = _kept_flop_fraction(res, flops)
                res.kept_flop_fraction_model = _model_flop_fraction(res, model, flops)
            else:
                res.verdict = "error"
                res.error = (
                    f"the sparse step differs from the oracle (max |logit diff| {diff:.3g}, "
                    f"loss diff {loss_diff:.3g}): a bug in regate_fx, please report it"
                )
    except Exception as e:  # noqa: BLE001 - any failure is a verdict, never a crash of the sweep
        res.verdict = "error"
        res.error = _short(e)
        if os.environ.get("REGATE_FX_INSPECT_TRACEBACK"):
            traceback.print_exc()
    finally:
        res.seconds = round(time.time() - t0, 2)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        del model
    return res


# --- the command line -----------------------------------------------------------------------------


def _summary_row(r: InspectResult) -> tuple[str, str, str, str]:
    if r.verdict == "exact-sparse":
        frac = "-" if r.kept_flop_fraction is None else f"{r.kept_flop_fraction:.0%}"
        if r.kept_flop_fraction_model is not None:
            frac += f" / {r.kept_flop_fraction_model:.0%}"
        why = f"{r.branches_rewritten}/{len(r.branches)} branches; tail {'kept' if r.tail_on_kept else 'dense'}"
    elif r.verdict == "refused":
        frac = "-"
        why = "; ".join(f"{x.reason}: {x.text}" + (f" ({x.where})" if x.where else "") for x in r.reasons[:2])
        if len(r.reasons) > 2:
            why += f"; +{len(r.reasons) - 2} more"
    else:
        frac = "-"
        why = r.error
    return r.verdict, frac, why, r.model_class or "-"


def _md_escape(s: str) -> str:
    return " ".join(s.replace("|", "\\|").replace("`", "'").split())


def write_markdown(results: list[InspectResult], path: str, command: str, skipped: list[str]) -> None:
    import transformers

    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Model families: does ReGATE run exact on kept tokens?",
        "",
        f"Generated by `{command}` on {now} with transformers {transformers.__version__} "
        "(do not edit by hand; run the command again).",
        "",
        "Each family's config class is shrunk to tiny sizes generically (`regate_fx.inspect.shrink_config`), "
        'built with random weights, sparsified (`backend="eager"`, strict) and run for one sparse step '
        "on a random text batch; **exact-sparse** means that step equals `regate_fx.oracle` (loss and "
        "logits at kept positions). Multimodal families are checked on a text-only batch (their decoder). "
        "*Kept FLOPs*: the share of the decoder layers' FLOPs (counted per module by torch's "
        "FlopCounterMode on the tiny dense model) in branches that run on kept tokens, then the share of the "
        "whole forward's FLOPs that runs on kept tokens (branches, plus the LM head when the tail runs on "
        "kept tokens; at these tiny sizes the embedding-sized LM head weighs more than in a real model). "
        "*refused* lists the report's reasons (`regate_fx.Reason` names; CAPTURE: refused before the "
        "analysis, at capture). *error* means the "
        "tiny model could not be built or run generically (usually a config that needs real values), not "
        "that ReGATE refuses it.",
        "",
        f"**{len(results)} families: {counts['exact-sparse']} exact-sparse, {counts['refused']} refused, "
        f"{counts['error']} error.**"
        + (f" {len(skipped)} more not run in the time this sweep had (listed at the end)." if skipped else ""),
        "",
        "| family | model class | verdict | kept FLOPs (layers / whole) | details |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.family or r.target):
        verdict, frac, why, cls = _summary_row(r)
        lines.append(f"| {r.family or r.target} | {cls} | {verdict} | {frac} | {_md_escape(why)[:300]} |")
    if skipped:
        lines += [
            "",
            f"Not run in this sweep (time): {', '.join(skipped)}. `--jsonl PATH` makes a sweep "
            "resumable: run the command again with the same file to add them.",
        ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regate-fx", description="regate_fx command line")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser(
        "inspect",
        help="will ReGATE run exact on this model? (tiny random weights, seconds)",
        description="Build the model tiny from its config, sparsify it, run one sparse step and "
        "check it against the oracle. Exit code: 0 exact-sparse, 1 refused, 2 error.",
    )
    i.add_argument("target", nargs="*", help="family name(s) (model_type), config.json path(s) or directories")
    i.add_argument(
        "--all", action="store_true", help="every causal-LM and image-text-to-text family of the installed transformers"
    )
    i.add_argument("--json", action="store_true", help="machine output (one object, or a list for several targets)")
    i.add_argument("--markdown", metavar="PATH", help="write a markdown table of the results (with --all)")
    i.add_argument(
        "--jsonl",
        metavar="PATH",
        help="append each result to PATH as one JSON line (resumable sweeps: families already in PATH are skipped)",
    )
    i.add_argument("--seq", type=int, default=16)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--no-shrink", action="store_true", help="build the config at its own sizes")
    i.add_argument("--time-limit", type=float, default=120.0, help="seconds per model (default 120)")
    i.add_argument("--no-table", action="store_true", help="with several targets: print only the counts")
    i.add_argument("--shard", default=None, metavar="I/N", help="with --all: only families I, I+N, ... (0-based)")
    i.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="S",
        help="with --all: stop starting families after S seconds (the rest are listed as skipped)",
    )
    return p


def _from_jsonl(d: dict) -> InspectResult:
    d = dict(d)
    d["reasons"] = [ReasonInfo(**x) for x in d.get("reasons", [])]
    d["branches"] = [BranchInfo(**x) for x in d.get("branches", [])]
    return InspectResult(**d)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    console = Console(stderr=args.json)
    targets = list(args.target)
    if args.all:
        targets = all_families()
        if args.shard:
            i, n = (int(x) for x in args.shard.split("/"))
            targets = targets[i::n]
    if not targets:
        console.print("regate-fx inspect: give a family name, a config.json or a directory, or --all")
        return 2
    done: dict[str, InspectResult] = {}
    if args.jsonl and Path(args.jsonl).exists():
        for line in Path(args.jsonl).read_text().splitlines():
            if line.strip():
                r = _from_jsonl(json.loads(line))
                done[r.target] = r
    kw = dict(seq=args.seq, seed=args.seed, shrink=not args.no_shrink, time_limit=args.time_limit)
    results: list[InspectResult] = []
    skipped: list[str] = []
    t0 = time.time()
    if len(targets) == 1:
        results.append(done.get(targets[0]) or inspect_model(targets[0], **kw))
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as prog:
            task = prog.add_task("inspect", total=len(targets))
            for t in targets:
                if args.deadline is not None and time.time() - t0 > args.deadline and t not in done:
                    skipped.append(t)
                    prog.advance(task)
                    continue
                prog.update(task, description=f"inspect {t:<28}")
                r = done.get(t)
                if r is None:
                    r = inspect_model(t, **kw)
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps(r.to_dict()) + "\n")
                results.append(r)
                prog.advance(task)
    if args.markdown:
        cmd = "regate-fx " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(results, args.markdown, cmd, skipped)
    if args.json:
        payload = [r.to_dict() for r in results] if len(targets) > 1 else results[0].to_dict()
        print(json.dumps(payload, indent=2))
    elif len(results) == 1:
        console.print(results[0])
    elif not args.no_table:
        from rich.table import Table

        t = Table(title="regate-fx inspect")
        for col in ("family", "model class", "verdict", "kept FLOPs", "why / details"):
            t.add_column(col)
        for r in results:
            verdict, frac, why, cls = _summary_row(r)
            t.add_row(r.family or r.target, cls, verdict, frac, why[:160])
        console.print(t)
    if not args.json and len(results) > 1:
        counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
        console.print(
            ", ".join(f"{v}: {n}" for v, n in counts.items())
            + (f", skipped for time: {len(skipped)}" if skipped else "")
        )
    return max(r.exit_code for r in results) if results else 2


if __name__ == "__main__":
    sys.exit(main())
