"""Hugging Face ``Trainer`` (and TRL) integration: :class:`ReGateTrainer`, :class:`ReGateTrainerMixin`.

```python
model = regate_fx.sparsify(model)                                   # in place: still the HF model
rg = regate_fx.ReGate(regate_fx.ReGateConfig(), num_samples=len(ds), teacher_cache=cache)
trainer = regate_fx.ReGateTrainer(model=model, args=args, train_dataset=ds, regate=rg)
trainer.train()                                                     # or resume_from_checkpoint=True
```

What the mixin changes in a Trainer, and why:

- **keep masks** (``get_batch_samples``): the Trainer prefetches the micro-batches of one optimizer
  step; each gets ``rg.keep_mask(batch, global_step)``, all from the state at the start of the
  step, so the masks of a step do not depend on how it is split into micro-batches.
- **the normaliser** (``num_items_in_batch``): the kept, supervised predictions of the whole
  accumulated batch (summed over ranks when ``average_tokens_across_devices``), so gradient
  accumulation over ``n`` micro-batches equals one batch ``n`` times as large.
- **the loss** (``compute_loss``): the sparse step's per-token losses summed and divided by that
  normaliser (``loss_is_scaled_for_ga = True``: the Trainer does not divide again), then
  ``rg.update`` for the micro-batch. Evaluation (``model.training`` False) calls the plain model,
  dense, through the parent class.
- **checkpoints**: ``regate_state.pt`` (atomic) in every ``checkpoint-N`` folder, written before the
  Trainer's own files; ``resume_from_checkpoint`` restores it, and refuses a checkpoint without it.
- **columns**: ``sample_id`` (and ``visual_mask`` / ``protected_mask``) survive
  ``remove_unused_columns``; a dataset without ``sample_id`` gets its row index; any data collator is
  wrapped so that the ids reach the batch.
- **logs**: ``regate/kept_fraction``, ``regate/tokens_processed``, ``regate/tokens_dense``,
  ``regate/rho`` next to the loss.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

import torch
import torch.nn as nn
from transformers import Trainer

from regate_fx.compat import reload_renamed_weights
from regate_fx.runtime.atomic import load_checkpoint, save_checkpoint
from regate_fx.runtime.data import ReGateCollator, model_inputs
from regate_fx.runtime.regate import ReGate
from regate_fx.sparse import ReGateOutput, counted_predictions, is_sparsified

__all__ = ["REGATE_STATE_NAME", "ReGateTrainer", "ReGateTrainerMixin", "with_sample_ids"]

REGATE_STATE_NAME = "regate_state.pt"
_STATE_FORMAT = "regate_fx.trainer_state"


class _WithSampleIds(torch.utils.data.Dataset):
    """A map-style dataset whose items also carry ``sample_id`` = their index."""

    def __init__(self, dataset: Sequence, key: str) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise ValueError(f"dataset item {i} is a {type(item).__name__}; ReGATE needs dict samples")
        return {**item, self.key: i}


def with_sample_ids(dataset: Any, key: str = "sample_id") -> Any:
    """``dataset`` with a ``sample_id`` per row (its index), unless its rows already have one.

    A ``datasets.Dataset`` gets a column; a map-style dataset (a list, a torch ``Dataset``) is wrapped.

    Raises:
        ValueError: an iterable dataset (no index); give its samples a ``sample_id`` yourself.
    """
    if dataset is None:
        return None
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):  # datasets.Dataset
        return dataset if key in names else dataset.add_column(key, list(range(len(dataset))))
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"the training dataset ({type(dataset).__name__}) has no index: give every sample a "
            f"{key!r} (its index in the dataset the teacher cache was computed on)"
        )
    if len(dataset) and isinstance(dataset[0], Mapping) and key in dataset[0]:
        return dataset
    return _WithSampleIds(dataset, key)


class _CarrySampleIds:
    """Wraps a data collator: takes ``sample_id`` out of the samples, collates the rest with the
    inner collator (which may not know the key), and puts the ids back into the batch."""

    def __init__(self, inner: Callable, key: str) -> None:
        self.inner, self.key = inner, key

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Any:
        have = [self.key in f for f in features]
        if not any(have):  # e.g. an evaluation set: nothing to carry
            return self.inner(features)
        if not all(have):
            raise ValueError(f"some samples of the batch have no {self.key!r}")
        ids = torch.tensor([int(f[self.key]) for f in features], dtype=torch.long)
        batch = self.inner([{k: v for k, v in f.items() if k != self.key} for f in features])
        batch[self.key] = ids
        return batch


def _pad_token_id(processing_class: Any, model: nn.Module | None) -> int:
    for src in (processing_class, getattr(processing_class, "tokenizer", None)):
        v = getattr(src, "pad_token_id", None)
        if isinstance(v, int):
            return v
    cfg = getattr(model, "config", None)
    for c in (cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else None, cfg):
        v = getattr(c, "pad_token_id", None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 0


if TYPE_CHECKING:  # the type checker sees the Trainer the mixin is mixed into
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class ReGateTrainerMixin(_TrainerBase):
    """Mix into a ``transformers.Trainer`` subclass (``class T(ReGateTrainerMixin, SFTTrainer)``) to
    train with ReGATE: see the module docstring for what it changes.

    Args:
        regate: the :class:`~regate_fx.ReGate` runtime, or a function ``(train_dataset) -> ReGate``
            called once the parent class has prepared the training set (TRL tokenizes it in its
            ``__init__``; compute the teacher cache on what it built).
        require_regate_state: refuse ``resume_from_checkpoint`` from a checkpoint that has no ReGate
            state (default). ``False`` resumes with this ReGate as it is (empty, unless you loaded
            one), i.e. restarts its difficulty EMA and token counts.
        *args, **kwargs: the parent Trainer's arguments. The model must be sparsified
            (:func:`regate_fx.sparsify`). Without a ``data_collator``, :class:`ReGateCollator`
            (padding with the tokenizer's or the config's pad id) is used.
    """

    # compute_loss divides by the kept supervised tokens of the whole accumulated batch
    loss_is_scaled_for_ga = True
    # without a data_collator, use ReGateCollator (False where the parent builds its own: TRL)
    regate_default_collator = True

    def __init__(
        self, *args: Any, regate: ReGate | Callable[[Any], ReGate], require_regate_state: bool = True, **kwargs: Any
    ) -> None:
        if regate is None or not (isinstance(regate, ReGate) or callable(regate)):
            raise TypeError("regate= must be a regate_fx.ReGate (or a function train_dataset -> ReGate)")
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module) and not any(is_sparsified(m) for m in model.modules()):
            raise ValueError(
                f"{type(self).__name__} needs a sparsified model: call model = regate_fx.sparsify(model) before "
                f"creating the trainer (a plain model would swallow the keep masks and train dense)"
            )
        key = regate.config.sample_id_key if isinstance(regate, ReGate) else "sample_id"
        self._regate_key = key
        if kwargs.get("data_collator") is None and self.regate_default_collator:
            kwargs["data_collator"] = ReGateCollator(
                pad_token_id=_pad_token_id(kwargs.get("processing_class"), model), sample_id_key=key
            )
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:
            self.train_dataset = with_sample_ids(self.train_dataset, key)
        self.regate = regate if isinstance(regate, ReGate) else regate(self.train_dataset)
        if not isinstance(self.regate, ReGate):
            raise TypeError(f"the regate factory returned a {type(self.regate).__name__}, not a ReGate")
        if self.regate.config.sample_id_key != key:
            raise ValueError("the ReGate's sample_id_key differs from the one the trainer was set up with")
        if not isinstance(self.data_collator, ReGateCollator):
            self.data_collator = _CarrySampleIds(self.data_collator, key)
        self.require_regate_state = require_regate_state

    # ------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        assert model is not None  # the Trainer has its model by now
        names = list(inspect.signature(model.forward).parameters)
        keep = [self._regate_key, "visual_mask", "protected_mask", *names]
        columns = cast(list, self._signature_columns)  # a list once the parent set it (just above)
        # transformers declares the attribute as None (it starts unset)
        self._signature_columns = list(dict.fromkeys([*columns, *keep]))  # type: ignore[assignment]

    # ------------------------------------------------------------------ keep masks and normaliser
    def _regate_check_batch(self, batch: Mapping[str, Any]) -> None:
        if self._regate_key not in batch:
            raise ValueError(
                f"the training batch has no {self._regate_key!r}: ReGATE keys its state by dataset index. Keep it "
                f"through the data pipeline (ReGateTrainer keeps it through remove_unused_columns and any "
                f"data_collator; a custom one must return it), keys now: {sorted(batch)}"
            )
        if batch.get("labels") is None:
            raise ValueError(
                "the training batch has no 'labels': a ReGATE step learns from the kept supervised tokens. Add "
                "labels (unshifted, -100 = ignore; e.g. input_ids with -100 on the prompt and padding)"
            )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step, each with its ``keep_mask``, and the normaliser:
        the kept supervised predictions of all of them (and of all ranks)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        step = self.state.global_step
        count = torch.zeros((), dtype=torch.long)
        for batch in batch_samples:
            self._regate_check_batch(batch)
            keep = self.regate.keep_mask(batch, step)  # (B, T) bool, from the state at the step's start
            batch["keep_mask"] = keep
            count = count + counted_predictions(keep, batch["labels"].to(keep.device)).sum().cpu()
        num_items = count.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.reshape(1)).sum()
        return batch_samples, num_items

    # ------------------------------------------------------------------ loss
    def _regate_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return model_inputs(inputs, self._regate_key)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Training: the sparse step, normalised by ``num_items_in_batch``, then ``rg.update``.
        Evaluation: the parent's loss on the plain (dense) model."""
        if not model.training:
            return super().compute_loss(
                model,
                self._regate_model_inputs(inputs),
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        keep = inputs.get("keep_mask")
        if keep is None:  # training_step called without get_batch_samples (e.g. by a subclass)
            self._regate_check_batch(inputs)
            keep = self.regate.keep_mask(inputs, self.state.global_step)
        self._regate_check_batch(inputs)
        outputs = model(**self._regate_model_inputs(inputs), keep_mask=keep)
        if not isinstance(outputs, ReGateOutput):
            raise RuntimeError(
                f"the model returned a {type(outputs).__name__} for a call with keep_mask, so the mask was ignored: "
                f"sparsify the model that the trainer calls (regate_fx.sparsify(model) before the trainer)"
            )
        token_loss = outputs.token_loss
        assert token_loss is not None  # the batch has labels (checked above): the step returns per-token losses
        self.regate.update(inputs, token_loss.detach(), keep)
        if num_items_in_batch is None:
            num_items_in_batch = counted_predictions(keep, inputs["labels"]).sum()
            scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            scale = 1.0
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                scale = float(self.accelerator.num_processes)  # DDP averages gradients over ranks
        denom = torch.as_tensor(num_items_in_batch, device=token_loss.device).clamp(min=1)
        loss = token_loss.sum() / denom * scale
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The parent's estimate, scaled by the fraction of tokens the step kept."""
        flops = super().floating_point_ops(inputs)
        keep = inputs.get("keep_mask")
        am = inputs.get("attention_mask")
        if isinstance(keep, torch.Tensor) and isinstance(am, torch.Tensor) and int(am.sum()) > 0:
            return int(flops * float(keep.sum()) / float(am.numel()))
        return flops

    # ------------------------------------------------------------------ logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            stats = self.regate.token_stats()
            logs.update(
                {
                    "regate/kept_fraction": stats["kept_fraction"],
                    "regate/tokens_processed": stats["tokens_processed"],
                    "regate/tokens_dense": stats["tokens_dense"],
                    "regate/rho": self.regate.rho(max(self.state.global_step - 1, 0)),
                }
            )
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        output_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:  # every rank holds the same state (update is a collective)
            save_checkpoint(
                os.path.join(output_dir, REGATE_STATE_NAME),
                {"format": _STATE_FORMAT, "global_step": self.state.global_step, "regate": self.regate.state_dict()},
            )
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.model if model is None else model
        assert target is not None  # the Trainer has its model by now
        reload_renamed_weights(target, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, REGATE_STATE_NAME)
        if not os.path.isfile(path):
            if self.require_regate_state:
                raise FileNotFoundError(
                    f"resume_from_checkpoint={checkpoint!r} has no {REGATE_STATE_NAME}: it was not written by a "
                    f"ReGate trainer, so the ReGate state (difficulty EMA, token counts) would silently restart. "
                    f"Resume from a checkpoint this trainer wrote, or pass require_regate_state=False to restart "
                    f"the ReGate state on purpose"
                )
            self.regate.start_at(self.state.global_step)
            return
        state = load_checkpoint(path)
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path} is not a ReGate trainer state")
        self.regate.load_state_dict(state["regate"])


class ReGateTrainer(ReGateTrainerMixin, Trainer):
    """``transformers.Trainer`` with ReGATE (see :class:`ReGateTrainerMixin` for the arguments).

    Example:
        >>> model = regate_fx.sparsify(model)
        >>> trainer = regate_fx.ReGateTrainer(model=model, args=args, train_dataset=ds, regate=rg)
        >>> trainer.train()
    """
