"""Callbacks the CLI adds to every run."""

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class ValidateAtMaxSteps(Callback):
    """Validate (and so checkpoint) the final model when `max_steps` ends training in the middle of an epoch.

    The paper's schedules are in iterations: 64k iterations of CIFAR are 182.3 epochs, and without this the last
    0.3 epoch would never be validated. Lightning validates when a stop is requested, so request it on the last step.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
