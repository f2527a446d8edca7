"""Reading checkpoints with errors that name the file and the problem, instead of a trace from deep in torch, and
the rule that a checkpoint (or a run folder's saved config) is data: it may name only classes from a short list of
modules, since LightningCLI and `load_from_checkpoint` build every class a saved tree names (docs/security.md)."""

import copy
import importlib
import importlib.util
import inspect
import re
import sys
import zipfile
from collections.abc import Collection
from functools import partial
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn

from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError
from resnet_lab.files import atomic_write

# Checkpoint names that Lightning resolves itself.
LIGHTNING_ALIASES = ("last", "best", "hpc", "registry")
# What a file from elsewhere may name for jsonargparse to build: classes (never functions, but torchvision's model
# builders) defined in these modules, for networks, optimizers, schedules, training metrics, data modules and
# transforms. Not `Lambda` (it calls whatever it is given), not loggers or callbacks (they write files), nothing of
# `os`, `subprocess`, `builtins` or any other module.
ALLOWED_MODULES = (
    "resnet_lab.models", "resnet_lab.data", "resnet_lab.module", "resnet_lab.graph_step", "resnet_lab.metrics",
    "resnet_lab.schedules", "torch.optim", "torch.nn", "torchvision.models", "torchvision.transforms.v2",
    "torchmetrics",
)  # fmt: skip
REFUSED_NAMES = ("Lambda",)
# Packages that re-export allowed classes (jsonargparse writes `resnet_lab.ImageClassifier`): a name through one is
# allowed where the class it resolves to is defined in ALLOWED_MODULES.
REEXPORTING = ("resnet_lab",)
# Lightning's own marker of a CLI-built module (`load_from_checkpoint` checks it against its own allow-list too).
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
# The checkpoint keys whose contents Lightning turns into constructor arguments (the last two: older versions').
HYPERPARAMETER_KEYS = ("hyper_parameters", "datamodule_hyper_parameters", "hparams", "module_arguments")
# Where a saved config that is only parsed (a run folder's, compared with this command's) may name classes from.
PARSED_PACKAGES = ("lightning", "torch", "torchvision", "torchmetrics", "resnet_lab")
SPEC_WORDS = re.compile(r"class_path|init_args|dict_kwargs")
YAML_LOADERS = (yaml.SafeLoader, *([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else []))
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _in_allowed(module: str, trusted: Collection[str] = ()) -> bool:
    return any(module == allowed or module.startswith(f"{allowed}.") for allowed in (*ALLOWED_MODULES, *trusted))


def allowed_class(name: str, trusted: Collection[str] = ()) -> bool:
    """Whether `name` is an allowed class (or one the user's own code names, `trusted`), resolved as jsonargparse
    resolves it but only through real modules (a text check alone would pass `torchmetrics.os.system`, which
    jsonargparse reaches as an attribute)."""
    if name in trusted:
        return True
    module_name, _, attribute = name.rpartition(".")
    if not (_in_allowed(module_name, trusted) or module_name in REEXPORTING):
        return False  # refused before anything is imported
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    target = getattr(module, attribute, None)
    if inspect.isclass(target):
        return target.__name__ not in REFUSED_NAMES and _in_allowed(target.__module__, trusted)
    return module_name == "torchvision.models" and attribute in torchvision_model_builders()


def torchvision_model_builders() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models())


def _named(text: str) -> bool:
    """Whether a string could name something jsonargparse imports (a dotted name whose first part is a module)."""
    if not DOTTED_NAME.fullmatch(text):
        return False
    top = text.partition(".")[0]
    try:
        return top in sys.modules or importlib.util.find_spec(top) is not None  # a top-level lookup runs no code
    except (ImportError, ValueError):
        return True


def _parse_only(name: str, trusted: Collection[str]) -> bool:
    """For a saved config that is only parsed, never built: its names may come from these packages, checked as text
    before anything is imported (jsonargparse imports every class a config names to read its signature)."""
    return name in trusted or name.partition(".")[0] in PARSED_PACKAGES or _in_allowed(name, trusted)


def check_plain(
    tree: object,
    source: str,
    key: str = "",
    trusted: Collection[str] = (),
    parse_only: bool = False,
    folder: Path | None = None,
) -> None:
    """Refuse, in one line naming the key and the class, a saved tree (a checkpoint's hyper-parameters, a run's
    config) that names anything but an allowed class (`ALLOWED_MODULES`), at any depth: `class_path` specs, dotted
    strings (jsonargparse imports them in type and callable slots), specs written as YAML or JSON text, and files
    named by path (jsonargparse reads both in place of a value, as YAML or JSON whatever the file's name).
    `trusted`: names and modules that the user's own code names (a fork's classes, as its config names them);
    `parse_only`: a config that is parsed but never built, whose names need only come from `PARSED_PACKAGES`;
    `folder`: where its relative paths lead besides the working folder."""
    allowed = partial(_parse_only if parse_only else allowed_class, trusted=trusted)
    again = partial(check_plain, source=source, trusted=trusted, parse_only=parse_only, folder=folder)
    if isinstance(tree, dict):
        for name, value in tree.items():
            at = f"{key}.{name}" if key else str(name)
            if name == "_instantiator" and value == LIGHTNING_INSTANTIATOR:
                continue
            if name in ("class_path", "_class_path", "_instantiator") and not (
                isinstance(value, str) and DOTTED_NAME.fullmatch(value) and allowed(value)
            ):
                raise DataError(_refusal(source, at, value))
            again(value, key=at)
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            again(value, key=f"{key}[{index}]")
    elif isinstance(tree, str):
        text = tree.strip()
        if _named(text) and not allowed(text):
            raise DataError(_refusal(source, key, tree))
        if SPEC_WORDS.search(tree):
            raise DataError(f"{source}: {key} holds a class spec written as text ({tree[:60]!r}), which a file from "
                            "elsewhere may not hold")  # fmt: skip
        if text and any(_is_file(base / text) for base in (Path(), *([folder] if folder else []))):
            raise DataError(f"{source}: {key} names the file {tree!r}, which would be read as a config: a file from "
                            "elsewhere cannot name one")  # fmt: skip
        for loader in YAML_LOADERS:  # jsonargparse reads a string in a typed slot as YAML, with libyaml's loader
            try:
                parsed = yaml.load(tree, Loader=loader)  # noqa: S506 - safe loaders only
            except yaml.YAMLError:
                continue
            if isinstance(parsed, dict | list):
                again(parsed, key=key)


def read_saved_config(path: Path) -> dict:
    """A run folder's saved config as data: a mapping that every YAML loader reads alike (pure Python's and libyaml's,
    which jsonargparse uses, differ on tabs and byte-order marks: a file that reads two ways is refused)."""
    text = path.read_text()
    try:
        readings = [yaml.load(text, Loader=loader) for loader in YAML_LOADERS]  # noqa: S506 - safe loaders only
    except yaml.YAMLError as err:
        raise DataError(f"{path} is not readable YAML ({str(err).splitlines()[0]})") from err
    if any(reading != readings[0] for reading in readings) or not isinstance(readings[0], dict | None):
        raise DataError(f"{path} reads differently in different YAML loaders, or is not a mapping: not a saved config")
    return readings[0] or {}


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a file anyone could read
        return False


def check_checkpoint_plain(checkpoint: dict, source: str, trusted: Collection[str] = ()) -> None:
    """`check_plain` over every part of a checkpoint that Lightning builds objects from."""
    for name in HYPERPARAMETER_KEYS:
        if name in checkpoint:
            check_plain(checkpoint[name], source, "" if name == "hyper_parameters" else name, trusted)


def names_in(tree: object) -> set[str]:
    """The classes a tree of the user's own (a parsed config) names, and their modules: what `check_plain` then
    trusts in a checkpoint, so that a fork's own runs load with its own classes."""
    if isinstance(tree, dict):
        names = set().union(*(names_in(value) for value in tree.values()))
        path = tree.get("class_path")
        return names | ({path, path.rpartition(".")[0]} if isinstance(path, str) and "." in path else set())
    if isinstance(tree, list | tuple):
        return set().union(*(names_in(value) for value in tree))
    if inspect.isclass(tree):
        return {f"{tree.__module__}.{tree.__qualname__}", tree.__module__}
    if isinstance(tree, str) and DOTTED_NAME.fullmatch(tree):
        return {tree, tree.rpartition(".")[0]}
    return set()


def _refusal(source: str, key: str, value: object) -> str:
    return (
        f"{source}: {key} names {value!r}, which a file from elsewhere may not build (it is data: only classes of "
        "resnet_lab's models and data, torch.optim, torch.nn, torchvision.models and transforms.v2 but Lambda; "
        "docs/security.md lists them); if you trust it, name it in your own config, or in load_from_checkpoint's "
        "trusted_modules"
    )


def check_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents; a missing, truncated or foreign file: one clear line, before any work."""
    checkpoint = read_checkpoint(path)
    if "pytorch-lightning_version" not in checkpoint:
        raise DataError(
            f"{path} is not a Lightning checkpoint; for published CIFAR weights run "
            "`python -m resnet_lab.paper import-cifar` first"
        )
    return checkpoint


def hpc_checkpoint(folder: Path) -> Path:
    """`--ckpt_path hpc` as Lightning resolves it: the highest `hpc_ckpt_<N>.ckpt` that a SLURM requeue left in the
    trainer's default_root_dir; resolved here so that it goes through the checks of a path."""
    found = {
        int(match[1]): path
        for path in folder.glob("hpc_ckpt_*.ckpt")
        if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))
    }
    if not found:
        raise ConfigError(
            f"--ckpt_path hpc: no hpc_ckpt_<N>.ckpt in {folder} (a SLURM requeue writes them into "
            "--trainer.default_root_dir); give a checkpoint's path"
        )
    return found[max(found)]


def resolve_alias(ckpt_path: str, default_root_dir: str | None) -> str | None:
    """The file a `--ckpt_path` names, so that it passes the checks of a path before Lightning reads it: itself,
    or SLURM's newest `hpc_ckpt_<N>.ckpt` for `hpc`; None for our `last`, resolved once its run is known.
    `best` and `registry` name files that cannot be checked before Lightning loads them: refused."""
    if ckpt_path not in LIGHTNING_ALIASES:
        return ckpt_path
    if Path(ckpt_path).is_file():  # Lightning would read it as a checkpoint before any alias is resolved
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: a file named {ckpt_path!r} in the working folder shadows the alias; rename "
            f"it, or give it as ./{ckpt_path} if it is the checkpoint you mean"
        )
    if ckpt_path in ("best", "registry"):
        raise ConfigError(
            f"--ckpt_path {ckpt_path} names a checkpoint this command cannot check before it loads it (`best`: of "
            "a fit in the same process; `registry`: downloaded): give the file's path, e.g. "
            "<run>/checkpoints/best-step<N>.ckpt"
        )
    return None if ckpt_path == "last" else str(hpc_checkpoint(Path(default_root_dir or ".")))


def check_checkpoint_for(config: Namespace, path: str) -> None:
    """A checkpoint given to the command line is data: a local, readable Lightning checkpoint of plain values (never
    unpickled), naming only allowed classes or those the command's own config names (`check_checkpoint_plain`),
    and holding the network the config names, rather than evaluate one network under another's name."""
    if "://" in path:
        raise ConfigError(
            f"--ckpt_path {path}: a URL is not read (Lightning unpickles remote checkpoints); download the file and "
            "give its path"
        )
    checkpoint = check_lightning_checkpoint(path)
    check_checkpoint_plain(checkpoint, f"--ckpt_path {path}", trusted=names_in(config.as_dict()))
    given = network_of(config.model.as_dict() if isinstance(config.model, Namespace) else {})
    theirs = network_of(checkpoint.get("hyper_parameters") or {})
    differences = [
        f"{key} {theirs[key]} in the checkpoint, {value} in the config"
        for key, value in given.items()
        if key in theirs and theirs[key] != value
    ]
    if differences:
        raise ConfigError(
            f"--ckpt_path {path} holds another network than the config names ({'; '.join(differences)}): give the "
            "config of the run that trained it (its run folder's config.yaml)"
        )


def model_arguments(config: Namespace | dict) -> Namespace | dict:
    """The module's arguments in a config, parsed or plain: `model.init_args`, or `model` itself in a config written
    before the module's class was a choice (`model: {backbone: ...}`)."""
    model = config["model"]
    arguments = model.get("init_args") if "class_path" in model else model
    return arguments if arguments is not None else type(model)()


AUTOMATIC = "epoch_loop.automatic_optimization.optim_progress"
MANUAL = "epoch_loop.manual_optimization.optim_step_progress"


def carry_step_count(checkpoint: dict, manual: bool) -> None:
    """Let a checkpoint of a module trained under automatic optimization resume under manual optimization (the graph
    step), and the other way round: Lightning counts `global_step` in the loop of the one the module uses, and
    restores only that one, which for the other's checkpoint would say 0."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    if AUTOMATIC not in loops or MANUAL not in loops:
        return
    automatic = loops[AUTOMATIC]["optimizer"]
    if manual and automatic["step"]["total"]["completed"] > loops[MANUAL]["total"]["completed"]:
        loops[MANUAL] = copy.deepcopy(automatic["step"])
    elif not manual and loops[MANUAL]["total"]["completed"] > automatic["step"]["total"]["completed"]:
        automatic["step"] = copy.deepcopy(loops[MANUAL])
        automatic["zero_grad"] = {
            when: {**counts, "started": counts["ready"]} for when, counts in copy.deepcopy(loops[MANUAL]).items()
        }


def network_of(model: dict) -> dict[str, str]:
    """The backbone of the module's settings `model` (a config's `model`, a checkpoint's hyper-parameters), as
    comparable text: its class and arguments, classes by their own name (the class count is left out: the data
    module sets it, and a checkpoint of another count fails to load, saying so)."""
    backbone = (model.get("init_args") or {} if "class_path" in model else model).get("backbone")
    if not isinstance(backbone, dict) or "class_path" not in backbone:
        return {}

    def text(value: object) -> str:
        value = getattr(value, "__name__", value)
        return str(value).rpartition(".")[2] if isinstance(value, str) and "." in value else str(value)

    arguments = backbone.get("init_args") or {}
    return {"network": text(backbone["class_path"])} | {
        key: text(value) for key, value in arguments.items() if key != "num_classes"
    }


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (tensors memory-mapped, so a large file costs little to check)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f": {', '.join(found[:3])}" if found else ""
        raise DatasetNotFoundError(f"checkpoint {path} is a folder: give a checkpoint file in it{hint}")
    if not path.is_file():
        raise DatasetNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Memory-map the zip format (torch >= 1.6); older files, like the published CIFAR ones, load in full.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated, foreign or not a torch file at all: say which and why
        reason = next(iter(str(err).splitlines()), "").split(". ")[0][:200]
        if path.stat().st_size == 0:
            reason = "an empty file"
        elif "Weights only load failed" in reason:  # torch's advice to unpickle anything is not ours to give
            reason = "not written by torch.save, or it holds objects other than tensors and plain values"
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from err


def check_state_dict_matches(model: nn.Module, state: dict, source: str) -> None:
    """Explain, in one paragraph, how a state dict differs from `model` (missing, unexpected, reshaped weights)."""
    expected = model.state_dict()
    # BN fills in `num_batches_tracked` for checkpoints older than that buffer (e.g. the published CIFAR ones).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or reshaped):
        return
    parts = [
        f"{len(missing)} weights missing (e.g. {', '.join(missing[:2])})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
        f"{len(reshaped)} of another shape (checkpoint vs this model: {'; '.join(reshaped[:2])})" if reshaped else "",
    ]
    raise ConfigError(
        f"{source} does not fit this model: {', '.join(p for p in parts if p)}. Was it trained with another depth, "
        "residual unit (block), shortcut option, plain/residual switch or number of classes? Use the config it was "
        "trained with (its run folder's config.yaml)."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoints, each written to a temporary file in its own folder, flushed and renamed over
    the old one (`atomic_write`): a kill or a full disk during a write leaves the previous `last.ckpt` loadable,
    where Lightning's own atomic save stages the file in the system temp folder and, on another file system, copies
    it over the target. A full disk is one line naming the folder and its free space."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote file systems: fsspec's, as Lightning does
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
        return None
