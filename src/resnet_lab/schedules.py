"""Learning-rate schedules of the paper that torch.optim does not have as one class."""

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

    # What `--schedule_scale` multiplies; the warm-up is left as the paper states it.
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
