"""What the command line does before any work, as plain functions: check the files it was given, find the run to
resume, hand the data's class count to the network, and turn a user's mistake into one line."""

import os
import tempfile
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule

from resnet_lab.checkpoints import read_checkpoint
from resnet_lab.errors import ConfigError, DataError, UserError


def _recipe_of(config: Path) -> Path | None:
    try:
        recipe = yaml.safe_load(config.read_text()).get("recipe")
    except (OSError, yaml.YAMLError, AttributeError):
        return None  # the parser reports an unreadable config itself
    return (config.parent / recipe) if recipe else None


def first_config(args: list[str]) -> str | None:
    """The first `--config` file among command-line arguments."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def expand_recipes(args: list[str]) -> list[str]:
    """Put each config's recipe before it: `--config E` whose file says `recipe: R` (a path relative to E) becomes
    `--config R --config E`, recursively, so that an experiment is a few lines over its family's recipe and any
    later `--config` or option still overrides both."""
    expanded, i = [], 0
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
        chain, seen = [Path(path)], {Path(path).resolve()}
        while (recipe := _recipe_of(chain[0])) is not None:
            if not recipe.is_file():
                raise ConfigError(
                    f"{chain[0]} names the recipe {recipe}, which does not exist (a recipe path is read relative to "
                    "the folder of the config that names it). A config that already holds every value, like one "
                    "printed by --print_config, needs none: set `recipe: null` in it"
                )
            if recipe.resolve() in seen:
                raise ConfigError(f"the recipes of {path} name each other in a circle ({recipe})")
            seen.add(recipe.resolve())
            chain.insert(0, recipe)
        for config in chain[:-1]:
            expanded += ["--config", str(config)]
        expanded += ["--config", path]
    return expanded


def check_lightning_checkpoint(path: str | Path) -> None:
    """A missing, truncated or foreign file: one clear line, before any work."""
    if "pytorch-lightning_version" not in read_checkpoint(path):
        raise DataError(
            f"{path} is not a Lightning checkpoint; for published CIFAR weights run "
            "`python -m resnet_lab.paper import-cifar` first"
        )


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


def newest_last_checkpoint(experiment: Path) -> Path:
    """What `--ckpt_path last` resumes here: the newest `last.ckpt` (by modification time) of any run of this
    experiment, `<save_dir>/<experiment>/version_*/checkpoints/last.ckpt`.

    Lightning's own `last` looks only in the checkpoint folder of the run being started, which for a new
    `version_N` is empty: a resumed job would start from scratch. Ours looks across the experiment's earlier runs,
    and `fit` then continues in the folder of the run it found.
    """
    candidates = list(experiment.glob("version_*/checkpoints/last.ckpt"))
    if not candidates:
        raise ConfigError(
            f"--ckpt_path last: no {experiment}/version_*/checkpoints/last.ckpt to resume from; start the run "
            "without --ckpt_path, or give a checkpoint's path"
        )
    last = max(candidates, key=os.path.getmtime)
    check_lightning_checkpoint(last)
    return last


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
    init_args = config.model.backbone.get("init_args")
    if getattr(data, "num_classes", None) is not None and init_args is not None and "num_classes" in init_args:
        init_args.num_classes = data.num_classes


def user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind `err`, also when jsonargparse wrapped it while instantiating a class."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None
