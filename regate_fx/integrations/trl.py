"""TRL integration: :class:`ReGateSFTTrainer` (``trl.SFTTrainer`` with ReGATE).

```python
model = regate_fx.sparsify(model)
trainer = regate_fx.ReGateSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                                     processing_class=tokenizer, regate=make_regate)
```

``regate`` may be a function ``(train_dataset) -> ReGate``: it is called with the dataset TRL has
tokenized, so the teacher cache can be computed on exactly what is trained on.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from regate_fx.integrations.trainer import ReGateTrainerMixin

__all__ = ["ReGateSFTTrainer"]


# TRL's base class declares `loss_is_scaled_for_ga = None` (inferred as the type None), which no bool overrides
class ReGateSFTTrainer(ReGateTrainerMixin, SFTTrainer):  # type: ignore[misc]
    """``trl.SFTTrainer`` with ReGATE (see :class:`~regate_fx.ReGateTrainerMixin` for the arguments).

    TRL's own collator is kept (and made to carry ``sample_id``) unless you pass one; for a
    pre-tokenized multimodal dataset (``pixel_values`` columns) pass
    ``data_collator=regate_fx.ReGateCollator(pad_token_id=...)``.

    Raises:
        ValueError: ``packing`` or ``padding_free`` (a packed row is several samples in one, with no
            sample id and no padding mask for the sparse step), or a ``loss_type`` other than
            ``"nll"`` (the sparse step computes the plain cross-entropy).
    """

    regate_default_collator = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cfg = kwargs.get("args", args[1] if len(args) > 1 else None)
        if cfg is not None:
            if getattr(cfg, "packing", False) or getattr(cfg, "padding_free", False):
                raise ValueError(
                    "ReGateSFTTrainer does not support packing=True or padding_free=True: ReGATE keys "
                    "its state by sample and a packed row mixes samples. Set packing=False, "
                    "padding_free=False"
                )
            if getattr(cfg, "loss_type", "nll") != "nll":
                raise ValueError(
                    f"ReGateSFTTrainer trains the cross-entropy of the kept tokens; loss_type="
                    f"{cfg.loss_type!r} is not supported (use loss_type='nll')"
                )
        super().__init__(*args, **kwargs)
