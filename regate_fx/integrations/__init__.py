"""Integrations with training stacks: Hugging Face Trainer (:mod:`.trainer`) and TRL (:mod:`.trl`).

Imported on first use (``regate_fx.ReGateTrainer``, ``regate_fx.ReGateSFTTrainer``), so that
``import regate_fx`` does not import the Trainer, and TRL is needed only for its trainer.
"""

__all__: list[str] = []  # the public names are regate_fx.ReGateTrainer, ReGateTrainerMixin, ReGateSFTTrainer
