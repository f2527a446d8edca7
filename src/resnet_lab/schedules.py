"""Learning-rate schedules of the paper that torch.optim does not have as one class."""

import math
from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from resnet_lab.errors import ConfigError


class WarmupMultiStepLR(LRScheduler):
    """Step decay with a constant warm-up: lr x `warmup_factor` during warm-up, then the base lr, multiplied by
    `gamma` at each milestone.

    The paper's ResNet-110 and 1202 start at 0.01 (factor 0.1 of 0.1) until the training error is below 80%
    (about 400 iterations), then train at 0.1 with /10 at 32k and 48k iterations (Sec. 4.2). Warm-up lasts
    `warmup_steps` steps, or with `warmup_steps: null` until `end_warmup()` is called, which the
    `WarmupUntilTrainError` callback does. Milestones count from the first step, warm-up included.

    Args:
        optimizer: the wrapped optimizer.
        milestones: steps at which the lr is multiplied by `gamma`.
        gamma: decay factor.
        warmup_steps: steps at the reduced lr; None: until `end_warmup()`.
        warmup_factor: multiplier of the base lr during warm-up.
        last_epoch: index of the last step, -1 to start.
    """

    # What the scaled protocol (resnet_lab.scaled) multiplies; the warm-up is left as the paper states it.
    scaled_arguments = ("milestones",)

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_steps: int | None = 0,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.warmup_end: int | None = warmup_steps  # saved in state_dict(), so a resumed run keeps its switch
        self.warmup_driver: str | None = None  # the callback that will call end_warmup(), once it is attached
        super().__init__(optimizer, last_epoch)

    def state_dict(self) -> dict:
        # Who drives the warm-up is a property of this run's callbacks, not of the schedule's progress.
        return {k: v for k, v in super().state_dict().items() if k != "warmup_driver"}

    def check_warmup_ends(self) -> None:
        """Refuse an open-ended warm-up that nothing will end: it would train at the reduced lr forever."""
        if self.warmup_end is None and self.warmup_driver is None:
            raise ConfigError(
                "WarmupMultiStepLR has warmup_steps: null (warm up until told to stop) but no callback ends the "
                "warm-up: add resnet_lab.callbacks.WarmupUntilTrainError to trainer.callbacks (a --trainer.callbacks "
                "given on the command line replaces the config's list; use --trainer.callbacks+=...), or set "
                "warmup_steps to a number of iterations"
            )

    @property
    def lr_ahead_known(self) -> bool:
        """Whether the learning rate of every later step is known now (not while an open-ended warm-up waits for
        `end_warmup()`): what a captured training step needs to table it (`resnet_lab.graph_step`)."""
        return self.warmup_end is not None

    def end_warmup(self) -> None:
        """End the warm-up now: the next optimizer step already uses the base lr."""
        if self.warmup_end is None:
            self.warmup_end = self.last_epoch
            for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
                group["lr"] = lr
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def factor(self, step: int) -> float:
        decay = self.gamma ** bisect_right(self.milestones, step)
        warming = self.warmup_end is None or step < self.warmup_end
        return decay * (self.warmup_factor if warming else 1.0)

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


class WarmupCosineLR(LRScheduler):
    """A linear warm-up from `warmup_factor` x the base lr to the base lr over `warmup_steps` steps, then a cosine
    decay to zero at `total_steps` (Goyal et al. 2017; Loshchilov & Hutter 2017), stepped every iteration.

    torch's LinearLR + CosineAnnealingLR in a SequentialLR do the same but need the cosine's length as a number, a
    second copy of the run's length to keep in sync; here `total_steps: null` is the run's own (`ImageClassifier`
    sets it to `trainer.estimated_stepping_batches`: `max_steps`, or the steps of `max_epochs`).

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of the linear warm-up; 0 for none.
        warmup_factor: multiplier of the base lr at the first step.
        total_steps: the step at which the lr reaches zero; None: the run's length.
        last_epoch: index of the last step, -1 to start.
    """

    # What the scaled protocol (resnet_lab.scaled) multiplies; the warm-up is left as the recipe states it.
    scaled_arguments = ("total_steps",)

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        warmup_factor: float = 0.01,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """The step at which the lr reaches zero (what `total_steps: null` leaves to the run)."""
        if not 0 <= self.warmup_steps < total_steps:
            raise ConfigError(
                f"WarmupCosineLR needs 0 <= warmup_steps < total_steps: got {self.warmup_steps} warm-up steps in a "
                f"schedule of {total_steps} (lower model.lr_scheduler.init_args.warmup_steps, or train longer)"
            )
        self.total_steps = total_steps

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * step / self.warmup_steps
        if self.total_steps is None:  # before the run's length is known: only while the optimizer is built
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
