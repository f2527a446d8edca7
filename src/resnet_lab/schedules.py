"""Learning-rate schedules of the paper that torch.optim does not have as one class."""

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupMultiStepLR(LRScheduler):
    """Step decay with a constant warm-up: lr x `warmup_factor` for the first `warmup_steps` steps, then the base
    lr, multiplied by `gamma` at each milestone.

    The paper's ResNet-110 and 1202 start at 0.01 (factor 0.1 of 0.1) for about 400 iterations, then train at 0.1
    with /10 at 32k and 48k iterations (Sec. 4.2). Milestones count from the first step, warm-up included.

    Args:
        optimizer: the wrapped optimizer.
        milestones: steps at which the lr is multiplied by `gamma`.
        gamma: decay factor.
        warmup_steps: steps at the reduced lr.
        warmup_factor: multiplier of the base lr during warm-up.
        last_epoch: index of the last step, -1 to start.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        decay = self.gamma ** bisect_right(self.milestones, step)
        return decay * (self.warmup_factor if step < self.warmup_steps else 1.0)

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
