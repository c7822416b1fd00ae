"""regate_fx: ReGATE token elision for any Hugging Face decoder, as a torch.compile graph pass.

Two halves:
    graph side   sparsify() -> passes/: capture (dynamo) -> analyse -> rewrite -> compile
    runtime side runtime/: scoring, dual-cycle schedule, selection, teacher cache

``__all__`` is the API the README and docs/ use; every other name is importable from its module
(``regate_fx.report.BranchKind``, ``regate_fx.layouts.padded.kept_layout``, ...) but not advertised.
tests/test_api.py keeps the two in step.
"""

from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.report import BranchRecord, GraphReport, Reason, RewriteReport
from regate_fx.runtime import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    DifficultyStore,
    ReGate,
    ReGateCollator,
    ReGateConfig,
    ReGateStateError,
    TeacherCache,
    TextTeacher,
    budget,
    causal_lm_teacher,
    check_same_vocab,
    collate,
    constant_rho,
    dual_cycle_rho,
    keep_from_scores,
    load_checkpoint,
    mean_rho,
    model_inputs,
    random_scores,
    save_checkpoint,
    schedule_rho,
    select_topk,
    text_only_teacher,
)
from regate_fx.sparse import (
    ReGateOutput,
    SparseForward,
    SparsifyConfig,
    counted_predictions,
    is_sparsified,
    sparse_forward,
    sparsify,
    unsparsify,
)
from regate_fx.verify import oracle

__all__ = [
    # the graph side: sparsify a model, read what the pass did, check it against the oracle
    "sparsify",
    "unsparsify",
    "is_sparsified",
    "sparse_forward",
    "SparsifyConfig",
    "SparseForward",
    "ReGateOutput",
    "counted_predictions",
    "oracle",
    "RewriteReport",
    "GraphReport",
    "BranchRecord",
    "Reason",
    "RewriteError",
    "KeepMaskError",
    # the runtime (regate_fx.runtime.__all__, docs/runtime.md)
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "DifficultyStore",
    "ReGate",
    "ReGateCollator",
    "ReGateConfig",
    "ReGateStateError",
    "TeacherCache",
    "TextTeacher",
    "budget",
    "causal_lm_teacher",
    "check_same_vocab",
    "collate",
    "constant_rho",
    "dual_cycle_rho",
    "keep_from_scores",
    "load_checkpoint",
    "mean_rho",
    "model_inputs",
    "random_scores",
    "save_checkpoint",
    "schedule_rho",
    "select_topk",
    "text_only_teacher",
    # the trainer integrations, imported on first use (see __getattr__); ReGateSFTTrainer too, but it
    # needs trl, so it is left out of `from regate_fx import *`
    "ReGateTrainer",
    "ReGateTrainerMixin",
]

_LAZY = {
    "ReGateTrainer": "regate_fx.integrations.trainer",
    "ReGateTrainerMixin": "regate_fx.integrations.trainer",
    "ReGateSFTTrainer": "regate_fx.integrations.trl",  # needs trl
}


def __getattr__(name: str):
    """The trainer integrations, imported on first use (transformers.Trainer, trl)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regate_fx' has no attribute {name!r}")


__version__ = "0.1.0"
