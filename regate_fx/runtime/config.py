"""ReGATE runtime configuration: one validated dataclass.

Defaults marked "ours" are not the paper's: its values for C, C_d, rho_min and beta were lost from
its text. The reasons are in ``docs/runtime.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReGateConfig", "SCHEDULES", "SELECTIONS"]

SCHEDULES = ("dual_cycle", "constant")
SELECTIONS = ("regate", "random")


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"ReGateConfig.{name} {why}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ReGateConfig:
    """What the ReGATE runtime keeps, when, and how it scores.

    Attributes:
        schedule: ``"dual_cycle"`` (paper Sec. 3.2) or ``"constant"`` (``rho_min`` at every step
            after the warm-up).
        warmup_steps: W, dense steps before the first cycle (paper: 100).
        cycle_steps: C, length of one cycle in steps (ours: 10).
        dense_steps: C_d, dense steps at the start of each cycle (ours: 2, from the study).
        rho_min: fraction of candidate positions kept at a sparse step (ours: 0.2, from the study).
        beta: EMA decay of the student difficulty D (ours: 0.7).
        lam: weight of the reference loss in ``S = lam * r + (1 - lam) * D`` (paper Table 7: 0.5).
        selection: ``"regate"`` (top-k by S) or ``"random"`` (uniformly random positions at the
            same budget; the baseline to beat).
        seed: seed of the random selection (the selection is a hash of seed, step, sample id and
            position: deterministic, independent of batch composition and device).
        visual_token_ids: token ids of visual placeholders (``<image>``, ``<video>``, ...). Always
            kept, and replaced by the pad token for the teacher. :meth:`for_model` reads them (and
            the markers around them) from a Hugging Face MLLM's config. Positions a batch marks
            in ``visual_mask``, ``protected_mask`` or a non-zero ``mm_token_type_ids`` (the
            modality ids Qwen-VL processors return) are kept too.
        special_token_ids: other token ids that are always kept (role markers, ...).
        keep_context: if True (default, from the study: 0.653 vs 0.555 best validation accuracy
            over 3 seeds), every real position that is not a candidate (e.g. the prompt, whose next
            label is -100) is protected too, so kept answer tokens still see the question. False
            follows the paper's literal count ``protected + ceil(rho * |V|)``.
        sample_id_key: batch key holding the sample ids, a LongTensor ``[B]``.
    """

    schedule: str = "dual_cycle"
    warmup_steps: int = 100
    cycle_steps: int = 10
    dense_steps: int = 2
    rho_min: float = 0.2
    beta: float = 0.7
    lam: float = 0.5
    selection: str = "regate"
    seed: int = 0
    visual_token_ids: tuple[int, ...] = field(default_factory=tuple)
    special_token_ids: tuple[int, ...] = field(default_factory=tuple)
    keep_context: bool = True
    sample_id_key: str = "sample_id"

    def __post_init__(self) -> None:
        # Accept lists for the id fields but store tuples (hashable, frozen).
        for name in ("visual_token_ids", "special_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 0 for v in value):
                object.__setattr__(self, name, tuple(int(v) for v in value))
            else:
                raise _bad(name, value, "must be a tuple of non-negative ints")
        if self.schedule not in SCHEDULES:
            raise _bad("schedule", self.schedule, f"must be one of {SCHEDULES}")
        if self.selection not in SELECTIONS:
            raise _bad("selection", self.selection, f"must be one of {SELECTIONS}")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise _bad("warmup_steps", self.warmup_steps, "must be an int >= 0")
        if not (_is_int(self.cycle_steps) and self.cycle_steps >= 1):
            raise _bad("cycle_steps", self.cycle_steps, "must be an int >= 1")
        if not (_is_int(self.dense_steps) and 0 <= self.dense_steps <= self.cycle_steps):
            raise _bad(
                "dense_steps",
                self.dense_steps,
                f"must be an int in [0, cycle_steps={self.cycle_steps}]",
            )
        if not (_is_real(self.rho_min) and 0.0 < self.rho_min <= 1.0):
            raise _bad("rho_min", self.rho_min, "must be in (0, 1]")
        if not (_is_real(self.beta) and 0.0 <= self.beta < 1.0):
            raise _bad("beta", self.beta, "must be in [0, 1)")
        if not (_is_real(self.lam) and 0.0 <= self.lam <= 1.0):
            raise _bad("lam", self.lam, "must be in [0, 1]")
        if not _is_int(self.seed):
            raise _bad("seed", self.seed, "must be an int")
        if not isinstance(self.keep_context, bool):
            raise _bad("keep_context", self.keep_context, "must be a bool")
        if not (isinstance(self.sample_id_key, str) and self.sample_id_key):
            raise _bad("sample_id_key", self.sample_id_key, "must be a non-empty str")

    @classmethod
    def for_model(cls, model: Any, **fields: Any) -> "ReGateConfig":
        """A config whose protected tokens are read from `model`'s config (no ids to write down).

        ``visual_token_ids`` gets the config's image and video placeholder ids (``image_token_id``,
        ``image_token_index``, ``video_token_id``, ...); ``special_token_ids`` the markers around
        them (``vision_start_token_id``, ``boi_token_index``, ...). Ids passed in ``fields`` are
        added to them; every other field is passed through.

        Example:
            >>> cfg = ReGateConfig.for_model(qwen2_vl, rho_min=0.3)   # images and videos protected
        """
        from regate_fx.runtime.teacher import marker_token_ids_from_config, visual_token_ids_from_config

        mcfg = getattr(model, "config", None)
        visual = set(visual_token_ids_from_config(mcfg)) | set(fields.pop("visual_token_ids", ()))
        special = set(marker_token_ids_from_config(mcfg)) | set(fields.pop("special_token_ids", ()))
        return cls(visual_token_ids=tuple(sorted(visual)), special_token_ids=tuple(sorted(special)), **fields)

    @property
    def needs_reference(self) -> bool:
        """True when the score uses the teacher's reference losses (regate selection, lam > 0)."""
        return self.selection == "regate" and self.lam > 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the fields (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReGateConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ReGateConfig.from_dict: unknown fields {unknown}")
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs)
