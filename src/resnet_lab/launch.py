"""What the command line does before any work, as plain functions: check the files it was given, find the run to
resume, hand the data's class count to the network, and turn a user's mistake into one line."""

import json
import os
import re
import tempfile
from collections.abc import Callable
from fractions import Fraction
from importlib import import_module
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule

from resnet_lab.checkpoints import model_arguments
from resnet_lab.errors import ConfigError, UserError


def config_key(config: str | Path, key: str) -> object:
    """A top-level value of a config file, None if it has none or cannot be read (the parser reports that)."""
    try:
        return (yaml.safe_load(Path(config).read_text()) or {}).get(key)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: not text (UnicodeDecodeError)
        return None


def check_config_file(config: Path) -> None:
    """A --config that is missing, or not a YAML mapping: one line naming the file (and the line of a syntax error)."""
    if config.is_dir():
        examples = sorted(p.name for p in config.glob("*.yaml"))[:3]
        hint = f", e.g. {config / examples[0]}" if examples else ""
        raise ConfigError(f"--config {config} is a folder: give one of its config files{hint}")
    if not config.is_file():
        raise ConfigError(f"--config {config}: no such file (the experiment configs are in configs/)")
    try:
        content = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {config} is not valid YAML{where}: {problem}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {config} is not a text file (a YAML config is; was a checkpoint given?)") from err
    except OSError as err:
        raise ConfigError(f"--config {config} cannot be read ({err})") from err
    if content is None:
        raise ConfigError(f"--config {config} is empty: a config holds `key: value` settings")
    if not isinstance(content, dict):
        raise ConfigError(f"--config {config} must hold `key: value` settings, not a {type(content).__name__}")


def _recipes_of(config: Path) -> list[Path]:
    """The recipes a config names, `recipe: R` or `recipe: [R, P, ...]`, as paths relative to its folder."""
    check_config_file(config)
    recipe = config_key(config, "recipe")
    return [config.parent / r for r in ([recipe] if isinstance(recipe, str) else recipe or [])]


def _recipe_chain(config: Path, path: str, seen: tuple[Path, ...] = ()) -> list[Path]:
    """Every recipe `config` stacks on, each after its own, in the order named (for `--config path`)."""
    chain = []
    for recipe in _recipes_of(config):
        if not recipe.is_file():
            raise ConfigError(
                f"{config} names the recipe {recipe}, which does not exist (a recipe path is read relative to "
                "the folder of the config that names it). A config that already holds every value, like one "
                "printed by --print_config, needs none: set `recipe: null` in it"
            )
        if recipe.resolve() in seen or recipe.resolve() == config.resolve():
            raise ConfigError(f"the recipes of {path} name each other in a circle ({recipe})")
        chain += [*_recipe_chain(recipe, path, (*seen, config.resolve())), recipe]
    return chain


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def check_config_after_subcommand(args: list[str]) -> None:
    """`main.py --config X fit` reads X as a file of `fit:` / `test:` sections, which an experiment config is not:
    say to put it after the subcommand rather than let the parser complain about its first key."""
    at = next((i for i, arg in enumerate(args) if arg in SUBCOMMANDS), None)
    if at is None:
        return
    for config in _config_files(args[:at]):
        if not any(config_key(config, name) is not None for name in SUBCOMMANDS):
            raise ConfigError(
                f"--config {config} comes before the subcommand: put it after, "
                f"`python main.py {args[at]} --config {config} ...`"
            )


def experiment_config(args: list[str]) -> str | None:
    """The experiment's config among command-line arguments: the first `--config` that sets `experiment:` (presets
    may come before it), else the first `--config`."""
    files = _config_files(args)
    return next((f for f in files if config_key(f, "experiment")), files[0] if files else None)


def expand_recipes(args: list[str]) -> list[str]:
    """Put each config's recipe before it: `--config E` whose file says `recipe: R` (a path relative to E) becomes
    `--config R --config E`, recursively, so that an experiment is a few lines over its family's recipe and any
    later `--config` or option still overrides both. `recipe: [R, P]` stacks R, then P (a preset, say), then E.

    The recipes go before the first `--config`, so that a preset given before its experiment (`--config
    presets/debug.yaml --config resnet20_cifar.yaml`) still overrides the experiment's recipe, as it would after it.
    """
    expanded, recipes, first, i = [], [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            path, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            expanded.append(arg)
            i += 1
            continue
        recipes += [str(r) for r in _recipe_chain(Path(path), path) if str(r) not in recipes]
        first = len(expanded) if first is None else first
        expanded += ["--config", path]
    if first is not None:
        expanded[first:first] = [flag for recipe in recipes for flag in ("--config", recipe)]
    return expanded


# Trainer arguments typed `float | int`, in that order: the parser reads a 1 as 1.0, which Lightning takes for 100%.
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def limits_given_as_one_batch(args: list[str]) -> set[str]:
    """The batch limits (`BATCH_LIMITS`) that `args` (with recipes expanded) last set to the integer 1, one batch,
    in a config file (`limit_val_batches: 1`) or an option (`--trainer.limit_val_batches 1`)."""
    last: dict[str, bool] = {}
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            trainer = config_key(args[i + 1], "trainer")
            for key in BATCH_LIMITS:
                if isinstance(trainer, dict) and key in trainer:
                    value = trainer[key]
                    last[key] = value == 1 and isinstance(value, int) and not isinstance(value, bool)
            continue
        for key in BATCH_LIMITS:
            option, value = f"--trainer.{key}", None
            if arg == option and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(f"{option}="):
                value = arg.split("=", 1)[1]
            if value is not None:
                last[key] = value.strip() == "1"
                break
    return {key for key, one in last.items() if one}


def check_writable(folder: Path) -> None:
    """Fail before training, not hours later at the first checkpoint, if runs cannot be written under `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot write runs under {folder} ({err.strerror or err}); choose another folder with "
            "--trainer.logger.init_args.save_dir"
        ) from err


def run_to_resume(experiment: Path, version: str | None, differences: Callable[[Path], list[str]]) -> tuple[Path, str]:
    """What `--ckpt_path last` resumes, and why: `(<run>/checkpoints/last.ckpt, reason)`.

    Lightning's own `last` looks only in the checkpoint folder of the run being started, which for a new
    `version_N` is empty: a resumed job would start from scratch. Ours finds the run the command names: the one
    `version` names (`--trainer.logger.init_args.version`, as `paper seeds` gives each seed), else the newest
    `last.ckpt` among the experiment's runs (`version_N`, `seed<k>`, ...) whose saved config has this command's
    settings (`differences(run)` lists how a run's differ), so that a quick debug run of the same experiment, or
    another seed, is never continued in its place.
    """
    if version is not None:
        last = experiment / str(version) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"--ckpt_path last: the run --trainer.logger.init_args.version {version} names has no {last} to "
                "resume from; start it without --ckpt_path, or give a checkpoint's path"
            )
        return last, f"the run --trainer.logger.init_args.version {version} names"
    candidates = sorted(experiment.glob("*/checkpoints/last.ckpt"))
    if not candidates:
        scaled = sorted(p.name for p in experiment.parent.glob(f"{experiment.name}-scale*") if p.is_dir())
        hint = f" (runs of it at another --schedule_scale are in {', '.join(scaled)}: give their scale)" * bool(scaled)
        raise ConfigError(
            f"--ckpt_path last: no {experiment}/*/checkpoints/last.ckpt to resume from{hint}; start the run "
            "without --ckpt_path, or give a checkpoint's path"
        )
    differing = {last: differences(last.parents[1]) for last in candidates}
    same = [last for last, differs in differing.items() if not differs]
    if not same:
        runs = "; ".join(f"{last.parents[1].name} has {', '.join(d[:2])}" for last, d in differing.items())
        raise ConfigError(
            f"--ckpt_path last: no run of {experiment} has this command's settings ({runs}): name the run to "
            "resume with --trainer.logger.init_args.version <its folder>, or give a checkpoint's path"
        )
    last = max(same, key=os.path.getmtime)
    count = "the only run" if len(same) == 1 else f"the newest (by its last.ckpt) of {len(same)} runs"
    return last, f"{count} of {experiment.name} with this command's settings"


def build_datamodule(data: dict) -> LightningDataModule:
    """A data module from its config (`{"class_path": ..., "init_args": {...}}`), as the command line builds it."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser.instantiate(parser.parse_object({"data": data})).data


def link_num_classes(config: Namespace) -> None:
    """Give the network as many outputs as the data has classes (ImageNet subsets count their folders).

    Done here rather than with the parser's `link_arguments`: jsonargparse cannot link into the arguments of a
    factory function, which is how torchvision and timm expose their networks (`torchvision.models.resnet18`).
    The parser has already listed the network's arguments in `init_args`, those it takes through `**kwargs` too
    (torchvision's factories pass `num_classes` on to `ResNet`); a network without one is left as it is.
    """
    data = build_datamodule(config.data.as_dict() if isinstance(config.data, Namespace) else config.data)
    init_args = model_arguments(config).backbone.get("init_args")
    if getattr(data, "num_classes", None) is not None and init_args is not None and "num_classes" in init_args:
        init_args.num_classes = data.num_classes


def error_message(err: UserError) -> str:
    """What the user is told of `err`: its own message, also when a DataLoader worker raised it (torch re-raises it
    in the main process with the worker's whole traceback as its message)."""
    text = str(err)
    if "Original Traceback" in text:
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        raised = [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
        text = raised[-1] if raised else text.splitlines()[-1]
    return text


def user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind `err`, also when jsonargparse wrapped it while instantiating a class."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


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


def scale_label(scale: float) -> str:
    """`1/16` for 0.0625; `1` for the full schedule."""
    fraction = Fraction(scale).limit_denominator(10000)
    return str(fraction.numerator) if fraction.denominator == 1 else f"{fraction.numerator}/{fraction.denominator}"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_run_name(option: str, value: object) -> str:
    """A name that becomes a folder under logs/ (the experiment, the logger's name or version), refused in one line
    unless it is one plain folder name: no `/`, no `..`, no leading dot."""
    text = str(value)
    if not RUN_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{option} {text!r}: a run folder's name must match {RUN_NAME.pattern} (no '/' and no '..')")
    return text


def run_name(experiment: str, scale: float) -> str:
    """The experiment's folder under logs/: a scaled run's name says its scale (`resnet20_cifar-scale1of16`), so
    that it is never taken for (or resumed as) a full-schedule run."""
    check_run_name("--experiment", experiment)
    return experiment if scale == 1 else f"{experiment}-scale{scale_label(scale).replace('/', 'of')}"


# Settings that change where a run is written or read, what it shows, or when it stops and saves, but not what it
# trains (both CIFAR loaders give the same batches, whatever the workers); and the seed and the scale, which the
# ledger keeps apart.
NOT_OVERRIDES = (
    "config",
    "recipe",
    "experiment",
    "ckpt_path",
    "seed_everything",
    "schedule_scale",
    "paper_recipe",
    "test_after_fit",
    "data.init_args.root",
    "data.init_args.loader",
    "data.init_args.num_workers",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.max_time",
    "checkpoint",
    "last_checkpoint",
    "periodic_checkpoint",
    "lr_monitor",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "model.backbone.init_args.num_classes",
)


def is_override(key: str) -> bool:
    """Whether a setting, by its dotted key, changes what a run trains (see `NOT_OVERRIDES`)."""
    return not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_OVERRIDES)


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat |= _flatten(item, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: value}


DEFAULT_MODULE = "resnet_lab.module.ImageClassifier"


def module_class(path: object) -> str:
    """The module class a config names (`model.class_path`), by the module that defines it (`resnet_lab.module.
    ImageClassifier` for `resnet_lab.ImageClassifier`); ImageClassifier for a config written before the class was a
    choice, which has none."""
    module, _, name = str(path or DEFAULT_MODULE).rpartition(".")
    try:
        found = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return str(path)
    return f"{found.__module__}.{found.__qualname__}"


# BatchNorm2d's own arguments (`bias` in torch >= 2.12 only).
BATCH_NORM = {"eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True, "device": None, "dtype": None}
BATCH_NORM |= {"bias": True}


def stock_setting(key: str, value: object) -> bool:
    """Whether a network setting is at the paper's own value (BN, no attention): left out of a run's network, so
    that it names (and the ledger groups) its network as runs did before the setting existed."""
    if key == "attn_layer":
        return value is None
    if key == "norm_layer":
        return (
            isinstance(value, dict)
            and value.get("class_path") == "torch.nn.BatchNorm2d"
            and (value.get("init_args") or {}).items() <= BATCH_NORM.items()
        )
    return False


def _settings(config: Namespace) -> dict[str, object]:
    """Every setting by its dotted key, the module's arguments as `model.<argument>` whether the config names the
    module's class (`model.init_args.<argument>`) or was written before that was a choice; the network's settings
    at the paper's own value left out (`stock_setting`)."""
    plain = config.as_dict()
    model = plain.get("model") or {}
    backbone = ((model.get("init_args") or {}) if "class_path" in model else model).get("backbone") or {}
    arguments = backbone.get("init_args") or {} if isinstance(backbone, dict) else {}
    for key in [k for k, v in arguments.items() if stock_setting(k, v)]:
        del arguments[key]
    flat = {
        f"model.{key.removeprefix('model.init_args.')}" if key.startswith("model.init_args.") else key: value
        for key, value in _flatten(plain).items()
    }
    return flat | {"model.class_path": module_class(flat.get("model.class_path"))}


def config_differences(config: Namespace, base: Namespace) -> list[tuple[str, object, object]]:
    """`(key, value in config, value in base)` for every setting that differs, leaving out paths, names and the
    seed (`NOT_OVERRIDES`)."""
    mine, theirs = _settings(config), _settings(base)
    return [
        (key, mine.get(key), theirs.get(key))
        for key in sorted({*mine, *theirs})
        if is_override(key) and mine.get(key) != theirs.get(key)
    ]


def config_overrides(config: Namespace, base: Namespace) -> list[str]:
    """`key=value` (the value as JSON) for every setting of `config` that differs from `base`, its experiment's
    config as read alone (see `config_differences`)."""
    return [f"{key}={json.dumps(value, default=str)}" for key, value, _ in config_differences(config, base)]
