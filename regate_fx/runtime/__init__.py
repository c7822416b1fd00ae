"""ReGATE runtime: scoring, the dual-cycle schedule, selection and the teacher cache.

``__all__`` is the runtime API docs/runtime.md documents (regate_fx re-exports it); every other name
is importable from its module (``regate_fx.runtime.regate.parse_batch``,
``regate_fx.runtime.cache.dataset_fingerprint``, ...).
"""

from regate_fx.runtime.atomic import load_checkpoint, save_checkpoint
from regate_fx.runtime.cache import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    TeacherCache,
)
from regate_fx.runtime.config import ReGateConfig
from regate_fx.runtime.data import ReGateCollator, collate, model_inputs
from regate_fx.runtime.regate import ReGate, ReGateStateError
from regate_fx.runtime.schedule import (
    constant_rho,
    dual_cycle_rho,
    mean_rho,
    schedule_rho,
)
from regate_fx.runtime.selection import (
    budget,
    keep_from_scores,
    random_scores,
    select_topk,
)
from regate_fx.runtime.store import DifficultyStore
from regate_fx.runtime.teacher import (
    TextTeacher,
    causal_lm_teacher,
    check_same_vocab,
    text_only_teacher,
)

__all__ = [
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
]
