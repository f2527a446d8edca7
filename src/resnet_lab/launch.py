"""What the command line does before any work, as plain functions: check the files it was given, read each config's
recipe before it, hand the data's class count to the network, and turn a user's mistake into one line. Which run a
command names is `resnet_lab.identity`'s; the scaled protocol is `resnet_lab.scaled`'s."""

import tempfile
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

    Why not jsonargparse's own include (a `config: base.yaml` key inside a config file, jsonargparse 4.53): it reads
    one file only (a list is kept as a value and never read) and applies it where the key stands among the others
    (written after a key, it overrides that key), where a recipe is a list, always read first.
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
