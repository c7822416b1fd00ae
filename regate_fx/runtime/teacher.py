"""The frozen text-only reference teacher and its per-token reference losses.

The teacher is derived generically: no model-class imports, no per-architecture code. By default
(``mode="model"``) it calls the model's own forward with ``input_ids`` and ``attention_mask`` only,
after replacing every visual token by the pad token: without pixel inputs a Hugging Face MLLM runs
its language model alone, and its own forward still builds masks and position ids and applies any
final-logit processing (soft-capping, logit scales) that a hand-assembled "decoder + head" would
silently drop. ``mode="decoder"`` runs ``get_decoder()`` then ``get_output_embeddings()`` instead:
the vision tower and projector are not touched at all, and the LM head is applied only at
supervised positions (less memory for large vocabularies), but any logit post-processing in the
model's forward is skipped.

Which weights the teacher runs is decided here (``TextTeacher._modules_for_hash``); hashing them
is the teacher cache's job (``cache/fingerprint.py``: :func:`weights_fingerprint`,
:func:`weights_probe`, re-exported here).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from regate_fx.runtime.cache.fingerprint import weights_fingerprint, weights_probe
from regate_fx.runtime.selection import (
    default_labels,
    protected_mask,
    real_mask,
    supervised_mask,
)

__all__ = [
    "TextTeacher",
    "causal_lm_teacher",
    "check_same_vocab",
    "text_only_teacher",
    "marker_token_ids_from_config",
    "visual_token_ids_from_config",
    "weights_fingerprint",
    "weights_probe",
]

MODES = ("model", "decoder")
_VISUAL_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
_CE_CHUNK = 4096  # supervised positions per cross-entropy chunk


def visual_token_ids_from_config(config: Any) -> tuple[int, ...]:
    """Visual placeholder ids named by a Hugging Face MLLM config (``image_token_id``, ...).

    Returns:
        Sorted unique ids; empty for a text-only config.
    """
    ids = set()
    for name in _VISUAL_ID_FIELDS:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            ids.add(v)
    return tuple(sorted(ids))


_VISUAL_WORDS = ("vision", "image", "video", "img", "vid", "boi", "eoi")


def marker_token_ids_from_config(config: Any) -> tuple[int, ...]:
    """Ids of the markers around visual tokens named by a Hugging Face MLLM config.

    Every integer ``*_token_id`` / ``*_token_index`` field that names a visual thing and is not a
    placeholder: Qwen-VL's ``vision_start_token_id`` / ``vision_end_token_id``, Gemma3's and
    Llama4's ``boi_token_index`` / ``eoi_token_index``. The runtime keeps them with the visual
    tokens: some models read them (Gemma3 separates consecutive images by them).

    Returns:
        Sorted unique ids; empty for a text-only config.
    """
    ids = set()
    fields = dict(vars(config)) if config is not None and hasattr(config, "__dict__") else {}
    for name, v in fields.items():
        name = name.lstrip("_")
        if name in _VISUAL_ID_FIELDS or not name.endswith(("_token_id", "_token_index")):
            continue
        if any(w in name for w in _VISUAL_WORDS) and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            ids.add(v)
    return tuple(sorted(ids - set(visual_token_ids_from_config(config))))


def _vocab_rows(model: torch.nn.Module) -> int:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        v = getattr(text, "vocab_size", None)
        if isinstance(v, int):
            return v
    raise ValueError(
        f"cannot read the vocabulary size of {type(model).__name__}: it has neither an output "
        f"embedding (get_output_embeddings) nor config.vocab_size"
    )


def _max_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else 0


def check_same_vocab(
    teacher: torch.nn.Module,
    student: torch.nn.Module | None = None,
    *,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> None:
    """Refuse a teacher whose vocabulary differs from the student's.

    Per-token reference losses need a one-to-one token mapping between teacher and student: with a
    different tokenizer the same text splits into different tokens and the reference loss at a
    position is mathematically invalid (ReGATE paper, Appendix A.2).

    Rules: two tokenizers given must have identical vocabularies (token -> id); without both,
    teacher and student must have output layers of the same size; every given tokenizer's ids must
    fit the output layers. Output layers of different sizes are accepted only when both tokenizers
    prove the vocabularies equal (padded embedding matrices, e.g. Qwen2-1.5B vs Qwen2-7B).

    Raises:
        ValueError: the vocabularies differ or cannot be compared.
    """
    why = "(the per-token reference loss needs the same tokenizer; ReGATE paper, Appendix A.2)"
    if student is None and (tokenizer is None or teacher_tokenizer is None):
        raise ValueError(
            "cannot verify the teacher's vocabulary: pass the student model (student=...) or both "
            f"tokenizers (tokenizer=..., teacher_tokenizer=...) {why}"
        )
    proven = False
    if tokenizer is not None and teacher_tokenizer is not None:
        a, b = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise ValueError(
                f"the teacher's tokenizer differs from the student's ({len(b)} vs {len(a)} tokens; e.g. {diff}) {why}"
            )
        proven = True
    t_rows = _vocab_rows(teacher)
    if student is not None:
        s_rows = _vocab_rows(student)
        if s_rows != t_rows and not proven:
            raise ValueError(
                f"the teacher's output layer has {t_rows} rows but the student's has {s_rows}: "
                f"their vocabularies differ {why}. If both use the same tokenizer with padded "
                f"embedding matrices, pass tokenizer=... and teacher_tokenizer=... to prove it"
            )
    for tok, name in ((tokenizer, "tokenizer"), (teacher_tokenizer, "teacher_tokenizer")):
        if tok is not None and _max_id(tok) > t_rows:
            raise ValueError(
                f"{name} has token ids up to {_max_id(tok) - 1} but the teacher's output layer "
                f"has only {t_rows} rows {why}"
            )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


class TextTeacher:
    """A frozen, text-only reference model that scores each position of a sequence.

    ``r[b, p] = -log p_ref(x[p + 1] | x~[<= p])`` where ``x~`` is the sequence with every visual
    token replaced by ``pad_token_id`` (same length, same positions). The target at ``p`` is
    ``labels[p + 1]``; positions whose prediction is not supervised get NaN.

    Build one with :func:`text_only_teacher` (from the MLLM being trained) or
    :func:`causal_lm_teacher` (any causal LM that shares the tokenizer).

    Args:
        model: a Hugging Face model whose forward takes ``input_ids``/``attention_mask`` and
            returns ``.logits``; not modified (training flags are restored after each call).
        pad_token_id: placeholder for visual tokens.
        visual_token_ids: ids replaced by the placeholder.
        mode: ``"model"`` (call the model's forward) or ``"decoder"`` (``get_decoder()`` +
            ``get_output_embeddings()``); see the module docstring.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int | None,
        visual_token_ids: tuple[int, ...] | list[int] = (),
        mode: str = "model",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "decoder":
            for name in ("get_decoder", "get_output_embeddings"):
                if not callable(getattr(model, name, None)) or getattr(model, name)() is None:
                    raise ValueError(
                        f"mode='decoder' needs model.{name}(); {type(model).__name__} has none. Use mode='model'"
                    )
        self.visual_token_ids = tuple(sorted(set(int(i) for i in visual_token_ids)))
        if pad_token_id is None and self.visual_token_ids:
            raise ValueError(
                "the teacher needs a placeholder for visual tokens: pass pad_token_id=... (the "
                "paper replaces visual tokens by the pad token; the model's config has none)"
            )
        self.model = model
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.mode = mode
        self.vocab_size = _vocab_rows(model)

    @property
    def device(self) -> torch.device:
        """Device of the teacher's parameters."""
        return next(self.model.parameters()).device

    def _modules_for_hash(self) -> dict[str, torch.nn.Module]:
        """The modules whose weights the teacher runs.

        The language model and its heads (``get_decoder()``, ``get_input_embeddings()``,
        ``get_output_embeddings()``, all their weights), plus the own weights of every other module a
        text-only forward calls. A vision tower and projector are never called without pixel inputs,
        so they are left out: two MLLMs with the same language model share a cache.
        """
        mods: dict[str, torch.nn.Module] = {}
        for name in ("get_decoder", "get_input_embeddings", "get_output_embeddings"):
            get = getattr(self.model, name, None)
            m = get() if callable(get) else None
            if isinstance(m, torch.nn.Module):
                mods[name[4:]] = m
        covered = {id(p) for m in mods.values() for p in [*m.parameters(), *m.buffers()]}
        called: list[torch.nn.Module] = []
        hooks = [m.register_forward_pre_hook(lambda mod, _args: called.append(mod)) for m in self.model.modules()]
        try:
            tok = 0 if self.pad_token_id is None else self.pad_token_id
            ids = torch.full((1, 2), tok, dtype=torch.long, device=self.device)
            with torch.no_grad(), _eval_mode(self.model):
                self._hidden_or_logits(ids, torch.ones_like(ids))
        finally:
            for hk in hooks:
                hk.remove()
        names = {id(m): n for n, m in self.model.named_modules()}
        for m in called:
            own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if any(id(t) not in covered for t in own):
                mods[f"direct:{names.get(id(m), type(m).__name__)}"] = m
                covered.update(id(t) for t in own)
        return mods or {"model": self.model}

    def _fingerprint_extra(self) -> dict:
        return {
            "kind": "regate_fx.TextTeacher",
            "version": 2,
            "pad_token_id": self.pad_token_id,
            "visual_token_ids": list(self.visual_token_ids),
            "mode": self.mode,
        }

    def fingerprint(self) -> str:
        """SHA-256 of the weights the teacher runs (every byte), its placeholder settings and mode."""
        return weights_fingerprint(self._modules_for_hash(), self._fingerprint_extra())

    def probe(self) -> str:
        """A cheap fingerprint of the same weights (a sample of each tensor; see :func:`weights_probe`).

        :meth:`TeacherCache.open` and :meth:`TeacherCache.compute` on a complete cache compare this
        one by default, so reopening a cache for a 7B teacher reads a few KB of weights, not 14 GB.
        """
        return weights_probe(self._modules_for_hash(), self._fingerprint_extra())

    def text_only_ids(
        self, input_ids: torch.Tensor, real: torch.Tensor, visual_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x~``: ``input_ids`` with visual tokens (by id or ``visual_mask``) replaced by the pad."""
        vis = protected_mask(input_ids, real, self.visual_token_ids, [visual_mask])  # (B, T)
        if not vis.any():
            return input_ids
        if self.pad_token_id is None:
            raise ValueError("the batch has visual positions but the teacher has no pad_token_id")
        return torch.where(vis, torch.full_like(input_ids, self.pad_token_id), input_ids)

    def _hidden_or_logits(self, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        if self.mode == "model":
            return self.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        out = getattr(self.model, "get_decoder")()(input_ids=ids, attention_mask=am, use_cache=False)
        return out.last_hidden_state

    def reference_losses(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-position reference losses of one batch, under ``torch.no_grad`` in eval mode.

        Args:
            input_ids: long ``[B, T]`` (the student's ids, visual tokens included).
            attention_mask: ``[B, T]``, 1 = real token.
            labels: long ``[B, T]`` unshifted, -100 = ignore (default: every real token).
            visual_mask: optional bool ``[B, T]`` of visual positions beyond the visual ids.

        Returns:
            Float32 ``[B, T]`` on the CPU: ``r`` at supervised positions, NaN elsewhere.
        """
        dev = self.device
        ids = input_ids.to(dev)
        real = real_mask(ids, None if attention_mask is None else attention_mask.to(dev))
        if labels is None:
            labels = default_labels(ids, real)
        labels = labels.to(dev)
        vmask = None if visual_mask is None else visual_mask.to(dev)
        x = self.text_only_ids(ids, real, vmask)  # (B, T)
        sup = supervised_mask(labels, real)  # (B, T)
        targets = torch.zeros_like(labels)
        targets[:, :-1] = labels[:, 1:]  # (B, T): target of the prediction at p
        out = torch.full(ids.shape, float("nan"), dtype=torch.float32)
        b_idx, p_idx = sup.nonzero(as_tuple=True)  # (n,), (n,)
        with torch.no_grad(), _eval_mode(self.model):
            z = self._hidden_or_logits(x, real.long())  # (B, T, V) or (B, T, H)
            head = getattr(self.model, "get_output_embeddings")() if self.mode == "decoder" else None
            losses = []
            for s in range(0, b_idx.numel(), _CE_CHUNK):
                zb = z[b_idx[s : s + _CE_CHUNK], p_idx[s : s + _CE_CHUNK]]  # (c, V|H)
                logits = head(zb) if head is not None else zb  # (c, V)
                tgt = targets[b_idx[s : s + _CE_CHUNK], p_idx[s : s + _CE_CHUNK]]  # (c,)
                if (tgt < 0).any() or (tgt >= logits.shape[-1]).any():
                    raise ValueError(f"a label id is outside the teacher's vocabulary of {logits.shape[-1]}")
                losses.append(F.cross_entropy(logits.float(), tgt, reduction="none").cpu())
        if losses:
            out[b_idx.cpu(), p_idx.cpu()] = torch.cat(losses)
        return out


def _resolve_pad(model: torch.nn.Module, pad_token_id: int | None, tokenizer: Any) -> int | None:
    if pad_token_id is not None:
        return int(pad_token_id)
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    cfg = getattr(model, "config", None)
    for c in (cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None, cfg):
        v = getattr(c, "pad_token_id", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def text_only_teacher(
    mllm: torch.nn.Module,
    *,
    pad_token_id: int | None = None,
    visual_token_ids: tuple[int, ...] | list[int] | None = None,
    tokenizer: Any = None,
    mode: str = "model",
) -> TextTeacher:
    """Derive the text-only teacher from an MLLM (paper Sec. 3.1): its language model and head.

    Visual tokens are replaced by the pad token, so the sequence keeps its length and positions.
    The MLLM is used as is (no copy): compute the teacher cache *before* training it.

    Args:
        mllm: a Hugging Face MLLM (or any causal LM).
        pad_token_id: placeholder id (default: the tokenizer's, else the config's pad token).
        visual_token_ids: visual placeholder ids (default: from the config's ``image_token_id``,
            ``video_token_id``, ...).
        tokenizer: optional, for the pad token id.
        mode: ``"model"`` or ``"decoder"`` (see :class:`TextTeacher`).
    """
    if visual_token_ids is None:
        visual_token_ids = visual_token_ids_from_config(getattr(mllm, "config", None))
    return TextTeacher(
        mllm,
        pad_token_id=_resolve_pad(mllm, pad_token_id, tokenizer),
        visual_token_ids=visual_token_ids,
        mode=mode,
    )


def causal_lm_teacher(
    lm: torch.nn.Module,
    *,
    student: torch.nn.Module | None = None,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    pad_token_id: int | None = None,
    visual_token_ids: tuple[int, ...] | list[int] | None = None,
    mode: str = "model",
) -> TextTeacher:
    """Use any causal LM that shares the student's tokenizer as the teacher.

    Args:
        lm: the teacher causal LM.
        student: the student model (for the vocabulary check and its visual token ids).
        tokenizer: the student's tokenizer (optional).
        teacher_tokenizer: the teacher's tokenizer (optional; with ``tokenizer``, compared).
        pad_token_id: placeholder id (default: tokenizer's, then the teacher's config).
        visual_token_ids: default: from the student's config.
        mode: ``"model"`` or ``"decoder"``.

    Raises:
        ValueError: the vocabularies differ (see :func:`check_same_vocab`).
    """
    check_same_vocab(lm, student, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
    if visual_token_ids is None:
        visual_token_ids = visual_token_ids_from_config(getattr(student, "config", None))
    pad = _resolve_pad(lm, pad_token_id, tokenizer)
    if pad is None and student is not None:
        pad = _resolve_pad(student, None, None)
    return TextTeacher(lm, pad_token_id=pad, visual_token_ids=visual_token_ids, mode=mode)
