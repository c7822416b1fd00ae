"""The check itself: build tiny, run dense, sparsify, run one sparse step, compare with the oracle."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
from typing import Any

from regate_fx.inspect.result import BranchInfo, InspectResult, ReasonInfo
from regate_fx.inspect.shrink import load_config, model_class, shrink_config, special_ids, vocab_size

__all__ = ["inspect_model"]


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
    kept = sum(b.flops for b in res.branches if b.rewritten and b.flops is not None)  # (all set: checked above)
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
    # a kept fraction means every branch has its flops (_kept_flop_fraction)
    kept = sum(b.flops for b in res.branches if b.rewritten and b.flops is not None)
    if res.tail_on_kept:
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head), None)
        kept += flops.get(name, 0) if name else 0
    return min(kept / flops[""], 1.0)


def _random_batch(model, config, seq: int, batch: int, seed: int, rho: float) -> tuple[dict, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = vocab_size(config, model)
    banned = special_ids(config) | {0, 1, 2}
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


def _eager_compiled_gap(cls, config, seed: int, batch: dict) -> float | None:
    """Max |logit diff| between a fresh dense copy's eager and ``torch.compile`` forwards on
    ``batch`` (None when it cannot be measured): a model whose two modes disagree has no single
    dense result for a captured graph to equal."""
    import torch

    try:
        torch.manual_seed(seed)
        dense = cls._from_config(config).float().eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            eager = dense(**inputs, use_cache=False).logits
            torch._dynamo.reset()
            compiled = torch.compile(dense, backend="eager")(**inputs, use_cache=False).logits
        return float((eager - compiled).abs().max())
    except Exception:  # noqa: BLE001 - a diagnosis only: the verdict stands without it
        return None
    finally:
        torch._dynamo.reset()


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
    experts: str | None = None,
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
        experts: a mixture-of-experts model's ``experts_implementation`` (transformers' default is
            ``"grouped_mm"``, which sorts tokens by expert and is refused; ``"batched_mm"`` runs sparse).

    Never raises for a model problem: the verdict is ``"error"`` with the message.
    """
    kw: dict[str, Any] = dict(
        seq=seq,
        batch=batch,
        rho=rho,
        seed=seed,
        shrink=shrink,
        time_limit=time_limit,
        atol=atol,
        rtol=rtol,
        experts=experts,
    )
    res = _inspect_once(target, keep_head_dim=False, **kw)
    if (
        res.verdict == "error"
        and shrink
        and res.model_class is not None
        and not res.error.startswith("the sparse")
        and "timed out" not in res.error
    ):
        for head_dim, every_kind, note in (
            (True, True, "built with the original head dims"),
            (False, False, "built with its first layers only, not one of each kind"),
        ):
            again = _inspect_once(target, keep_head_dim=head_dim, every_kind=every_kind, **kw)
            if again.verdict != "error":
                again.notes.append(f"{note} (the first tiny build failed: {res.error[:200]})")
                again.seconds = round(again.seconds + res.seconds, 2)
                return again
            res.seconds = round(again.seconds + res.seconds, 2)
    return res


def _inspect_once(
    target,
    *,
    keep_head_dim: bool,
    every_kind: bool = True,
    seq: int = 16,
    batch: int = 2,
    rho: float = 0.5,
    seed: int = 0,
    shrink: bool = True,
    time_limit: float | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    experts: str | None = None,
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
                shrink_config(config, keep_head_dim=keep_head_dim, every_kind=every_kind)
            if experts is not None:
                for sub in (config, getattr(config, "text_config", None)):
                    if sub is not None:
                        sub._experts_implementation = experts
                res.notes.append(f"experts_implementation={experts!r}")
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
                mode_gap = _eager_compiled_gap(cls, config, seed, b)
                if mode_gap is not None and mode_gap > atol:
                    res.error = (
                        f"the sparse step differs from the oracle (max |logit diff| {diff:.3g}), but the model's "
                        f"own eager and torch.compile forwards already differ on this batch (max |logit diff| "
                        f"{mode_gap:.3g}): transformers takes another path when compiled (e.g. it skips an "
                        "all-ones causal mask in eager mode, and an attention that declares is_causal=False "
                        "then attends bidirectionally: PaliGemma's use_bidirectional_attention). The oracle "
                        "runs eagerly and the sparse step runs the captured graph, so they cannot agree; "
                        "batches with the model's own mask inputs (token_type_ids, padding) avoid it"
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
