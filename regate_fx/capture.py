"""What dynamo captures for a sparse step: the whole model, or its decoder and LM head.

``sparsify`` compiles a step function around a callable and the keyword arguments it is called
with. This module decides which callable and which arguments (``Capture.prepare``), marks the
batch and token axes of those arguments dynamic (``mark_token_axes``), and turns a failed capture
into a :class:`~regate_fx.RewriteError` that names the module where dynamo stopped
(``capture_error``).

Two modes (``SparsifyConfig.capture``):

- ``"model"``: the model's own forward is captured, vision tower and all. One graph, but the
  multimodal front end of several families cannot be captured at all (Qwen2-VL's vision attention
  calls ``lengths.tolist()``, LLaVA-Next's anyres crop count comes from ``image_sizes``), and
  others specialise on the number of images.
- ``"decoder"``: the model's forward runs *eagerly* up to the call of its decoder
  (``model.get_decoder()``): the vision tower, the projector, the merge of image features into the
  embeddings and the position ids (M-RoPE included) are computed as the model computes them. A
  forward pre-hook on the decoder reads the arguments it is called with and stops the eager run
  there; the captured graph is then "decoder + LM head" (``model.get_output_embeddings()``) on
  those arguments. Gradients reach the vision tower and the projector through ``inputs_embeds``,
  which autograd connects across the compiled region. Before the first decoder-mode step, one
  dense forward checks that the LM head is applied to the decoder's output, and records what the
  forward does to the head's output before returning it as logits (``heads.py``: a logit scale,
  soft-capping, a cast; nothing when the logits are the head's output). The captured callable
  replays that post-head map after the head, so the graph pass proves it per position like the rest
  of the tail; a map that mixes positions, or one the recording cannot follow, is refused in this
  mode. The gathered execution checks the same on its first step's own forward
  (``Capture.head_probe``), running no forward of its own; there the model's own forward applies the
  map to the kept rows. A decoder that holds the LM head itself (a causal LM nested in the model,
  Kosmos-2.5) is looked through: its own ``get_decoder()`` is captured.
- ``"auto"`` (default): ``"decoder"`` for multimodal models (a config with a separate text
  config, e.g. ``config.text_config``), ``"model"`` otherwise.

About 500 lines on purpose: the two modes share the hooks, the head check and the capture
errors; split by mode, each half would need the other's.

Nothing here knows a model family: the hooks are ``get_decoder()``, ``get_output_embeddings()``,
the decoder's forward signature and the shapes of what it receives.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
from typing import Any, Callable, Iterable, Iterator, cast

import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutput

from regate_fx.errors import RewriteError
from regate_fx.heads import PostHead, PostHeadError, PostHeadRecorder

__all__ = ["CAPTURE_MODES", "Capture", "capture_error", "mark_token_axes"]

CAPTURE_MODES = ("auto", "model", "decoder")


# --- dynamic axes ---------------------------------------------------------------------------


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def token_axes(t: torch.Tensor, batch: int, seq: int) -> tuple[list[int], list[int]]:
    """(batch dims, token dims) of one input, read from its shape.

    Token axes of integer and boolean inputs (ids, padding masks, position ids in any layout:
    (B, T), (1, T), (3, B, T) M-RoPE, (4, B, T)) are every dim of size T after the first, and dim 0
    when the tensor is 1-D; a floating-point input is token-indexed when it is (B, T, ...)
    (``inputs_embeds``) or a 4-D mask (B, h, T, T) / (B, h, T, N). The batch axis is dim 0, or for
    integer inputs the last dim of size B before the token axis (dim 1 of (3, B, T)).
    """
    shape = tuple(t.shape)
    if not shape:
        return [], []
    if t.is_floating_point() or t.is_complex():
        if len(shape) >= 3 and shape[0] == batch and shape[1] == seq:
            toks = [1]
        elif len(shape) == 4 and shape[0] == batch:  # (B, h, T, T) masks, (B, 1, T, N) cross-attention masks
            toks = [d for d in (2, 3) if shape[d] == seq]
        else:
            toks = []
    else:
        toks = [d for d in range(len(shape)) if shape[d] == seq and (d > 0 or len(shape) == 1)]
    if not toks or t.is_floating_point() or t.is_complex():
        bat = [0] if shape[0] == batch else []  # also per-sample inputs without a token axis (pixel_values, ...)
    else:  # (B, T), or (3, B, T): the last dim of size B before the token axis
        bat = [d for d in range(toks[0]) if shape[d] == batch][-1:]
    return bat, toks


def mark_token_axes(values: Iterable[Any], batch: int, seq: int) -> None:
    """Mark the batch and token axes of every tensor in `values` (nested in dicts / lists too)
    dynamic, so that one graph serves every batch size and sequence length.

    Not called while dynamo traces (a user who compiles the sparse model): marking is forbidden
    there, and the outer compile marks its own inputs.
    """
    if torch.compiler.is_compiling():
        return
    for v in values:
        for t in _tensors(v):
            bat, toks = token_axes(t, batch, seq)
            for d in bat + toks:
                if t.shape[d] >= 2:  # sizes 0/1 are always specialised
                    torch._dynamo.maybe_mark_dynamic(t, d)


# --- decoder capture ------------------------------------------------------------------------

_DECODER_MASK = "_regate_decoder_attention_mask"  # the decoder's own mask, when it is not the 2-D input


class _Stop(Exception):
    """Raised by the decoder's pre-hook: the eager run has computed what the decoder receives."""

    def __init__(self, kwargs: dict):
        super().__init__("regate_fx: decoder inputs captured")
        self.kwargs = kwargs


def is_multimodal(model: nn.Module) -> bool:
    """Whether the model's config nests a separate text config (LLaVA, Qwen2-VL, Gemma3, ...)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    if not callable(get):
        return False
    try:
        text = get(decoder=True)
    except TypeError:
        text = get()
    return text is not None and text is not cfg


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return name
    return None


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _DecoderHead(nn.Module):
    """The callable captured in decoder mode: the model's decoder, then its LM head.

    Its children *are* the model's children (the same dict), so module paths in the graph, the
    report and error messages are the model's own (``model.language_model.layers.0.self_attn``).
    Not registered anywhere: it owns no parameters of its own.
    """

    def __init__(self, model: nn.Module, decoder_path: str, head_path: str, use_cache: bool):
        super().__init__()
        self.__dict__["_modules"] = model._modules
        self._decoder_path = tuple(decoder_path.split("."))
        self._head_path = tuple(head_path.split("."))
        self._use_cache = use_cache
        self._post: PostHead | None = None  # the forward's post-head map (heads.py), once checked

    def _get(self, path: tuple[str, ...]) -> nn.Module:
        m = self
        for p in path:
            m = getattr(m, p)
        return m

    def forward(self, use_cache: bool | None = None, **kwargs: Any) -> CausalLMOutput:
        if _DECODER_MASK in kwargs:
            kwargs["attention_mask"] = kwargs.pop(_DECODER_MASK)
        if use_cache is not None and self._use_cache:
            kwargs["use_cache"] = use_cache
        out = self._get(self._decoder_path)(**kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, D)
        logits = self._get(self._head_path)(hidden)  # (B, T, V)
        if self._post is not None:  # what the model's forward does after its head (a scale, soft-capping)
            logits = self._post(self, logits)
        return CausalLMOutput(logits=logits)


class Capture:
    """Which callable a step captures, with which arguments (see the module docstring).

    Args:
        model: the wrapped model.
        mode: ``"auto"``, ``"model"`` or ``"decoder"``.
        use_cache_kw: ``{"use_cache": False}`` when the model's forward takes it.
    """

    def __init__(self, model: nn.Module, mode: str, use_cache_kw: dict):
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
        self.model = model
        self.mode = ("decoder" if is_multimodal(model) else "model") if mode == "auto" else mode
        self._use_cache_kw = use_cache_kw
        self._wrapper: _DecoderHead | None = None
        self._head_checked = False

    def _decoder_and_head(self) -> tuple[nn.Module, str, str]:
        model = self.model
        get_dec = getattr(model, "get_decoder", None)
        get_head = getattr(model, "get_output_embeddings", None)
        dec = get_dec() if callable(get_dec) else None
        head = get_head() if callable(get_head) else None
        dec_path = _path_of(model, dec) if isinstance(dec, nn.Module) else None
        head_path = _path_of(model, head) if isinstance(head, nn.Module) else None
        while dec_path and head_path and head_path.startswith(dec_path + "."):
            # the "decoder" holds the head (a causal LM nested in the model: Llama 4's language_model,
            # Kosmos-2.5's text_model): capture its own decoder
            inner_get = getattr(dec, "get_decoder", None)
            inner = inner_get() if callable(inner_get) else None
            if not isinstance(inner, nn.Module) or inner is dec:  # its one other child with parameters
                rest = [
                    c
                    for n, c in cast(nn.Module, dec).named_children()
                    if not f"{head_path}.".startswith(f"{dec_path}.{n}.") and any(True for _ in c.parameters())
                ]
                inner = rest[0] if len(rest) == 1 else None
            if not isinstance(inner, nn.Module) or inner is dec:
                raise RewriteError(
                    f"regate_fx: capture='decoder': {type(model).__name__}'s decoder ({dec_path}) holds its LM "
                    f"head ({head_path}) and names no decoder of its own (get_decoder(), or one other child with "
                    "parameters); use SparsifyConfig(capture='model') to capture the whole model"
                )
            dec, dec_path = inner, _path_of(model, inner)
        if not dec_path or not head_path:
            raise RewriteError(
                f"regate_fx: capture='decoder' needs model.get_decoder() and model.get_output_embeddings() "
                f"to return submodules of {type(model).__name__} (got {type(dec).__name__} and "
                f"{type(head).__name__}); use SparsifyConfig(capture='model') to capture the whole model"
            )
        return cast(nn.Module, dec), dec_path, head_path  # a module: it has a path

    @property
    def wrapper(self) -> _DecoderHead:
        if self._wrapper is None:
            dec, dec_path, head_path = self._decoder_and_head()
            self._wrapper = _DecoderHead(self.model, dec_path, head_path, _accepts(dec.forward, "use_cache"))
        return self._wrapper

    def prepare(self, inputs: dict, seq: torch.Tensor) -> tuple[nn.Module, dict, torch.Tensor]:
        """(callable to capture, its keyword arguments, the tensor that carries the token axis)."""
        if self.mode == "model":
            return self.model, inputs, seq
        wrapper = self.wrapper
        if not self._head_checked:
            wrapper._post = self._check_head(inputs)
            self._head_checked = True
        kwargs = self._decoder_kwargs(inputs)
        dec_seq = kwargs.get("inputs_embeds")
        if not isinstance(dec_seq, torch.Tensor):
            dec_seq = kwargs.get("input_ids")
        dec_path = ".".join(wrapper._decoder_path)
        if not isinstance(dec_seq, torch.Tensor) or tuple(dec_seq.shape[:2]) != tuple(seq.shape[:2]):
            got = None if not isinstance(dec_seq, torch.Tensor) else tuple(dec_seq.shape[:2])
            raise RewriteError(
                f"regate_fx: the decoder ({dec_path}) is called with {got} (batch, tokens) but the batch is "
                f"{tuple(seq.shape[:2])}: keep_mask positions cannot be mapped onto the decoder's tokens. "
                "Expand every image placeholder in input_ids (as the model's processor does), or use "
                "SparsifyConfig(capture='model')"
            )
        am = inputs.get("attention_mask")
        dec_am = kwargs.pop("attention_mask", None)
        if isinstance(am, torch.Tensor):
            kwargs["attention_mask"] = am  # the step's loss reads the (B, T) padding mask
        if dec_am is not None and dec_am is not am:
            kwargs[_DECODER_MASK] = dec_am
        return wrapper, kwargs, dec_seq

    def _decoder_kwargs(self, inputs: dict) -> dict:
        """Run the model eagerly until it calls its decoder; return the decoder's arguments."""
        dec = self.wrapper._get(self.wrapper._decoder_path)
        sig = inspect.signature(dec.forward)

        def stop(_module, args, kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            got = {}
            for name, value in bound.items():
                if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    got.update(value)
                else:
                    got[name] = value
            raise _Stop(got)

        handle = dec.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**inputs, **self._use_cache_kw)
        except _Stop as s:
            kwargs = s.kwargs
        else:
            raise RewriteError(
                f"regate_fx: {type(self.model).__name__}'s forward never called its decoder "
                f"({'.'.join(self.wrapper._decoder_path)}); use SparsifyConfig(capture='model')"
            )
        finally:
            handle.remove()
        kwargs.pop("use_cache", None)
        return kwargs

    def _check_head(self, inputs: dict) -> PostHead | None:
        """One dense forward: the LM head must be applied to the decoder's output; returns the
        forward's post-head map (None: the logits are the head's output)."""
        devices = [d for d in {p.device for p in self.model.parameters()} if d.type == "cuda"]
        with self.head_probe() as check:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                out = self.model(**inputs, **self._use_cache_kw)
        return check(out)

    @contextlib.contextmanager
    def head_probe(self) -> Iterator[Callable[[Any], PostHead | None]]:
        """Hooks on the decoder and the LM head while the block runs; yields ``check(out)``, which
        raises a RewriteError unless ``out.logits`` is the head applied to the decoder's output in
        that run, followed by a post-head map proven per position on the run's values (``heads.py``),
        and returns that map (None: the logits are the head's output). Runs no forward of its own: a
        caller can probe the forward it runs anyway (the gathered step probes its sparse step, so no
        module runs twice)."""
        wrapper = self.wrapper
        dec, head = wrapper._get(wrapper._decoder_path), wrapper._get(wrapper._head_path)
        seen: dict[str, Any] = {"decoder_calls": 0}
        recorder = PostHeadRecorder(self.model)

        def on_decoder(_m, _args, out):
            seen["decoder_calls"] += 1
            seen["hidden"] = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)

        def on_head(_m, args, out):
            seen["head_in"], seen["head_out"] = args[0] if args else None, out
            if isinstance(out, torch.Tensor):
                recorder.start(out)  # record what the forward computes from here (stopped below)

        def on_model(_m, _args, out):  # the forward returned: its root hooks are not part of it
            recorder.stop()  # (they run around a sparse call's output too)
            seen["logits"] = getattr(out, "logits", None)

        def check(out: Any) -> PostHead | None:
            recorder.stop()
            return self._verify_head(out, seen, recorder)

        handles = [
            dec.register_forward_hook(on_decoder),
            head.register_forward_hook(on_head),
            self.model.register_forward_hook(on_model, prepend=True),
        ]
        try:
            yield check
        finally:
            recorder.stop()
            for h in handles:
                h.remove()

    def _verify_head(self, out: Any, seen: dict, recorder: PostHeadRecorder) -> PostHead | None:
        wrapper = self.wrapper
        name, head_path, dec_path = (
            type(self.model).__name__,
            ".".join(wrapper._head_path),
            ".".join(wrapper._decoder_path),
        )
        logits, hidden, head_in, head_out = (
            seen["logits"] if "logits" in seen else getattr(out, "logits", None),
            seen.get("hidden"),
            seen.get("head_in"),
            seen.get("head_out"),
        )
        hint = "Use SparsifyConfig(capture='model') to capture the whole model."
        if not seen["decoder_calls"]:
            raise RewriteError(
                f"regate_fx: {name}'s forward never called its decoder ({dec_path}, model.get_decoder()): it "
                "computes its logits through other modules (an encoder-decoder model calls its encoder and decoder "
                f"stacks separately), so the decoder cannot be captured alone. {hint}"
            )
        with torch.no_grad():
            fed = (
                isinstance(hidden, torch.Tensor)
                and isinstance(head_in, torch.Tensor)
                and isinstance(head_out, torch.Tensor)
                and head_in.shape == hidden.shape
                and torch.equal(head_in, hidden)
            )
            same = (
                fed
                and isinstance(logits, torch.Tensor)
                and logits.shape == cast(torch.Tensor, head_out).shape
                and torch.equal(logits, cast(torch.Tensor, head_out).to(logits.dtype))
            )
        if same:
            return None
        if not fed:
            raise RewriteError(
                f"regate_fx: {name}'s LM head ({head_path}) is not applied to its decoder's ({dec_path}) output: "
                "its forward changes the decoder's output before the head (an extra norm or projection), so the "
                f"decoder cannot be captured alone. {hint}"
            )
        try:
            post = recorder.result(logits)
            post.check(wrapper, cast(torch.Tensor, head_out), cast(torch.Tensor, logits))
        except PostHeadError as e:
            raise RewriteError(
                f"regate_fx: {name}'s logits are not its LM head ({head_path}) applied to its decoder's ({dec_path}) "
                f"output, and what its forward does in between cannot be run on the kept positions alone: {e}. {hint}"
            ) from None
        return post


# --- capture failures -----------------------------------------------------------------------


def _user_frames(e: BaseException) -> list:
    """The model's frames where dynamo stopped, innermost last (from dynamo's own annotations)."""
    for err in (e, getattr(e, "inner_exception", None), e.__cause__, e.__context__):
        stack = getattr(err, "real_stack", None)
        if stack:
            return list(stack)
    return []


def _code_span(fn: Any) -> tuple[str, int, int] | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:
        lines, start = inspect.getsourcelines(code)
    except (OSError, TypeError):
        return None
    return os.path.abspath(code.co_filename), start, start + len(lines)


def _class_spans(cls: type) -> tuple[list, list]:
    """(file, first line, last line) of every function `cls` and its bases define, and of the
    decorator wrappers around them (a frame of `dynamic_rope_update`'s wrapper is the rotary
    module's forward, but the same wrapper decorates other classes: a weak match)."""
    strong, weak = [], []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for fn in vars(klass).values():
            if not callable(fn):
                continue
            inner = inspect.unwrap(fn)
            span = _code_span(inner)
            if span:
                strong.append(span)
            if inner is not fn and (span := _code_span(fn)):
                weak.append(span)
    return strong, weak


def _module_at(model: nn.Module, filename: str, lineno: int) -> str | None:
    """The path of the innermost module whose class defines the code at (filename, lineno); a
    decorator's wrapper counts when a single module matches it."""
    filename = os.path.abspath(filename)
    spans: dict[type, tuple] = {}
    strong, weak = [], []
    for name, m in model.named_modules():
        cls = type(m)
        if cls not in spans:
            spans[cls] = _class_spans(cls)
        hits = [any(f == filename and a <= lineno < b for f, a, b in group) for group in spans[cls]]
        if hits[0]:
            strong.append(name)
        elif hits[1]:
            weak.append(name)
    if strong:
        return max(strong, key=len)
    return weak[0] if len(weak) == 1 else None


def capture_error(e: BaseException, model: nn.Module, mode: str) -> RewriteError | None:
    """A RewriteError for a capture that dynamo could not complete, or None if `e` is not one.

    Names the module (its path in the model) and the source line where dynamo stopped, and says
    what to do: capture only the decoder (the model's front end then runs eagerly), or run dense.
    """
    from torch._dynamo import exc as dexc

    kinds = tuple(
        k
        for k in (
            getattr(dexc, "Unsupported", None),
            getattr(dexc, "UserError", None),
            getattr(dexc, "TorchRuntimeError", None),
            getattr(dexc, "InternalTorchDynamoError", None),
            getattr(dexc, "BackendCompilerFailed", None),
        )
        if k is not None
    )
    try:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        kinds += (GuardOnDataDependentSymNode,)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(e, kinds):
        return None
    frames = [f for f in _user_frames(e) if "regate_fx" not in f.filename]
    where, module = [], None
    for frame in reversed(frames):  # innermost first: the failing line, then up to its module
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where.append(f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: {line}")
        module = _module_at(model, frame.filename, frame.lineno)
        if module is not None:
            break
    first = str(e).strip().splitlines()
    cause = next((ln.strip() for ln in first if ln.strip()), type(e).__name__)
    target = f"module '{module}' ({type(model.get_submodule(module)).__name__})" if module else "the model's forward"
    if mode == "model" and module is not None and is_multimodal(model):
        todo = (
            "This part of the model runs before its decoder: let it run eagerly and capture only "
            "the decoder and LM head with SparsifyConfig(capture='decoder') (the default for "
            "multimodal models), or call the model without keep_mask (dense)."
        )
    elif mode == "decoder":
        todo = (
            "The decoder itself cannot be captured as one graph, so the ReGATE pass cannot "
            "analyse its residual stream; call the model without keep_mask (dense), or remove "
            "the construct dynamo names above from the decoder's forward."
        )
    else:
        todo = (
            "The pass needs the model as one graph to find its residual stream; call the model "
            "without keep_mask (dense), or remove the construct dynamo names above."
        )
    return RewriteError(
        f"regate_fx: dynamo could not capture {target} as a single graph ({type(e).__name__}: {cause})"
        + "".join(f"\n  at {w}" for w in where[:4])
        + f"\n{todo}\n\ndynamo's message:\n{str(e).strip()[:1500]}"
    )
