"""regate_fx: ReGATE token elision for any Hugging Face decoder, as a torch.compile graph pass.

Two halves:
    graph side   sparsify() -> passes/: capture (dynamo) -> analyse -> rewrite -> compile
    runtime side runtime/: scoring, dual-cycle schedule, selection, teacher cache
"""

from regate_fx import runtime
from regate_fx.errors import KeepMaskError, RewriteError
from regate_fx.report import BranchKind, BranchRecord, GraphReport, Reason, RewriteReport
from regate_fx.runtime import *  # noqa: F401,F403
from regate_fx.sparse import (
    KeptLayout,
    PackedLayout,
    ReGateOutput,
    SparseForward,
    SparsifyConfig,
    counted_predictions,
    is_sparsified,
    kept_layout,
    packed_layout,
    sparse_forward,
    sparsify,
    unsparsify,
)
from regate_fx.verify import oracle

__all__ = [
    "BranchKind",
    "BranchRecord",
    "GraphReport",
    "KeepMaskError",
    "KeptLayout",
    "PackedLayout",
    "Reason",
    "ReGateOutput",
    "RewriteError",
    "RewriteReport",
    "SparseForward",
    "SparsifyConfig",
    "counted_predictions",
    "is_sparsified",
    "kept_layout",
    "packed_layout",
    "oracle",
    "sparse_forward",
    "sparsify",
    "unsparsify",
    *runtime.__all__,
    "ReGateTrainer",  # noqa: F405 (lazy, see __getattr__)
    "ReGateTrainerMixin",  # noqa: F405
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
