"""``ReGate``: the per-step keep mask and the student-difficulty update.

```python
rg = ReGate(config, num_samples=len(dataset), teacher_cache=cache)
for step, batch in enumerate(loader):            # batch["sample_id"]: LongTensor [B]
    keep = rg.keep_mask(batch, step)              # bool [B, T]
    out = smodel(**model_inputs(batch), keep_mask=keep)
    out.loss.backward(); opt.step(); opt.zero_grad()
    rg.update(batch, out.token_loss, keep)
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from regate_fx.runtime.cache import TeacherCache, token_checksums
from regate_fx.runtime.config import ReGateConfig
from regate_fx.runtime.schedule import _check_step, schedule_rho
from regate_fx.runtime.selection import (
    candidate_mask,
    default_labels,
    keep_from_scores,
    protected_mask,
    random_scores,
    real_mask,
    sample_positions,
    supervised_mask,
)
from regate_fx.runtime.store import DifficultyStore

__all__ = ["ReGate", "ReGateStateError", "ParsedBatch", "parse_batch"]

_FORMAT = "regate_fx.regate"
_VERSION = 1


class ReGateStateError(RuntimeError):
    """A keep mask was asked of a ReGate whose state is missing (a resume that did not restore it)."""


def first_sparse_step(config: ReGateConfig) -> int | None:
    """The first global step whose keep fraction is below 1 (None if every step is dense)."""
    for step in range(config.warmup_steps + config.cycle_steps + 1):
        if schedule_rho(config, step) < 1.0:
            return step
    return None


@dataclass(frozen=True)
class ParsedBatch:
    """The masks and indices the runtime derives from a batch (all ``[B, T]`` unless noted).

    Attributes:
        input_ids: long.
        real: bool, True at real tokens.
        sample_ids: long ``[B]``.
        positions: long in-sample positions (-1 at padding).
        lengths: long ``[B]``, real tokens per sample.
        supervised: bool, the prediction at p has a supervised, real target.
        protected: bool, always kept.
        candidates: bool, the set V (supervised and not protected).
    """

    input_ids: torch.Tensor
    real: torch.Tensor
    sample_ids: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    supervised: torch.Tensor
    protected: torch.Tensor
    candidates: torch.Tensor


def _tensor(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor | None:
    v = batch.get(key)
    if v is None:
        return None
    return (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).to(device)


def parse_batch(batch: Mapping[str, Any], config: ReGateConfig) -> ParsedBatch:
    """Derive real/supervised/protected/candidate masks and in-sample positions from a batch.

    Everything stays on the device of ``batch["input_ids"]``.
    """
    if "input_ids" not in batch:
        raise ValueError("the batch has no 'input_ids'")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [B, T] tensor")
    dev = ids.device
    key = config.sample_id_key
    sids = _tensor(batch, key, dev)
    if sids is None:
        raise ValueError(
            f"the batch has no {key!r}: ReGATE keys its state by sample id; add a LongTensor [B] "
            f"of dataset indices under {key!r} (ReGateConfig.sample_id_key)"
        )
    sids = sids.long().reshape(-1)
    if sids.numel() != ids.shape[0]:
        raise ValueError(f"batch[{key!r}] has {sids.numel()} ids for {ids.shape[0]} rows")
    real = real_mask(ids, _tensor(batch, "attention_mask", dev))  # (B, T)
    labels = _tensor(batch, "labels", dev)
    if labels is None:
        labels = default_labels(ids, real)
    elif labels.shape != ids.shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}; ReGATE "
            f"expects unshifted Hugging Face labels"
        )
    positions, lengths = sample_positions(real)  # (B, T), (B,)
    supervised = supervised_mask(labels, real)  # (B, T)
    modality = _tensor(batch, "mm_token_type_ids", dev)  # Qwen-VL processors: 0 text, 1 image, 2 video
    protected = protected_mask(
        ids,
        real,
        (*config.visual_token_ids, *config.special_token_ids),
        [
            _tensor(batch, "visual_mask", dev),
            _tensor(batch, "protected_mask", dev),
            None if modality is None or modality.shape != ids.shape else modality != 0,
        ],
    )  # (B, T)
    if config.keep_context:
        protected = protected | (real & ~supervised)
    return ParsedBatch(
        input_ids=ids,
        real=real,
        sample_ids=sids,
        positions=positions,
        lengths=lengths,
        supervised=supervised,
        protected=protected,
        candidates=candidate_mask(supervised, protected),
    )


class ReGate:
    """The ReGATE runtime: which tokens each step keeps, and the student's difficulty EMA.

    Args:
        config: a :class:`ReGateConfig`.
        num_samples: dataset size; sample ids are ``0 .. num_samples - 1``.
        teacher_cache: reference losses (required when ``config.lam > 0`` with regate selection).
        store_path: if given, the difficulty store is memory-mapped there (datasets larger than
            memory).
        distributed: synchronise :meth:`update` across ranks (None: whenever torch.distributed
            is initialised with more than one rank).
    """

    def __init__(
        self,
        config: ReGateConfig,
        num_samples: int,
        teacher_cache: TeacherCache | None = None,
        *,
        store_path: str | os.PathLike | None = None,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(config, ReGateConfig):
            raise ValueError(f"config must be a ReGateConfig, got {type(config).__name__}")
        if config.needs_reference and teacher_cache is None:
            raise ValueError(
                f"ReGateConfig.lam={config.lam} weights the teacher's reference losses, but no "
                f"teacher_cache was given: compute one with TeacherCache.compute(path, teacher, "
                f"dataset) and pass teacher_cache=..., or set lam=0 (student difficulty only)"
            )
        if teacher_cache is not None and teacher_cache.num_samples != num_samples:
            raise ValueError(
                f"the teacher cache holds {teacher_cache.num_samples} samples but num_samples="
                f"{num_samples}; use the cache of this dataset"
            )
        self.config = config
        self.num_samples = num_samples
        self.teacher_cache = teacher_cache
        capacity = int(teacher_cache.lengths.sum()) if teacher_cache is not None else 0
        self.store = DifficultyStore(
            num_samples, config.beta, path=store_path, capacity=capacity, distributed=distributed
        )
        # Guard against a resume that forgot the state: None until the first keep mask, then the
        # step this ReGate started at (or "restored" after load_state_dict / start_at).
        self._started: int | str | None = None

    # ------------------------------------------------------------------ schedule
    def rho(self, step: int) -> float:
        """Keep fraction of the candidates at global step ``step``."""
        return schedule_rho(self.config, step)

    def start_at(self, step: int) -> None:
        """Declare that this ReGate starts, with an empty state, at global step ``step``.

        Only needed to switch ReGATE on mid-training on purpose (e.g. after dense steps run
        without it): otherwise the first :meth:`keep_mask` of an empty ReGate must come no later
        than the schedule's first sparse step, because a later one is what a resume that did not
        restore :meth:`state_dict` looks like (see :class:`ReGateStateError`).
        """
        _check_step(step)
        self._started = "declared"

    def _check_started(self, step: int) -> None:
        if self._started is not None:
            return
        first = first_sparse_step(self.config)
        if self.store.num_updates == 0 and first is not None and step > first:
            raise ReGateStateError(
                f"ReGate.keep_mask(step={step}): this ReGate has an empty state (no update, nothing "
                f"loaded), but the schedule's first sparse step is {first}: this looks like a resumed run "
                f"that did not restore the ReGate state, whose difficulty EMA and token counts would "
                f"silently restart. Restore it with rg.load_state_dict(checkpoint['regate']) (saved "
                f"with rg.state_dict(); ReGateTrainer does both), or, to start ReGATE at step {step} "
                f"on purpose, call rg.start_at({step}) first"
            )
        self._started = step

    # ------------------------------------------------------------------ scoring
    def _check_cache(self, pb: ParsedBatch) -> None:
        if self.teacher_cache is not None:
            sums = token_checksums(pb.input_ids, pb.positions, pb.real)  # (B,)
            self.teacher_cache.check_batch(pb.sample_ids, pb.lengths, sums)

    def _scores(self, pb: ParsedBatch, step: int) -> torch.Tensor:
        dev = pb.input_ids.device
        if self.config.selection == "random":
            return random_scores(self.config.seed, step, pb.sample_ids, pb.positions)  # (B, T)
        lam = float(self.config.lam)
        d = self.store.gather(pb.sample_ids, pb.positions, pb.candidates).to(dev)  # (B, T)
        if lam == 0.0:
            # Student only: a position never observed is tried first.
            return torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
        assert self.teacher_cache is not None  # lam > 0 needs one: __init__ checked
        r = self.teacher_cache.lookup(pb.sample_ids, pb.positions, pb.candidates).to(dev)  # (B, T)
        if torch.isnan(r[pb.candidates]).any():
            raise ValueError(
                "the teacher cache has no reference loss at a candidate position: this batch "
                "supervises a token the cached labels did not; recompute the cache with the "
                "training labels"
            )
        if lam == 1.0:
            return r
        d = torch.where(torch.isnan(d), r, d)  # never observed: fall back to r (S = r)
        return lam * r + (1.0 - lam) * d

    def scores(self, batch: Mapping[str, Any], step: int = 0) -> torch.Tensor:
        """The selection scores ``[B, T]`` (float32, on the batch's device).

        ``S = lam * r + (1 - lam) * D`` for regate selection (``D`` never observed: ``r`` if
        ``lam > 0``, else +inf), the pseudo-random scores for random selection. Only candidate
        positions are meaningful.
        """
        step = _check_step(step)
        pb = parse_batch(batch, self.config)
        self._check_cache(pb)
        with torch.no_grad():
            return self._scores(pb, step)

    def keep_mask(self, batch: Mapping[str, Any], step: int) -> torch.Tensor:
        """Which positions step ``step`` computes: bool ``[B, T]`` on the batch's device.

        Protected positions (visual ids, special ids, ``visual_mask``, ``protected_mask``) are
        always kept, padding never; of the candidates V, ``ceil(rho * |V|)`` with the highest
        score are kept (ties: lower position first); at rho = 1 every real position is kept. A
        sample left with no position keeps its first real one (see
        :func:`~regate_fx.runtime.selection.keep_from_scores`).
        """
        step = _check_step(step)
        self._check_started(step)
        pb = parse_batch(batch, self.config)
        self._check_cache(pb)
        rho = self.rho(step)
        if rho == 1.0:
            return pb.real.clone()
        with torch.no_grad():
            s = self._scores(pb, step)  # (B, T)
            return keep_from_scores(s, pb.real, pb.protected, pb.candidates, rho)

    # ------------------------------------------------------------------ update
    def update(self, batch: Mapping[str, Any], token_loss: torch.Tensor, keep: torch.Tensor) -> None:
        """Fold the step's student losses into the difficulty EMA and count tokens.

        Only positions that were kept and whose prediction is supervised are updated. In a
        distributed run this is a collective (every rank calls it every step).

        Args:
            batch: the step's batch.
            token_loss: float ``[B, T]``, the student's CE of the prediction at each position
                (zero where not computed).
            keep: the step's keep mask, bool ``[B, T]``.
        """
        if token_loss is None:
            raise ValueError(
                "token_loss is None: the sparse step ran without labels, so it has no per-token loss "
                "to learn from. Pass labels=... to the model (unshifted, -100 = ignore, e.g. "
                "labels=input_ids.masked_fill(attention_mask == 0, -100))"
            )
        if not isinstance(token_loss, torch.Tensor) or not isinstance(keep, torch.Tensor):
            raise ValueError(
                f"token_loss and keep must be tensors, got {type(token_loss).__name__} and "
                f"{type(keep).__name__} (pass out.token_loss and the step's keep mask)"
            )
        pb = parse_batch(batch, self.config)
        shape = tuple(pb.real.shape)
        if tuple(token_loss.shape) != shape or tuple(keep.shape) != shape:
            raise ValueError(
                f"token_loss {tuple(token_loss.shape)} and keep {tuple(keep.shape)} must both have "
                f"the batch's shape {shape}"
            )
        keep = keep.to(pb.real.device, torch.bool) & pb.real  # (B, T)
        obs = keep & pb.supervised  # (B, T)
        rows = pb.sample_ids.view(-1, 1).expand_as(obs)  # (B, T)
        self.store.observe(
            pb.sample_ids,
            pb.lengths,
            rows[obs],
            pb.positions[obs],
            token_loss.detach().to(pb.real.device)[obs],
            processed=int(keep.sum()),
            dense=int(pb.real.sum()),
        )

    # ------------------------------------------------------------------ statistics
    @property
    def tokens_processed(self) -> int:
        """Real tokens computed so far (all ranks)."""
        return self.store.tokens_processed

    @property
    def tokens_dense(self) -> int:
        """Real tokens a dense run would have computed (all ranks)."""
        return self.store.tokens_dense

    def token_stats(self) -> dict[str, float]:
        """Tokens processed vs dense (the paper's "Tokens" column) and the kept fraction."""
        p, d = self.tokens_processed, self.tokens_dense
        frac = p / d if d else 1.0
        return {
            "tokens_processed": p,
            "tokens_dense": d,
            "kept_fraction": frac,
            "reduction": 1.0 - frac,
            "steps": self.store.num_updates,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config.to_dict(),
            "num_samples": self.num_samples,
            "teacher_fingerprint": None if self.teacher_cache is None else self.teacher_cache.teacher_fingerprint,
            "store": self.store.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a state from another config, dataset or teacher."""
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise ValueError(f"not a ReGate state (format {state.get('format')!r} version {state.get('version')!r})")
        saved = ReGateConfig.from_dict(dict(state["config"]))
        if saved != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in vars(saved).items() if getattr(self.config, k) != v}
            raise ValueError(f"the state was saved with another ReGateConfig: (saved, now) = {diff}")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"the state is for num_samples={state['num_samples']}, this ReGate has {self.num_samples}")
        fp = state.get("teacher_fingerprint")
        if fp is not None and self.teacher_cache is not None and fp != self.teacher_cache.teacher_fingerprint:
            raise ValueError("the state was recorded with another teacher cache (fingerprints differ)")
        self.store.load_state_dict(state["store"])
        self._started = "restored"
