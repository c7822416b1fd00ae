"""Every workaround for a torch or transformers internal, in one place, each with the version it is for.

A shim here is code that depends on how an upstream library behaves *inside* (a private setting, an
error's text, a function it looks up at call time, a loading path with a known gap). Each one names
the versions it was written against and has a test in ``tests/test_compat.py`` that fails loudly
when upstream changes under it, so the next release that removes the need (or breaks the shim) is
noticed on the day it is installed, not by a user. Nothing outside this module touches those
internals.

Shims:

- :func:`capture_settings`: dynamo settings scoped to the sparse step's own compile (torch 2.13), DDP's
  graph split off inside a DDP forward (:func:`one_graph_under_ddp`).
- :func:`needs_output_hooks` / :func:`install_output_hooks`: transformers' lazily installed
  output-capturing hooks (transformers 5.24-5.25).
- :func:`reload_renamed_weights`: Trainer's resume of checkpoints whose keys ``save_pretrained``
  renamed (transformers 5.24-5.25).

And one check that runs before any capture: :func:`check_environment`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
from typing import TYPE_CHECKING, Iterator, cast

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "UnsupportedEnvironment",
    "capture_settings",
    "check_environment",
    "install_output_hooks",
    "needs_output_hooks",
    "one_graph_under_ddp",
    "reload_renamed_weights",
]


# --- environment ----------------------------------------------------------------------------

SKIP_CHECK_ENV = "REGATE_FX_SKIP_VERSION_CHECK"
_CHECKED = ("torch", "transformers")


class UnsupportedEnvironment(RuntimeError):
    """The installed torch or transformers cannot run a sparse step; the message names the fix."""


def _requirements() -> dict[str, str]:
    """The version ranges regate-fx was installed with (pyproject.toml's, read from the installed
    metadata so that there is one source of truth); empty when regate_fx runs from a source tree
    that was not installed."""
    from importlib import metadata

    try:
        reqs = metadata.requires("regate-fx") or []
    except metadata.PackageNotFoundError:
        return {}
    from packaging.requirements import Requirement

    out = {}
    for line in reqs:
        r = Requirement(line)
        if r.marker is None and r.name in _CHECKED:
            out[r.name] = str(r.specifier)
    return out


@functools.lru_cache(maxsize=None)
def check_environment() -> None:
    """Refuse, before any capture, an environment a sparse step cannot run in.

    Checks that dynamo runs on this Python and torch build (``torch.compile`` is what captures the
    model), and that the installed torch and transformers are inside the range regate-fx declares
    (the versions its test suite passes on, ``docs/versions.md``). Set ``REGATE_FX_SKIP_VERSION_CHECK=1``
    to try a version outside the range at your own risk.

    Raises:
        UnsupportedEnvironment: what is wrong and the command that fixes it.
    """
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported

        supported = is_dynamo_supported()
    except Exception:  # noqa: BLE001 - an import failure is itself the answer
        supported = False
    if not supported:
        raise UnsupportedEnvironment(
            f"regate_fx: torch.compile (dynamo) is not supported by this torch build ({torch.__version__}) "
            f"on this Python; a sparse step is captured with dynamo. Install a torch build with torch.compile "
            f"support for this Python (pip install 'torch>=2.13,<2.14')."
        )
    if os.environ.get(SKIP_CHECK_ENV, "") not in ("", "0"):
        return
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for name, spec in _requirements().items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or not SpecifierSet(spec).contains(Version(found).base_version, prereleases=True):
            raise UnsupportedEnvironment(
                f"regate_fx: needs {name}{spec}, found {found or 'none'}. Install the tested range with "
                f"pip install '{name}{spec}' (for torch on a CPU machine pin the CPU build, e.g. "
                f"pip install torch==2.13.0, so that pip does not pull a CUDA build), or set "
                f"{SKIP_CHECK_ENV}=1 to try this version anyway."
            )


# --- dynamo settings for the sparse step's compile ------------------------------------------


@contextlib.contextmanager
def capture_settings() -> Iterator[None]:
    """Dynamo settings that hold while the sparse step is captured and compiled (torch 2.13).

    ``use_duck_shape=False`` (a private setting of ``torch.fx.experimental``): the kept length ``K``
    stays its own symbol, never unified with ``T`` when the two happen to be equal, so that the pass
    can tell the token axis from the kept axis (``passes/graph.py``).

    ``skip_fwd_side_effects_in_bwd_under_checkpoint``: under ``torch.utils.checkpoint`` dynamo
    refuses a checkpointed forward that changes Python state ("HOP: Unsafe side effect"), because
    *eager* checkpointing re-runs the Python forward in the backward and would apply the change a
    second time. transformers 5.25's hub-kernel wrappers do exactly that: the ``kernels`` package's
    ``new_forward`` sets and resets a context variable (``_ACTIVE_KERNEL_FUNCS``) around every
    decorated module's forward, so every checkpointed decoder layer failed to capture.

    Why skipping the replay is exact here (not an approximation): the pass inlines every
    checkpointed body into the one flat graph (``passes/checkpoint.py``) and AOTAutograd's
    partitioner recomputes the tagged *graph ops* in the backward. No Python runs in the backward,
    so there is no second application to skip: the recomputation executes the very ops the
    forward traced, with whatever the Python state selected at trace time baked in. The step
    therefore computes what the same step without checkpointing computes
    (``tests/test_compile_ckpt.py`` proves it with a wrapper whose Python state changes the
    output). The state change itself happens once per step, as dynamo replays side effects after
    the graph runs, as it would without checkpointing.

    Inside a DDP forward, ``optimize_ddp`` is off too (:func:`one_graph_under_ddp`).

    The settings are set and restored directly: ``config.patch`` costs about 0.1 ms per call, and
    this runs on every step.
    """
    settings = [
        (torch.fx.experimental._config, "use_duck_shape", False),
        (torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True),
    ]
    if one_graph_under_ddp():
        settings.append((torch._dynamo.config, "optimize_ddp", False))
    old = [getattr(mod, name) for mod, name, _ in settings]
    for mod, name, value in settings:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for (mod, name, _), value in zip(settings, old):
            setattr(mod, name, value)


def _inside_ddp_forward() -> bool:
    return getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None) is not None


def one_graph_under_ddp() -> bool:
    """Whether :func:`capture_settings` turns ``optimize_ddp`` off now (for tests and the guard's message).

    Dynamo reads ``torch._dynamo.config.optimize_ddp`` when it converts a frame (``convert_frame``,
    on a cache miss): in its default mode (``"ddp_optimizer"``) and inside a DDP forward
    (``DistributedDataParallel._active_ddp_module``, torch 2.13), it splits the captured graph
    at DDP's gradient bucket boundaries (the first at 1 MiB of parameters) and compiles each piece
    with the backend. No piece holds the whole residual stream and the kept layout, so none
    could be rewritten: the step would run dense. Off, the step is one graph. DDP itself is
    unchanged: its reducer's hooks on every parameter's gradient accumulation still fire and
    all-reduce each bucket as it fills. What the split bought is overlap under an AOTAutograd
    backend (aot_eager, inductor), whose backward is one node that yields every weight gradient
    at its end: the buckets are then all-reduced after the step's backward instead of during it
    (the eager backend's backward is op by op and overlaps as before). The other modes
    (``"python_reducer"``, off) never split. Outside a DDP forward nothing is changed.
    """
    return _inside_ddp_forward() and torch._dynamo.config.optimize_ddp in (True, "ddp_optimizer")


# --- transformers' output-capturing hooks (transformers 5.24-5.25) ---------------------------


def needs_output_hooks(e: BaseException) -> bool:
    """Whether a capture stopped where transformers installs its output-capturing hooks.

    A model (or a vision tower, or a wrapper) that asks for ``output_hidden_states`` /
    ``output_attentions`` inside its forward makes transformers install the hooks on first use,
    under a threading.Lock dynamo cannot enter (``transformers/utils/output_capturing.py``). The
    sparse step then installs them eagerly (:func:`install_output_hooks`) and captures again. They
    are not installed up front: every hooked module (each decoder layer and attention) makes dynamo
    trace ``Module.__call__``'s hook path, 0.45 s of a 24-layer capture for nothing when no output
    is requested. Recognised by the file and the lock in dynamo's message (the shim's test checks
    that transformers still fails this way).
    """
    return "output_capturing.py" in str(e) and "lock" in str(e)


def install_output_hooks(model: nn.Module) -> None:
    """Install transformers' output-capturing hooks, exactly once (see :func:`needs_output_hooks`).

    transformers' installer (``install_all_output_capturing_hooks``, which
    ``recursively_install_hooks`` looks up in its module at call time) recurses into sub-models
    without checking whether they already carry hooks: after an eager call of a LLaVA model (which
    hooks its vision tower), installing on the outer model would hook every vision layer twice,
    and the duplicated hidden states select None as the image features (``linear(): argument
    'input' must be Tensor, not NoneType`` in the projector, in eager calls too). For the length of
    this call the module's installer is replaced by one that skips sub-models already hooked.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils import output_capturing as oc
    except ImportError:  # a transformers without lazy hooks
        return
    if not hasattr(oc, "install_all_output_capturing_hooks"):
        return
    original = oc.install_all_output_capturing_hooks

    def once(module, prefix=None):
        if not getattr(module, "_output_capturing_hooks_installed", False):
            original(module, prefix=prefix)

    oc.install_all_output_capturing_hooks = once
    try:
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                oc.maybe_install_capturing_hooks(module)
    finally:
        oc.install_all_output_capturing_hooks = original


# --- Trainer resume of renamed checkpoints (transformers 5.24-5.25) ---------------------------


def reload_renamed_weights(model: nn.Module, checkpoint: str) -> None:
    """Finish loading a checkpoint that ``save_pretrained`` wrote with renamed keys.

    ``Trainer._load_from_checkpoint`` (transformers 5.24-5.25) reads ``model.safetensors`` with
    ``load_state_dict(strict=False)`` and does not undo the key renames ``save_pretrained`` applies
    to models with a conversion mapping (LLaVA and other MLLMs): their weights are skipped without
    an error and a resumed run silently continues from its initial weights. Here the renames are
    applied as ``from_pretrained`` applies them, and a checkpoint that still does not cover the
    model is an error.
    """
    from safetensors.torch import load_file

    target = model
    while hasattr(target, "module") and isinstance(target.module, nn.Module):  # DDP
        target = target.module
    files = sorted(glob.glob(os.path.join(checkpoint, "model*.safetensors")))
    if not files or not hasattr(target, "base_model_prefix") or type(target).__name__.startswith("Peft"):
        return  # adapters, FSDP and .bin checkpoints: the parent's loading path
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # another transformers: nothing renamed
        return
    conv = get_model_conversion_mapping(cast("PreTrainedModel", target))  # it has base_model_prefix
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    own = target.state_dict()
    prefix: str = getattr(target, "base_model_prefix")
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(f, device="cpu").items():
            loaded[rename_source_key(k, renamings, converters, prefix, own)[0]] = v
    missing = sorted(k for k in own if k not in loaded and not _tied(target, k))
    unknown = sorted(set(loaded) - set(own))
    if missing or unknown:
        raise RuntimeError(
            f"cannot restore the model weights from {checkpoint}: after the checkpoint's key renames, "
            f"{len(missing)} weights are missing (e.g. {missing[:3]}) and {len(unknown)} are unknown "
            f"(e.g. {unknown[:3]})"
        )
    target.load_state_dict(loaded, strict=False)


def _tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a weight tied to another one (not saved by save_pretrained)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
