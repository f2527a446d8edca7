"""The command line's parser: what jsonargparse reports as a nested, multi-line explanation after the whole usage
becomes one line that names the option, the value and what it accepts (`--help` still prints the usage).

Read from the message's text because that is all jsonargparse 4.53 gives: its errors are a chain of TypeError,
ValueError and NSKeyError whose only content is the message (`Parser key "model": ...` for each nested key), with
no field for the key, the value or the accepted types."""

import difflib
import inspect
import re
import shutil
import sys
import textwrap
from functools import partial
from importlib import import_module
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

HELP_HINT = "`python main.py fit --help` lists every option"
# What an experiment config gives and nothing else does: missing, no experiment was named.
EXPERIMENT_KEYS = {"model.backbone", "data"}

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED = re.compile(r"Expected a (.+?)(?:\. Got value: .*)?$", re.MULTILINE)
_GIVEN = re.compile(
    r"(?:Given value|Got value): (?:NestedArg\(key='[^']*', val=)?(.+?)\)?(?:\. Got value: .*)?$", re.MULTILINE
)
_LITERAL = re.compile(r"typing\.Literal\[(.+)\]")
_NO_ATTRIBUTE = re.compile(r"module '([^']+)' has no attribute '([^']+)'")
_NO_CLASS = re.compile(r"Expected a dot import path string: (\S+)")
_NOT_SUBCLASS = re.compile(r"Import path (\S+) does not correspond to a subclass of (\w+)")
_NOT_ACCEPTED_IN_FILE = re.compile(r"Subcommand '(\w+)' does not accept option '([^']+)'")
_REQUIRED = re.compile(r"the following arguments are required: (.+)$", re.MULTILINE)
_TYPE_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a text",
    "Iterable": "a list",
    "Sequence": "a list",
    "list": "a list",
}


def _option(message: str) -> str:
    """The dotted option the message is about: its nested parser keys, joined through the `init_args` of the
    class each outer key holds."""
    option = ".init_args.".join(k for k in _KEY.findall(message) if k != "config")
    # The module's class is a choice with a default: its arguments are named as configs write them (model.backbone).
    return option.replace("model.init_args.", "model.", 1) if option.startswith("model.init_args.") else option


def _accepted(expected: list[str]) -> str:
    """ "one of 'A', 'B' or a whole number" from the types jsonargparse tried."""
    values, kinds = [], []
    for text in expected:
        if literal := _LITERAL.search(text):
            values += [v.strip() for v in literal.group(1).split(",")]
        elif (simple := re.fullmatch(r"<class '([\w.]+)'>", text)) and simple.group(1).split(".")[-1] in _TYPE_NAMES:
            kinds.append(_TYPE_NAMES[simple.group(1).split(".")[-1]])
    parts = [f"one of {', '.join(dict.fromkeys(values))}"] * bool(values) + list(dict.fromkeys(kinds))
    return " or ".join(parts)


def _arguments_of(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        return [p for p in inspect.signature(getattr(import_module(module), name)).parameters if p != "self"]
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def _did_you_mean(option: str, options: list[str]) -> str | None:
    """ "did you mean --trainer.max_steps?" for `--trainer.max_step`: the closest option of the same section."""
    section, dot, name = option.rpartition(".")
    siblings = [o.rpartition(".")[2] for o in options if o.rpartition(".")[0] == section]
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
    return f"did you mean {section}{dot}{near[0]}?" if near else None


def one_line(message: str, options: list[str] = ()) -> str:
    """jsonargparse's error `message` as one line: the option, what was wrong, what it accepts; `options` are the
    parser's own option strings, for a "did you mean"."""
    option = _option(message)
    if unknown := _NOT_ACCEPTED.search(message):
        name = unknown.group(1)
        classes = _CLASS.findall(message)
        if not option and not classes:  # a key at the top of a config given as a dict, or of run=False's parser
            return f"{name} is not an option here ({_did_you_mean(f'--{name}', options) or HELP_HINT})"
        arguments = _arguments_of(classes[-1]) if classes else []
        near = difflib.get_close_matches(name, arguments, n=1)
        where = classes[-1] if classes else option
        hint = f"did you mean {near[0]}? " if near else ""
        hint += f"it takes: {', '.join(arguments)}" if arguments else ""
        option = f"{option}.init_args" if classes else option
        return f"{option}.{name}: {where} has no argument {name!r}" + (f" ({hint})" if hint else "")
    if message.startswith("unrecognized arguments:"):
        given = message.split(":", 1)[1].split()
        unknown_options = [g.split("=", 1)[0] for g in given if g.startswith("--")] or given[:1]
        hint = _did_you_mean(unknown_options[0], options) or HELP_HINT
        return f"unknown option {' '.join(unknown_options)} ({hint}; options are never abbreviated)"
    if in_file := _NOT_ACCEPTED_IN_FILE.search(message):
        key = in_file.group(2)
        hint = (_did_you_mean(f"--{key}", options) or HELP_HINT).replace("mean --", "mean ")
        return f"{key} (in a --config file) is not an option of {in_file.group(1)} ({hint})"
    if missing := _NO_ATTRIBUTE.search(message):
        module, name = missing.groups()
        try:
            near = difflib.get_close_matches(name, dir(import_module(module)), n=1)
        except ImportError:
            near = []
        hint = f"did you mean {module}.{near[0]}?" if near else "give an import path or a short name"
        return f"--{option}: {module}.{name} does not exist ({hint})"
    if required := _REQUIRED.search(message):  # at the top, or of the module's class (`model.backbone`)
        prefix = f"{option}." if option else ""
        missing = [prefix + m.strip().split(".", 1)[-1] for m in required.group(1).split(",")]
        if not set(missing) <= EXPERIMENT_KEYS:  # an argument of a class given on the command line
            return f"{', '.join('--' + m for m in missing)} must be given: its class has no default for it"
        return (
            f"no experiment given (missing {', '.join('--' + m for m in missing)}): name one with --config, e.g. "
            "`python main.py fit --config configs/resnet20_cifar.yaml` (configs/ holds them all)"
        )
    if "File does not exist" in message and option in ("", "config"):
        path = message.rsplit(":", 1)[1].strip().strip("'")
        return f"--config {path}: no such file (the experiment configs are in configs/)"
    if message.startswith("Problems parsing config"):
        detail = " ".join(line.strip() for line in message.splitlines()[1:] if line.strip())
        return f"a --config file is not valid YAML or JSON: {detail}"
    if option:
        given = _GIVEN.findall(message)
        accepted = _accepted(_EXPECTED.findall(message))
        if accepted:
            value = given[0].strip() if given else "this value"
            return f"--{option} {value}: expected {accepted}"
        if unknown_class := _NO_CLASS.search(message):
            return (
                f"--{option} {unknown_class.group(1)}: no class of that name is known here; give its import path "
                "(package.module.Class) or the short name of one of this project's classes (see --help)"
            )
        if not_subclass := _NOT_SUBCLASS.search(message):
            path, base = not_subclass.groups()
            return f"--{option} {path}: not a class of the kind this option takes (a subclass of {base})"
        if given:
            return f"--{option} {given[0].strip()}: expected another value"
        if classes := _CLASS.findall(message):
            detail = message.splitlines()[-1].strip()
            return f"--{option}: cannot use {classes[-1]} ({detail}); give the class's import path or short name"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    return _KEY.sub(lambda key: f"--{key.group(1)}", "; ".join(lines)).replace(":;", ":")[:400]


_OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w.]*")
_KNOWN = re.compile(r",\s+known\s+subclasses:\s+([^)]*)\)")  # over the wrapped help
PROJECT = "resnet_lab."


def _defined_in(class_path: str, package: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(import_module(module), name).__module__.startswith(package)
    except (ImportError, AttributeError):
        return False


def project_first(known: re.Match) -> str:
    """A help text's list of known subclasses as this project's classes by the short names the parser accepts,
    rather than every subclass of `nn.Module` that torch and torchmetrics define."""
    paths = [p for p in re.split(r",\s*", " ".join(known.group(1).split())) if p]
    # Where any nn.Module will do (the backbone, a residual unit), the project's candidates are its networks and
    # units, not the data transforms or the LightningModule that are modules too.
    home = f"{PROJECT}models" if "torch.nn.Module" in paths else PROJECT.rstrip(".")
    ours = [p.rpartition(".")[2] for p in paths if p.startswith(PROJECT) and _defined_in(p, home)]
    others = [p for p in paths if not p.startswith(PROJECT)]
    torchvision = [p for p in others if p.startswith("torchvision.models.") and p.count(".") == 2]
    others = (["torchvision.models.ResNet"] if "torchvision.models.ResNet" in others else torchvision) or others
    listed = f"this project's {', '.join(ours)}" if ours else "none of this project's"
    more = f"; or any other by import path, e.g. {others[0]}" if others else ""
    return f", by short name: {listed}{more})"


class ResNetLabParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors are one line (see `one_line`), without the usage before them,
    and whose help shows the project's classes (`project_first`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.subcommand_parsers: list[LightningArgumentParser] = []  # the CLI adds them

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # an inner parser, or a caller that handles the error itself
            super().error(message, ex)
        try:
            line = one_line(message, self._option_strings())
        except Exception:  # noqa: BLE001 - a message of a shape not foreseen: its own lines, joined
            line = "; ".join(part.strip() for part in message.splitlines() if part.strip())[:400]
        sys.exit(f"error: {line}")

    def format_help(self) -> str:
        text = _KNOWN.sub(project_first, super().format_help())
        # The shortened lists, wrapped as argparse wraps (its terminal width; help text from column 24).
        width = shutil.get_terminal_size().columns - 2
        wrap = partial(textwrap.wrap, width=width, subsequent_indent=" " * 24)
        return "\n".join("\n".join(wrap(line)) if len(line) > width else line for line in text.splitlines()) + "\n"

    def _option_strings(self) -> list[str]:
        """Every option of this parser and its subcommands', as their help lists them."""
        helps = [parser.format_help() for parser in (self, *self.subcommand_parsers)]
        return sorted({option for text in helps for option in _OPTION.findall(text)})
