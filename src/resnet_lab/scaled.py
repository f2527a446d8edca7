"""The scaled protocol (`--schedule_scale`): a fraction of an experiment's schedule with its shape kept, for
evidence at a fraction of the cost. The run's folder says its scale (`scaled_name`), run.json and the ledger keep it
under the option's name (`OPTION`)."""

from fractions import Fraction
from importlib import import_module
from pathlib import Path

from jsonargparse import Namespace

from resnet_lab.checkpoints import model_arguments
from resnet_lab.errors import ConfigError

OPTION = "schedule_scale"


def scale_label(scale: float) -> str:
    """`1/16` for 0.0625; `1` for the full schedule."""
    fraction = Fraction(scale).limit_denominator(10000)
    return str(fraction.numerator) if fraction.denominator == 1 else f"{fraction.numerator}/{fraction.denominator}"


def scaled_name(experiment: str, scale: float) -> str:
    """A scaled run's experiment folder says its scale (`resnet20_cifar-scale1of16`), so that it is never taken for
    (or resumed as) a full-schedule run."""
    return experiment if scale == 1 else f"{experiment}-scale{scale_label(scale).replace('/', 'of')}"


def other_scales(experiment: Path) -> str:
    """Where the runs of `experiment` (a folder under logs/) at other scales are, as a hint; "" if nowhere."""
    scaled = sorted(p.name for p in experiment.parent.glob(f"{experiment.name}-scale*") if p.is_dir())
    return f" (runs of it at another --{OPTION} are in {', '.join(scaled)}: give their scale)" if scaled else ""


def scale_given(args: list[str]) -> float:
    """The scale a command line (`paper seeds`' options) gives, 1 if none."""
    option = f"--{OPTION}"
    return float(args[args.index(option) + 1]) if option in args[:-1] else 1.0


# Scheduler arguments counted in scheduler steps, which `scale_schedule` multiplies when the scheduler steps every
# iteration. A scheduler of your own names its own in a `scaled_arguments` class attribute. Warm-up lengths
# (LinearLR, ConstantLR, WarmupMultiStepLR's warmup_steps) are left as the recipe states them.
SCALED_SCHEDULER_ARGUMENTS = {
    "MultiStepLR": ("milestones",),
    "StepLR": ("step_size",),
    "CosineAnnealingLR": ("T_max",),
    "CosineAnnealingWarmRestarts": ("T_0",),
    "OneCycleLR": ("total_steps",),
    "PolynomialLR": ("total_iters",),
    "ReduceLROnPlateau": (),
}


def _scaled_count(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def _scheduler_arguments(class_path: str) -> tuple[str, ...]:
    module, _, name = class_path.rpartition(".")
    try:
        scheduler = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        scheduler = None
    declared = getattr(scheduler, "scaled_arguments", None)
    if declared is not None:
        return tuple(declared)
    if name in SCALED_SCHEDULER_ARGUMENTS:
        return SCALED_SCHEDULER_ARGUMENTS[name]
    raise ConfigError(
        f"--schedule_scale cannot scale the learning-rate schedule {class_path}: it does not say which of its "
        "arguments count iterations. Give the class a `scaled_arguments = (...)` attribute naming them (`()` if "
        f"none), or use one of {', '.join(SCALED_SCHEDULER_ARGUMENTS)}"
    )


def scale_schedule(config: Namespace, scale: float) -> None:
    """Shrink the run to `scale` of its schedule with its shape kept (`--schedule_scale`), in place.

    An epoch becomes `scale` of the data (`trainer.limit_train_batches`) and every count of iterations is multiplied
    by `scale` (`trainer.max_steps`, an iteration `val_check_interval`, the milestones of a schedule that steps
    every iteration); counts of epochs stay. So validations, epoch-wise and iteration-wise lr decays fall at the same
    fractions of training as in the full run: 1/16 of CIFAR's 64k iterations is 4k iterations with the lr divided
    by 10 at 2k and 3k and a validation every 21 iterations (a 351-batch epoch's 1/16, which Lightning rounds
    down: 191 validations against the full run's 183). Warm-up rules stay as the paper
    states them (a training-error threshold, a fixed number of warm-up iterations).
    """
    if not 0 < scale <= 1:
        raise ConfigError(f"--schedule_scale must be in (0, 1] (e.g. 0.0625 for 1/16 of the schedule), got {scale}")
    if scale == 1:
        return
    trainer = config.trainer
    if not trainer.get("max_steps") or trainer.max_steps < 0:
        raise ConfigError(
            "--schedule_scale needs a schedule counted in iterations (trainer.max_steps); this config has "
            f"max_steps {trainer.get('max_steps')}"
        )
    trainer.max_steps = _scaled_count(trainer.max_steps, scale)
    limit = trainer.get("limit_train_batches")
    limit = 1.0 if limit is None else limit
    if limit > 1:  # a number of batches, as Lightning reads it (also when given as 3.0)
        trainer.limit_train_batches = _scaled_count(int(limit), scale)
    else:  # a fraction of the epoch
        trainer.limit_train_batches = float(limit) * scale
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        trainer.val_check_interval = _scaled_count(interval, scale)
    scheduler = model_arguments(config).get("lr_scheduler")
    if scheduler is not None and model_arguments(config).get("scheduler_interval", "epoch") == "step":
        for name in _scheduler_arguments(scheduler.class_path):
            value = scheduler.init_args.get(name)
            if isinstance(value, int):
                scheduler.init_args[name] = _scaled_count(value, scale)
            elif isinstance(value, list):
                scheduler.init_args[name] = [_scaled_count(v, scale) for v in value]
