"""What names a run and tells runs apart, below both the command line and the paper tools: the run folder's name
(`run_name`, a scaled run's saying its scale), which run `--ckpt_path last` means (`run_to_resume`), and how a run's
settings differ from its experiment's (`config_overrides`, which the ledger keeps)."""

import json
import os
import re
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

from jsonargparse import Namespace

from resnet_lab.checkpoints import DOTTED_NAME, allowed_class, check_plain, model_arguments, names_in, read_saved_config
from resnet_lab.errors import ConfigError, DataError
from resnet_lab.scaled import OPTION as SCALE_OPTION
from resnet_lab.scaled import other_scales, scaled_name
from resnet_lab.trainer import validation_epochs


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
        raise ConfigError(
            f"--ckpt_path last: no {experiment}/*/checkpoints/last.ckpt to resume from{other_scales(experiment)}; "
            "start the run without --ckpt_path, or give a checkpoint's path"
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


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_run_name(option: str, value: object) -> str:
    """A name that becomes a folder under logs/ (the experiment, the logger's name or version), refused in one line
    unless it is one plain folder name: no `/`, no `..`, no leading dot."""
    text = str(value)
    if not RUN_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{option} {text!r}: a run folder's name must match {RUN_NAME.pattern} (no '/' and no '..')")
    return text


def run_name(experiment: str, scale: float) -> str:
    """The experiment's folder under logs/ (a scaled run's says its scale: `resnet_lab.scaled.scaled_name`)."""
    return scaled_name(check_run_name("--experiment", experiment), scale)


# Settings that change where a run is written or read, what it shows, or when it stops and saves, but not what it
# trains (both CIFAR loaders give the same batches, whatever the workers); and the seed and the scale, which the
# ledger keeps apart.
NOT_OVERRIDES = (
    "config",
    "recipe",
    "experiment",
    "ckpt_path",
    "seed_everything",
    SCALE_OPTION,
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
    "notebook",
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
BATCH_NORM = {"eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True, "bias": True}
BATCH_NORM |= {"device": None, "dtype": None}


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
    backbone = model_arguments(plain).get("backbone") if plain.get("model") else None
    arguments = (backbone.get("init_args") or {}) if isinstance(backbone, dict) else {}
    for key in [k for k, v in arguments.items() if stock_setting(k, v)]:
        del arguments[key]
    flat = {
        f"model.{key.removeprefix('model.init_args.')}" if key.startswith("model.init_args.") else key: value
        for key, value in _flatten(plain).items()
    }
    if "trainer.check_val_every_n_epoch" in flat:  # as the Trainer runs it (run folders before it kept None)
        every = validation_epochs(flat.get("trainer.val_check_interval"), flat["trainer.check_val_every_n_epoch"])
        flat["trainer.check_val_every_n_epoch"] = every
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


# The module's arguments that change how it computes, not what it computes (`graph_step`: of checkpoints written
# before the graph step was a class of its own); and the module classes that train alike, differing only in how.
HOW_TO_RUN = ("graph_step", "compile", "compile_mode", "compile_backend", "channels_last")
SAME_TRAINING = {"resnet_lab.module.ImageClassifier", "resnet_lab.graph_step.GraphStepClassifier"}


def run_differences(
    config: Namespace, run: Path, parse: Callable[[Path], Namespace | None], evaluation: bool
) -> list[str]:
    """How the settings of the run in `run` differ from this command's (`config`), as `key value` phrases: all of
    them for a fit, the network's for an `evaluation`; and the seed. `parse` reads a config file as the command line
    would, None if it cannot."""
    if not (run / "config.yaml").is_file():
        return ["no config.yaml this version can read"]
    held, own, source = None, names_in(config.as_dict()), str(run / "config.yaml")
    try:  # a run folder is data: parsing it imports what it names, which is checked first
        held = read_saved_config(run / "config.yaml")
        check_plain({k: held.get(k) for k in ("model", "data")}, source, "", own, folder=run)
        check_plain({k: v for k, v in held.items() if k != "ckpt_path"}, source, "", own, True, run)
    except DataError as err:  # another run's doing: not the run this command names
        model = held.get("model") if isinstance(held, dict) else None
        theirs = model.get("class_path") if isinstance(model, dict) else None
        if isinstance(theirs, str) and DOTTED_NAME.fullmatch(theirs) and not allowed_class(theirs, own):
            # a fork's module, trained by its own command
            return [f"model {theirs}, which this command does not name (--model {theirs} does)"]
        return [f"a config.yaml this command does not read ({err})"]
    saved = parse(run / "config.yaml")
    if saved is None:
        return ["no config.yaml this version can read"]
    differences = [
        (k, a, b)
        for k, a, b in config_differences(config, saved)
        if k != "ckpt_path"
        and k.removeprefix("model.") not in HOW_TO_RUN  # how it runs: this command's
        and not (k == "model.class_path" and {a, b} <= SAME_TRAINING)
    ]
    if evaluation:  # an evaluation takes its own batches and limits: only the network must agree
        differences = [(k, a, b) for k, a, b in differences if k.startswith("model.backbone.")]
    if config.get("seed_everything") != saved.get("seed_everything"):
        differences.insert(0, ("seed_everything", config.get("seed_everything"), saved.get("seed_everything")))
    return [f"{key} {theirs} (this command: {value})" for key, value, theirs in differences]
